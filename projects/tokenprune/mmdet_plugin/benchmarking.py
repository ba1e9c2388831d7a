"""The detector mode of the benchmark and FLOP tools (MMDetection): whole detectors from config files and
checkpoints, timed side by side with their backbones, their MACs counted from a real prediction, and the
heads' workload fixed so that whole-detector speed-ups compare backbones doing the same head work.
Torch-only pieces come from :mod:`tokenprune.benchmarking`.
"""

from __future__ import annotations

import argparse
import copy
import os.path as osp
from collections.abc import Sequence

import torch
from torch import nn

from ..benchmarking import (
    BackboneMacs,
    Candidate,
    Timer,
    autocast,
    environment,
    finish_environment,
    flop_summary,
    print_keep_rates,
    print_speed_rows,
    setup_device,
    speed_summary,
    time_round_robin,
)
from ..models.flops import LayerMacCounter, backbone_macs

HEAD_WORK_FIXED = (
    "fixed: RPN NMS off (every image hands its max_per_img proposals to the RoI head), RoI score threshold 0 "
    "and NMS off (every image keeps max_per_img detections for the mask head)"
)
HEAD_WORK_CONFIGURED = "as configured: the heads' proposals and detections follow each model's predictions"


def resolve_head_work(mode: str, checkpoints: Sequence[str | None]) -> str:
    """``auto``: ``fixed`` unless every model has a trained checkpoint (random models predict different
    numbers of boxes, so their heads would do different work), else ``configured``."""
    if mode not in ("auto", "fixed", "configured"):
        raise ValueError(f"--head-work must be auto, fixed or configured, got {mode!r}")
    if mode == "auto":
        return "configured" if all(c is not None for c in checkpoints) else "fixed"
    return mode


def fix_head_work(model_cfg) -> None:
    """Make a two-stage detector's heads do the same work whatever its weights: the RPN hands on exactly its
    ``max_per_img`` top-scored proposals (NMS off), the RoI head keeps exactly its ``max_per_img`` detections
    (score threshold 0, NMS off), and the mask head runs on all of them."""
    test_cfg = model_cfg.get("test_cfg") or {}
    rpn, rcnn = test_cfg.get("rpn"), test_cfg.get("rcnn")
    if rpn is None or rcnn is None:
        raise ValueError(
            "--head-work fixed needs a two-stage detector with model.test_cfg.rpn and model.test_cfg.rcnn "
            "(e.g. Mask R-CNN); use --head-work configured with trained checkpoints instead"
        )
    no_nms = dict(type="nms", iou_threshold=1.0)  # suppresses only boxes with IoU > 1: none
    rpn.update(nms=no_nms, min_bbox_size=-1.0)
    rcnn.update(score_thr=0.0, nms=no_nms)


def head_work_note(flops: dict[str, dict], tolerance: float = 0.01) -> str | None:
    """A warning when the models' neck-and-head MACs per image differ by more than ``tolerance``: their heads
    processed different numbers of proposals or detections, so the whole-detector speed-ups mix backbone
    and head work. None when they agree."""
    heads = {label: f["rest_macs_by_part"].get("roi_head", 0.0) for label, f in flops.items()}
    low, high = min(heads.values()), max(heads.values())
    if high <= 0 or (high - low) / high <= tolerance:
        return None
    parts = ", ".join(f"{label} {v / 1e9:.2f}" for label, v in heads.items())
    return (
        f"WARNING: the models' RoI heads did different work (GMACs per image: {parts}), so their whole-detector "
        "speed-ups are not comparable; use --head-work fixed, or trained checkpoints of comparable detectors"
    )


def build_same_weight_detectors(cfgs: Sequence, checkpoints: Sequence[str | None], seed: int) -> list[nn.Module]:
    """Build the detectors of loaded configs (on the CPU, in train mode). A model with a checkpoint loads it;
    one without starts from the same random weights as every other: those of the first model wherever names
    and shapes fit (its gates, for instance, stay at their seeded initialisation).

    Args:
        cfgs: Loaded MMEngine configs (``load_config``), one per model.
        checkpoints: One path or None per config.
        seed: Seed of the random weights.
    """
    from .detectors import build_detector, load_weights

    models = []
    for cfg, ckpt in zip(cfgs, checkpoints):
        model = build_detector(cfg, seed)
        if ckpt is not None:
            load_weights(model, ckpt, logger="silent")
        elif models:
            reference, own = models[0].state_dict(), model.state_dict()
            model.load_state_dict(
                {k: v for k, v in reference.items() if k in own and v.shape == own[k].shape}, strict=False
            )
        models.append(model)
    return models


def build_detectors(args: argparse.Namespace) -> tuple[dict[str, nn.Module], list]:
    """The detectors of ``args.configs`` in eval mode on the device, labelled by config name, and the configs."""
    from tokenprune.mmdet_plugin.cli import load_config

    if args.checkpoints and len(args.checkpoints) != len(args.configs):
        raise ValueError(
            f"--checkpoints needs one entry per config ({len(args.configs)}), 'none' for random weights; "
            f"got {len(args.checkpoints)}"
        )
    checkpoints = [None if c in (None, "none") else c for c in (args.checkpoints or [None] * len(args.configs))]
    args.head_work = resolve_head_work(getattr(args, "head_work", "auto"), checkpoints)
    labels = [osp.splitext(osp.basename(c))[0] for c in args.configs]
    labels = [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    cfgs = []
    for path in args.configs:
        cfg = load_config(path, args.cfg_options)
        if args.head_work == "fixed":
            fix_head_work(cfg.model)
        cfgs.append(cfg)
    models = build_same_weight_detectors(cfgs, checkpoints, args.seed)
    return {label: m.to(args.device).eval() for label, m in zip(labels, models)}, cfgs


def raw_detector_batches(args: argparse.Namespace, cfg, batch: int) -> list[dict]:
    """Unprocessed data batches (lists of uint8 images and data samples) of one run."""
    from mmdet.structures import DetDataSample

    if not args.dataset:
        h, w = args.size
        g = torch.Generator().manual_seed(args.seed)
        images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(batch)]
        meta = {"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
        return [{"inputs": images, "data_samples": [DetDataSample(metainfo=dict(meta)) for _ in range(batch)]}]
    from mmengine.runner import Runner

    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.update(batch_size=batch, num_workers=0, persistent_workers=False)
    loader_cfg["sampler"] = {"type": "DefaultSampler", "shuffle": False}
    loader = Runner.build_dataloader(loader_cfg)
    out = []
    for data in loader:
        if len(out) >= args.num_images // batch:
            break
        if len(data["inputs"]) == batch:
            out.append(data)
    if not out:
        raise ValueError(f"the test dataloader of {args.configs[0]} gave no full batch of {batch} images")
    return out


def count_detector(model: nn.Module, data: Sequence[dict], ctx) -> tuple[BackboneMacs, BackboneMacs, dict]:
    """One prediction of every batch: the ViT blocks' and patch embedding's MACs per image from the realised
    tokens (as run, and as a padded batch executes), and the MACs per image of every other convolution and
    linear layer from the shapes it saw, grouped by the detector's parts (``neck``, ``rpn_head``,
    ``roi_head``, and ``backbone`` for backbone layers outside the ViT blocks, such as ViT-Adapter's)."""
    backbone, parts, padded, images = model.backbone, [], [], 0
    if not hasattr(backbone, "record_tokens"):
        raise ValueError(
            f"the backbone {type(backbone).__name__} records no token counts: detector mode needs a tokenprune "
            "ViT backbone (TokenPruneViT or a subclass)"
        )
    by_tokens = [backbone.blocks, backbone.patch_embed] + ([backbone.reducer] if backbone.reducer else [])
    counter = LayerMacCounter(model, exclude=by_tokens)
    backbone.record_tokens = True
    try:
        with torch.no_grad(), ctx(), counter:
            for d in data:
                model(d["inputs"], d["data_samples"], mode="predict")
                images += d["inputs"].shape[0]
                hw = tuple(d["inputs"].shape[-2:])
                parts.append(backbone_macs(backbone, hw))
                padded.append(backbone_macs(backbone, hw, padded=True))
    finally:
        backbone.record_tokens = False
    rest = {k: v / images for k, v in counter.grouped(1).items()}
    return BackboneMacs.cat(parts), BackboneMacs.cat(padded), rest


def detector_flops(models: dict[str, nn.Module], data: dict[str, list], ctx, reference: str) -> dict[str, dict]:
    """:func:`flop_summary` of every detector on its preprocessed batches, with ``rest_macs_by_part``."""
    macs, padded, parts = {}, {}, {}
    for label, model in models.items():
        macs[label], padded[label], parts[label] = count_detector(model, data[label], ctx)
    other = {k: p.pop("backbone", 0.0) for k, p in parts.items()}
    rest = {k: sum(p.values()) for k, p in parts.items()}
    flops = flop_summary(macs, reference, padded, rest, other)
    for label in flops:
        flops[label]["rest_macs_by_part"] = parts[label]
    return flops


def predict_candidate(
    label: str, model: nn.Module, batches: Sequence[dict], ctx, backbone_only: bool = False
) -> Candidate:
    """A timed detector: prediction (or only its backbone's forward) on every preprocessed batch."""

    def run():
        with torch.no_grad(), ctx():
            for d in batches:
                if backbone_only:
                    model.backbone(d["inputs"])
                else:
                    model(d["inputs"], d["data_samples"], mode="predict")

    return Candidate(label, lambda: None, run)


def detector_data(args: argparse.Namespace, models: dict[str, nn.Module], cfg, batch: int) -> dict[str, list]:
    """The input batches of one run, preprocessed by each model's own data preprocessor: label -> batches."""
    raw = raw_detector_batches(args, cfg, batch)
    with torch.no_grad():
        return {label: [m.data_preprocessor(copy.deepcopy(r), False) for r in raw] for label, m in models.items()}


def detector_settings(args: argparse.Namespace) -> dict:
    if not args.dataset and (not args.size or len(args.size) not in (1, 2)):
        raise ValueError("give --size H W (random pixels) or --dataset (the first config's test images)")
    if args.size:
        args.size = [args.size[0], args.size[-1]]
    return {
        "configs": args.configs,
        "checkpoints": args.checkpoints,
        "size": args.size if not args.dataset else None,
        "dataset": bool(args.dataset),
        "num_images": args.num_images if args.dataset else None,
        "batch": args.batch,
        "seed": args.seed,
        "cfg_options": args.cfg_options,
        "backbone_only": getattr(args, "backbone_only", False),
        "head_work": getattr(args, "head_work", "auto"),
    }


def run_detector(args: argparse.Namespace) -> dict:
    device = setup_device(args)
    settings = detector_settings(args)
    models, cfgs = build_detectors(args)
    settings["head_work"] = args.head_work
    ctx = lambda: autocast(device, args.amp)  # noqa: E731
    env = environment(device, args.amp)
    timer = Timer(device)
    reference = next(iter(models))
    results = []
    for batch in args.batch:
        data = detector_data(args, models, cfgs[0], batch)
        n = len(data[reference])
        if not args.backbone_only:
            whole = [predict_candidate(k, m, data[k], ctx) for k, m in models.items()]
            det = speed_summary(time_round_robin(whole, args.runs, args.warmup, timer), reference, n, batch)
        backbones = [predict_candidate(k, m, data[k], ctx, backbone_only=True) for k, m in models.items()]
        bb = speed_summary(time_round_robin(backbones, args.runs, args.warmup, timer), reference, n, batch)
        flops = detector_flops(models, data, ctx, reference)
        entries = {}
        for label in models:
            f = flops[label]
            entries[label] = {
                "detector": None
                if args.backbone_only
                else {
                    **det[label],
                    "flop_bound": f["detector_flop_bound"],
                    "measured_over_bound": det[label]["speedup"] / f["detector_flop_bound"],
                },
                "backbone": {
                    **bb[label],
                    "flop_bound": f["flop_bound"],
                    "measured_over_bound": bb[label]["speedup"] / f["flop_bound"],
                },
                **{k: v for k, v in f.items() if k not in ("flop_bound", "detector_flop_bound")},
            }
        shapes = sorted({tuple(d["inputs"].shape[-2:]) for d in data[reference]})
        warning = head_work_note(flops)
        results.append(
            {
                "batch": batch,
                "num_batches": n,
                "input_hw": [list(s) for s in shapes],
                "head_work_warning": warning,
                "models": entries,
            }
        )
        print_detector_table(results[-1], args)
        if warning:
            print(warning)
    finish_environment(env)
    return {
        "tool": "benchmark",
        "mode": "detector",
        "environment": env,
        "settings": {**settings, "runs": args.runs, "warmup": args.warmup},
        "models": [{"label": label, "config": c} for label, c in zip(models, args.configs)],
        "results": results,
    }


def print_detector_table(result: dict, args: argparse.Namespace) -> None:
    shapes = ", ".join(f"{h}x{w}" for h, w in result["input_hw"])
    print(
        f"\nbatch {result['batch']} x {result['num_batches']} batch(es), padded input {shapes}, "
        f"{torch.get_num_threads()} threads, {args.runs} runs after {args.warmup} warm-ups"
    )
    print(f"  head workload: {HEAD_WORK_FIXED if args.head_work == 'fixed' else HEAD_WORK_CONFIGURED}")
    for part, macs_key in (("detector", "detector_macs"), ("backbone", "backbone_macs")):
        if any(m[part] is None for m in result["models"].values()):
            continue  # not timed (--backbone-only)
        rows = {label: {**m[part], "macs": m[macs_key]} for label, m in result["models"].items()}
        print_speed_rows(f"  {part}:", rows)
    print_keep_rates(result["models"])
