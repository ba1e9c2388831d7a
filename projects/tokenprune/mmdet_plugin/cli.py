"""What tools/train.py and tools/test.py share: config preparation, checks that fail early with one clear
message (each tied to the step of the run that reads the file), the reliability hooks, the choice of the
checkpoint to resume from, the check that a checkpoint fits the model, and CPU distributed launch."""

from __future__ import annotations

import ast
import functools
import glob
import logging
import os
import re
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import ConfigError, DatasetError, TokenPruneError
from .checkpoint_fit import check_checkpoint_fit, covers_backbone, local_checkpoint
from .datasets import check_coco_file, check_image_files, check_not_empty, image_read_error, unannotated_message
from .reliability import RELIABILITY_HOOKS
from .safe_load import is_whole_zip


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
        located = config_syntax_error(path)
        if located is not None:
            raise ConfigError(f"config {path} could not be read: {located}") from e
        raise ConfigError(f"config {path} could not be read: {type(e).__name__}: {e}") from e
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("./work_dirs", os.path.splitext(os.path.basename(path))[0])
    return cfg


def _base_paths(tree: ast.Module, path: str) -> list[str]:
    """The files a config's ``_base_`` names (relative to the config, or ``package::path``)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
            try:
                bases = ast.literal_eval(node.value)
            except ValueError:
                return []
            bases = [bases] if isinstance(bases, str) else list(bases)
            out = []
            for base in bases:
                if "::" in base:
                    try:
                        out.append(Config._get_cfg_path(base, path)[0])
                    except Exception:  # an uninstalled package: mmengine reports that itself
                        continue
                else:
                    out.append(os.path.normpath(os.path.join(os.path.dirname(path), base)))
            return out
    return []


def config_syntax_error(path: str, child: str | None = None, seen: set | None = None) -> str | None:
    """Where a syntax error is in config ``path`` or in any file of its ``_base_`` chain, as one line naming
    the file, the line and the code (mmengine reports the error of a base file as ``<unknown>``, against the
    config the user ran); None if every file parses."""
    seen = set() if seen is None else seen
    real = os.path.realpath(path)
    if real in seen or not path.endswith(".py") or not os.path.isfile(path):
        return None
    seen.add(real)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        lines = source.splitlines()
        code = lines[e.lineno - 1].strip() if e.lineno and 0 < e.lineno <= len(lines) else ""
        where = f"line {e.lineno}" + (f" ({code!r})" if code else "")
        if child is None:
            return f"syntax error in the config itself at {where}: {e.msg}"
        return f"syntax error in its _base_ file {path} at {where}: {e.msg}. Fix that file"
    except (OSError, UnicodeDecodeError):
        return None
    for base in _base_paths(tree, path):
        found = config_syntax_error(base, child or path, seen)
        if found is not None:
            return found
    return None


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


EVALUATORS = {"val_dataloader": "val_evaluator", "test_dataloader": "test_evaluator"}


def training_loaders(cfg: Config) -> tuple[str, ...]:
    """The dataloaders ``tools/train.py`` reads: the training one, and the validation one when the config
    validates (``val_dataloader``, ``val_cfg`` and ``val_evaluator`` all set, as mmengine requires)."""
    validates = all(cfg.get(k) is not None for k in ("val_dataloader", "val_cfg", "val_evaluator"))
    return ("train_dataloader", "val_dataloader") if validates else ("train_dataloader",)


def _evaluated_files(cfg: Config, loader: str, dataset_ann: str) -> list[str]:
    """The annotation files the COCO metrics of ``loader``'s evaluator compare predictions with: each metric's
    ``ann_file``, or the dataset's own file for a metric without one; none for ``format_only`` metrics."""
    evaluator = cfg.get(EVALUATORS.get(loader, ""))
    metrics = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    out = []
    for m in metrics:
        if not isinstance(m, dict) or m.get("format_only"):
            continue
        ann_file = m.get("ann_file")
        if isinstance(ann_file, str) and ann_file:
            if "://" not in ann_file:
                out.append(ann_file)
        elif "Coco" in str(m.get("type", "")):
            out.append(dataset_ann)
    return out


def _check_annotated(loader: str, ann: dict, ann_path: str, unannotated: str) -> None:
    """An evaluation file with images but no annotations gives -1.000 for every metric: ``unannotated='error'``
    refuses it, ``'warn'`` logs a warning."""
    message = unannotated_message(ann, ann_path)
    if message is None:
        return
    if unannotated == "error":
        raise DatasetError(
            f"{message}. Evaluate against an annotated file ({EVALUATORS[loader]}.ann_file), or, to keep the "
            "predictions only, pass --out preds.pkl or --show-dir DIR, which run without metrics to compare"
        )
    print_log(f"{message}; the run goes on", logger="current", level=logging.WARNING)


def check_pretrained_weights(cfg: Config) -> None:
    """The backbone's pretrained weights (``init_cfg``), read when training starts (``init_weights``), exist."""
    init_cfg = ((cfg.get("model") or {}).get("backbone") or {}).get("init_cfg") or {}
    weights = init_cfg.get("checkpoint") if isinstance(init_cfg, dict) else None
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(
            f"pretrained backbone weights not found: {weights}. Nothing is downloaded at run time: put the file "
            "there, pass --cfg-options model.backbone.init_cfg.checkpoint=/path/to/file.pth, or "
            "model.backbone.init_cfg=None to start from random weights"
        )


def check_config(
    cfg: Config,
    loaders: tuple[str, ...] = ("train_dataloader", "val_dataloader", "test_dataloader"),
    init_weights: bool = True,
    unannotated: str = "warn",
) -> None:
    """Fail early, with one message, on what would otherwise surface as a deep traceback or a silently empty
    dataset: unknown model types, missing data, annotation or image files, annotation files that are not COCO
    or are empty, classes that do not match the annotation file or the heads, missing pretrained weights or
    ``load_from`` checkpoint.

    Each check belongs to the step that reads the file, so that a run is not refused for a file it never
    reads: ``loaders`` are the dataloaders the run iterates (their annotation and image files, and the
    evaluator's annotation file of ``val_dataloader`` / ``test_dataloader``); ``init_weights`` whether the run
    reads the backbone's pretrained weights (training does, testing does not); ``unannotated``: ``'error'`` or
    ``'warn'`` for an evaluation file that lists images but no annotations (every metric would be -1.000)."""
    model = cfg.get("model", {})
    _check_registered(model, "model")
    for part in ("backbone", "neck"):
        _check_registered(model.get(part), part)
    for loader in loaders:
        for ds in _dataset_cfgs(cfg, (loader,)):
            if ds.get("generate") is not None or "ann_file" not in ds:
                continue  # the embedded data, made (and checked) when the dataset loads
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
            check_not_empty(ann, ann_path, training=loader == "train_dataloader")
            _check_classes(ds, ann, ann_path, model)
            for path in _evaluated_files(cfg, loader, ann_path):
                _check_annotated(loader, ann if path == ann_path else check_coco_file(path), path, unannotated)
            if (ds.get("backend_args") or {}).get("backend", "local") != "local":
                continue
            check_image_files(ann, ann_path, os.path.join(root, (ds.get("data_prefix") or {}).get("img", "")))
    if init_weights:
        check_pretrained_weights(cfg)
    load_from = cfg.get("load_from")
    if load_from and not cfg.get("resume") and "://" not in load_from and not os.path.isfile(load_from):
        raise ConfigError(
            f"load_from checkpoint not found: {load_from}. Train the model this config starts from first, or "
            "pass --cfg-options load_from=/path/to/checkpoint.pth"
        )


def apply_resume(cfg: Config, resume: str | None) -> None:
    """``--resume`` of tools/train.py: ``'auto'`` continues from the latest complete checkpoint in the work dir
    (or starts as configured if there is none yet), a path from that checkpoint, which must exist."""
    if resume is None:
        return
    if resume == "auto":
        latest = latest_checkpoint(cfg.work_dir) if os.path.isdir(cfg.work_dir) else None
        if latest is not None:
            cfg.resume = True
            cfg.load_from = latest
        else:
            print_log(f"--resume: no checkpoint in {cfg.work_dir} yet, starting from the config", logger="current")
        return
    if "://" not in resume and not os.path.isfile(resume):
        raise ConfigError(
            f"--resume {resume}: checkpoint not found. Give the path of a checkpoint written by an earlier run of "
            f"this config, or --resume without a path to continue from the latest checkpoint in the work dir "
            f"({cfg.work_dir})"
        )
    cfg.resume = True
    cfg.load_from = resume


def check_start_checkpoint(cfg: Config, allow_partial: bool = False) -> None:
    """Training: the checkpoint the run starts from (``--resume`` or ``load_from``) must fit the model
    (:func:`~tokenprune.mmdet_plugin.checkpoint_fit.check_checkpoint_fit`). If it sets every backbone tensor,
    the backbone's pretrained weights would be overwritten anyway: they are not read (nor required); otherwise
    they must exist."""
    load_from = cfg.get("load_from")
    fit = None
    if local_checkpoint(load_from):
        purpose = "resume" if cfg.get("resume") else "load_from"
        fit = check_checkpoint_fit(cfg, load_from, purpose, allow_partial)
    init_cfg = ((cfg.get("model") or {}).get("backbone") or {}).get("init_cfg")
    if fit is not None and init_cfg and covers_backbone(fit):
        print_log(
            f"model.backbone.init_cfg ({init_cfg.get('checkpoint')}) is not read: {load_from} sets every backbone "
            "tensor it would",
            logger="current",
        )
        cfg.model.backbone.init_cfg = None
        return
    check_pretrained_weights(cfg)


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
    return is_whole_zip(path)


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
