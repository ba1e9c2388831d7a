"""What tools/train.py and tools/test.py share: config preparation, checks that fail early with one clear
message, and CPU distributed launch."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import ConfigError, TokenPruneError
from .datasets import check_coco_file


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


def check_config(
    cfg: Config, loaders: tuple[str, ...] = ("train_dataloader", "val_dataloader", "test_dataloader")
) -> None:
    """Fail early, with one message, on what would otherwise surface as a deep traceback: unknown model
    types, missing data or annotation files, missing pretrained weights or ``load_from`` checkpoint."""
    model = cfg.get("model", {})
    _check_registered(model, "model")
    for part in ("backbone", "neck"):
        _check_registered(model.get(part), part)
    for ds in _dataset_cfgs(cfg, loaders):
        if ds.get("generate") is not None or "ann_file" not in ds:
            continue
        root = ds.get("data_root") or ""
        if root and not os.path.isdir(root):
            raise ConfigError(
                f"dataset folder not found: {root}. Set the dataset's data_root (for COCO configs: "
                "export COCO_ROOT=/path/to/coco/)"
            )
        check_coco_file(os.path.join(root, ds["ann_file"]))
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


def report_errors(main: Callable[[], object]) -> Callable[[], object]:
    """Run ``main``; a :class:`TokenPruneError` (or one wrapped by mmengine's builders) ends the program
    with its message and exit code 2 instead of a traceback. ``TOKENPRUNE_TRACEBACK=1`` shows it anyway."""

    @functools.wraps(main)
    def wrapped():
        try:
            return main()
        except TokenPruneError as e:
            if os.environ.get("TOKENPRUNE_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
