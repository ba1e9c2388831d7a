"""Calibrate the inference thresholds of an SViT (or TPC) checkpoint that lacks them, on training images, and
write a checkpoint to test.

    python tools/analysis_tools/recalibrate.py CONFIG CHECKPOINT OUT.pth [--num-batches 50] [--batch-size 4]
                                               [--seed 0] [--device cpu|cuda] [--trust-checkpoint]
                                               [--cfg-options k=v ...]

A checkpoint converted from the official SViT code (``tools/model_converters/official_to_tokenprune.py``) has
no thresholds, so ``inference='threshold'`` (the configs' default) falls back to the fixed budget at every
gated block. This tool builds the detector of CONFIG, loads CHECKPOINT, and runs the pass
``SViTCalibrationHook`` runs after training (the same seeded batches of the training dataset with its training
pipeline; ``tokenprune.mmdet_plugin.hooks.calibrate_thresholds``, i.e. ``with reducer.calibration():`` around
eval forwards of the backbone): each gated block's threshold becomes the mean over the batches of the
threshold at which that batch keeps exactly the block's target. OUT holds CHECKPOINT's tensors with the two
threshold buffers (``backbone.reducer.thresholds``, ``backbone.reducer.calibration_steps``) replaced, and a
``meta`` of plain values; it loads with torch's weights-only loader. Then::

    python tools/test.py CONFIG OUT.pth

CHECKPOINT is read weights-only; ``--trust-checkpoint`` reads it with full unpickling (trusted files only).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

import torch  # noqa: E402
from mmdet.registry import DATASETS  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402

import tokenprune  # noqa: E402,F401  (registers the models and datasets; allow-lists checkpoint contents)
from tokenprune.errors import ConfigError, WeightsMismatchError  # noqa: E402
from tokenprune.mmdet_plugin.cli import check_config, load_config, report_errors  # noqa: E402
from tokenprune.mmdet_plugin.detectors import build_detector  # noqa: E402
from tokenprune.mmdet_plugin.hooks import (  # noqa: E402
    SViTCalibrationHook,
    calibrate_thresholds,
    reducer_name,
    threshold_reducer,
)
from tokenprune.mmdet_plugin.safe_load import load_checkpoint_file, trust_checkpoint  # noqa: E402
from tokenprune.models.weights import read_weights  # noqa: E402

CALIBRATION_BUFFERS = ("thresholds", "calibration_steps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Calibrate SViT's / TPC's inference thresholds of a checkpoint")
    parser.add_argument("config", help="the config the checkpoint belongs to (its train_dataloader gives the images)")
    parser.add_argument("checkpoint", help="checkpoint to calibrate, e.g. a converted official SViT model")
    parser.add_argument("out", help="where to write the calibrated checkpoint")
    parser.add_argument("--num-batches", type=int, default=50, help="training batches to calibrate on (50)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per calibration batch (4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of training images (0)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device (default: cuda if any)"
    )
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="load CHECKPOINT with full unpickling (trusted files only)"
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, e.g. model.backbone.block_norm_eps=1e-5 for a released SViT model",
    )
    return parser.parse_args(argv)


def plain(value):
    """``value`` if it is made of str / int / float / bool / None, lists, tuples and str-keyed dicts only
    (what the weights-only loader reads), else None."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        items = [plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else type(value)(items)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: plain(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return None


def build_and_load(args: argparse.Namespace):
    """The detector of the config with the checkpoint's weights, SyncBN reverted, in eval mode on the device;
    the config; and the checkpoint's state dict and meta."""
    cfg = load_config(args.config, args.cfg_options)
    cfg.model.backbone.init_cfg = None  # the checkpoint holds the weights
    cfg.load_from = None
    check_config(cfg, loaders=("train_dataloader",))
    if not osp.isfile(args.checkpoint):
        raise ConfigError(f"checkpoint not found: {args.checkpoint}")
    if args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    checkpoint = load_checkpoint_file(args.checkpoint, map_location="cpu")
    state_dict = read_weights(checkpoint)
    model = revert_sync_batchnorm(build_detector(cfg))
    reducer = threshold_reducer(model)
    if reducer is None:
        reducer_type = type(getattr(model.backbone, "reducer", None)).__name__
        raise ConfigError(
            f"{args.config}: the backbone's reducer ({reducer_type}) has no calibrated inference thresholds; "
            "recalibration is for SViT and TPC configs"
        )
    result = model.load_state_dict(state_dict, strict=False)
    prefix = next(name for name, module in model.named_modules() if module is reducer) + "."
    own = {prefix + b for b in CALIBRATION_BUFFERS}
    untrained = [k for k in result.missing_keys if k.startswith(prefix) and k not in own]
    if untrained:
        raise WeightsMismatchError(
            f"{args.checkpoint} has no weights for the reducer's {untrained[:3]} ({len(untrained)} tensors): "
            "calibrating untrained gates is pointless. Is it a checkpoint of this config (a converted SViT model "
            "needs an SViT config)?"
        )
    others = [k for k in result.missing_keys if k not in own]
    if others:
        print(f"warning: {len(others)} tensors of the model are not in the checkpoint (left as built): {others[:5]}")
    if result.unexpected_keys:
        print(f"warning: {len(result.unexpected_keys)} checkpoint tensors fit nothing: {result.unexpected_keys[:5]}")
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    meta = {k: plain(v) for k, v in meta.items() if plain(v) is not None} if isinstance(meta, dict) else {}
    return model.to(args.device).eval(), cfg, state_dict, meta, reducer, prefix


def run(argv: list[str] | None = None) -> dict:
    """The tool on command-line arguments ``argv``; returns what it reports."""
    args = parse_args(argv)
    if args.num_batches < 1 or args.batch_size < 1:
        raise ConfigError(f"--num-batches and --batch-size must be >= 1, got {args.num_batches}, {args.batch_size}")
    model, cfg, state_dict, meta, reducer, prefix = build_and_load(args)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batches = SViTCalibrationHook(args.num_batches, args.batch_size, args.seed).batches(dataset)
    rates = calibrate_thresholds(model, batches)
    out = dict(state_dict)
    for name in CALIBRATION_BUFFERS:
        out[prefix + name] = getattr(reducer, name).detach().cpu().clone()
    blocks = list(reducer.reduced_blocks())
    report = {
        "config": args.config,
        "checkpoint": args.checkpoint,
        "num_batches": args.num_batches,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "blocks": blocks,
        "targets": list(reducer.keep_targets),
        "thresholds": reducer.thresholds.tolist(),
        "calibration_keep_rates": [rates.get(b) for b in blocks],
    }
    meta = {**meta, "recalibrated": {k: v for k, v in report.items() if k != "config"}}
    meta["recalibrated"]["tool"] = "tools/analysis_tools/recalibrate.py"
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    torch.save({"state_dict": out, "meta": meta}, args.out)
    name = reducer_name(reducer)
    print(f"{name} thresholds calibrated on {args.num_batches} batches of {args.batch_size} training images:")
    print(f"  {'block':>5} {'target':>7} {'threshold':>9} {'keep rate while calibrating':>27}")
    for block, target, threshold in zip(blocks, reducer.keep_targets, report["thresholds"]):
        rate = rates.get(block)
        print(f"  {block:>5} {target:7.3f} {threshold:9.4f} {'' if rate is None else f'{rate:.3f}':>27}")
    print(f"wrote {len(out)} tensors to {args.out}; evaluate it with: python tools/test.py {args.config} {args.out}")
    return report


@report_errors
def main() -> None:
    run()


if __name__ == "__main__":
    main()
