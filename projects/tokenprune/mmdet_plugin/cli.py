"""What tools/train.py and tools/test.py share: config preparation, checks that fail early with one clear
message, the reliability hooks, the choice of the checkpoint to resume from, and CPU distributed launch."""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import sys
import zipfile
from collections.abc import Callable

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import ConfigError, TokenPruneError
from .datasets import check_coco_file, check_image_files, image_read_error
from .reliability import RELIABILITY_HOOKS


def load_config(
    path: str, cfg_options: dict | None = None, launcher: str = "none", work_dir: str | None = None
) -> Config:
    """Read a config file, apply ``--cfg-options``, ``--launcher`` and ``--work-dir`` (default
    ``./work_dirs/<config name>``); a missing or broken file is a :class:`ConfigError`."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # mmengine reports syntax and inheritance errors with many exception types
        raise ConfigError(f"config {path} could not be read: {type(e).__name__}: {e}") from e
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("./work_dirs", os.path.splitext(os.path.basename(path))[0])
    return cfg


def _check_registered(cfg: dict | None, what: str) -> None:
    from mmdet.registry import MODELS

    if not cfg or "type" not in cfg or not isinstance(cfg["type"], str):
        return
    if MODELS.get(cfg["type"]) is None:
        raise ConfigError(
            f"unknown {what} type '{cfg['type']}' in the config. Check the spelling; types from this project "
            "need custom_imports = dict(imports=['tokenprune'], allow_failed_imports=False) in the config"
        )


def _dataset_cfgs(cfg: Config, loaders: tuple[str, ...]) -> list[dict]:
    out = []
    for loader in loaders:
        ds = (cfg.get(loader) or {}).get("dataset")
        while isinstance(ds, dict) and "dataset" in ds:  # RepeatDataset, ClassBalancedDataset, ...
            ds = ds["dataset"]
        if isinstance(ds, dict):
            out.append(ds)
    return out


def _check_classes(ds: dict, ann: dict, ann_path: str, model: dict) -> None:
    """The dataset's classes must be categories of the annotation file (mmdet silently drops the annotations
    of any other category) and as many as the heads predict."""
    from mmdet.registry import DATASETS

    classes = (ds.get("metainfo") or {}).get("classes")
    if classes is None:
        dataset_cls = DATASETS.get(ds.get("type")) if isinstance(ds.get("type"), str) else None
        classes = getattr(dataset_cls, "METAINFO", {}).get("classes")
    if not classes:
        return
    names = [c.get("name") for c in ann["categories"]]
    absent = [c for c in classes if c not in names]
    if len(absent) == len(classes):
        raise ConfigError(
            f"none of the dataset's {len(classes)} classes {list(classes)[:5]}... is a category of {ann_path}, "
            f"whose categories are {names[:10]}: every annotation would be dropped. Set the dataset's "
            "metainfo=dict(classes=(...)) to the file's category names (and num_classes of the bbox and mask "
            "heads to their number)"
        )
    if absent:
        print_log(
            f"classes {absent} of the config have no category in {ann_path}: they get no training examples",
            logger="current",
            level=logging.WARNING,
        )
    roi_head = model.get("roi_head") or {}
    for head in ("bbox_head", "mask_head"):
        cfg = roi_head.get(head)
        if isinstance(cfg, dict) and cfg.get("num_classes") not in (None, len(classes)):
            raise ConfigError(
                f"model.roi_head.{head}.num_classes={cfg['num_classes']} but the dataset has {len(classes)} "
                f"classes ({list(classes)[:5]}...): set num_classes={len(classes)}, or the dataset's metainfo "
                "classes to the ones the model predicts"
            )


def check_config(
    cfg: Config, loaders: tuple[str, ...] = ("train_dataloader", "val_dataloader", "test_dataloader")
) -> None:
    """Fail early, with one message, on what would otherwise surface as a deep traceback or a silently empty
    dataset: unknown model types, missing data, annotation or image files, annotation files that are not COCO,
    classes that do not match the annotation file or the heads, missing pretrained weights or ``load_from``
    checkpoint."""
    model = cfg.get("model", {})
    _check_registered(model, "model")
    for part in ("backbone", "neck"):
        _check_registered(model.get(part), part)
    for ds in _dataset_cfgs(cfg, loaders):
        if ds.get("generate") is not None or "ann_file" not in ds:
            continue
        root = ds.get("data_root") or ""
        if "://" in root:
            continue
        if root and not os.path.isdir(root):
            raise ConfigError(
                f"dataset folder not found: {root}. Set the dataset's data_root (for COCO configs: "
                "export COCO_ROOT=/path/to/coco/)"
            )
        ann_path = os.path.join(root, ds["ann_file"])
        ann = check_coco_file(ann_path)
        _check_classes(ds, ann, ann_path, model)
        if (ds.get("backend_args") or {}).get("backend", "local") != "local":
            continue
        check_image_files(ann, ann_path, os.path.join(root, (ds.get("data_prefix") or {}).get("img", "")))
    init_cfg = (model.get("backbone") or {}).get("init_cfg") or {}
    weights = init_cfg.get("checkpoint") if isinstance(init_cfg, dict) else None
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(
            f"pretrained backbone weights not found: {weights}. Nothing is downloaded at run time: put the file "
            "there, pass --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file.pth, or "
            "model.backbone.init_cfg=None to start from random weights"
        )
    load_from = cfg.get("load_from")
    if load_from and not cfg.get("resume") and "://" not in load_from and not os.path.isfile(load_from):
        raise ConfigError(
            f"load_from checkpoint not found: {load_from}. Train the model this config starts from first, or "
            "pass --cfg-options load_from=/path/to/checkpoint.pth"
        )


def add_reliability_hooks(cfg: Config) -> None:
    """Add :data:`RELIABILITY_HOOKS` (stop on a NaN/inf loss, random state in checkpoints) to the config's
    ``default_hooks`` where the config does not name them; a config setting one to None switches it off."""
    hooks = cfg.get("default_hooks") or {}
    for name, hook in RELIABILITY_HOOKS.items():
        if name not in hooks:
            hooks[name] = dict(hook)
    cfg.default_hooks = hooks


def is_complete_checkpoint(path: str) -> bool:
    """Whether ``path`` is a whole checkpoint file in torch's zip format (a process killed while writing one
    leaves a file without the zip's central directory)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return bool(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _checkpoint_step(path: str) -> int:
    m = re.search(r"(\d+)\.pth$", os.path.basename(path))
    return int(m.group(1)) if m else -1


def latest_checkpoint(work_dir: str) -> str | None:
    """The checkpoint ``--resume`` continues from: the one mmengine's ``last_checkpoint`` file names, or, if
    that file is missing, incomplete or gone (killed while saving, or deleted by ``max_keep_ckpts``), the
    newest complete ``iter_*.pth`` / ``epoch_*.pth`` in ``work_dir``. None if there is none."""
    named = None
    pointer = os.path.join(work_dir, "last_checkpoint")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and is_complete_checkpoint(named):
            return named
    candidates = glob.glob(os.path.join(work_dir, "iter_*.pth")) + glob.glob(os.path.join(work_dir, "epoch_*.pth"))
    for path in sorted(candidates, key=_checkpoint_step, reverse=True):
        if is_complete_checkpoint(path):
            if named:
                print_log(
                    f"--resume: {named} is missing or incomplete (interrupted while saving?); resuming from {path}",
                    logger="current",
                    level=logging.WARNING,
                )
            return path
    return None


def setup_cpu_distributed(cfg: Config) -> None:
    """Let ``--launcher pytorch`` run on machines without CUDA: mmengine would call torch.cuda.set_device and
    wrap the model with device_ids. Here the process group is started with gloo and DDP gets no device_ids."""
    if cfg.launcher == "none" or torch.cuda.is_available():
        return
    if cfg.launcher != "pytorch":
        raise ConfigError(f"--launcher {cfg.launcher} without CUDA is not supported; use --launcher pytorch")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    print_log(f"no CUDA: distributed on CPU with gloo, world size {dist.get_world_size()}", logger="current")
    cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    wrapper = cfg.get("model_wrapper_cfg") or {"type": "MMDistributedDataParallel"}
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper


def user_message(error: BaseException) -> str:
    """The message of ``error``; for an error re-raised by a DataLoader worker (whose message holds the
    worker's traceback), the original error's own message only."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def report_errors(main: Callable[[], object]) -> Callable[[], object]:
    """Run ``main``; a :class:`TokenPruneError` (or one wrapped by mmengine's builders or a DataLoader
    worker), or an image file that cannot be read (:func:`image_read_error`), ends the program with one
    message and exit code 2 instead of a traceback. ``TOKENPRUNE_TRACEBACK=1`` shows the traceback anyway."""

    @functools.wraps(main)
    def wrapped():
        try:
            return main()
        except Exception as e:
            known = e if isinstance(e, TokenPruneError) else image_read_error(e)
            if known is None or os.environ.get("TOKENPRUNE_TRACEBACK"):
                raise
            print(f"error: {user_message(known)}", file=sys.stderr)
            sys.exit(2)

    return wrapped
