"""MACs of the backbone (per block) and of the whole detector, dense against pruned, counted on given inputs.

A static counter traces one forward and sees no saving from a reducer that gathers a data-dependent number of
tokens. Here each block's cost is computed from the tokens it really ran on these inputs
(:mod:`tokenprune.models.flops`): qkv, q @ k^T and attn @ v over n queries x n keys, the output projection
and the MLP; the patch embedding; and the reducer's own work (gates, scores, matching). In ViTDet's windowed
blocks (``--arch vitdet-*``) attention is counted per window: a dense windowed block runs every window of the
grid padded to whole windows, and one a reducer ran on the kept tokens of each window costs sum over windows of
n_w tokens through qkv and the projection and 2 n_w^2 C for q @ k^T and attn @ v, n_w read from its token
maps. In ``detector`` mode the neck and heads are counted from the shapes their convolutions and linear layers
saw in a real prediction (forward hooks), so the RoI heads count the proposals and detections of these images;
RoIAlign, NMS, normalisation and activations are not counted. Everything is in MACs per image (1 MAC = 2 FLOPs;
the "GFLOPs" of the ViT papers and of MMDetection's get_flops are MACs).

    python tools/analysis_tools/get_flops.py backbone --arch deit-s --size 512 512 \\
        --reducer none 'SViT:{"inference": "fixed"}' [--images DIR] [--json-out flops.json]
    python tools/analysis_tools/get_flops.py backbone --arch vitdet-b --size 1024 1024 --reducer none all
    python tools/analysis_tools/get_flops.py detector configs/dense/X.py configs/svit/Y.py \\
        [--checkpoints a.pth b.pth] [--size 800 1216 | --dataset --num-images 20]

The backbone mode needs torch + timm only.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from collections.abc import Sequence

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

import tokenprune.benchmarking as bench  # noqa: E402


def print_blocks(title: str, models: dict[str, dict]) -> None:
    """Per-block tokens and GMACs of each model, then the totals and the FLOP-bound speed-up."""
    labels = list(models)
    short = [f"#{i}" for i in range(len(labels))]
    print(title)
    for tag, label in zip(short, labels):
        print(f"  {tag} = {label}")
    print("  " + f"{'block':>5} " + " ".join(f"{t + ' tokens':>11} {t + ' GMACs':>10}" for t in short))
    for i in range(len(models[labels[0]]["block_macs"])):
        cells = [f"{models[k]['tokens'][i]:11.1f} {models[k]['block_macs'][i] / 1e9:10.3f}" for k in labels]
        print("  " + f"{i:>5} " + " ".join(cells))
    rows = [("patch embed", "patch_embed_macs"), ("reducer", "reducer_macs")]
    if "backbone_other_macs" in models[labels[0]]:
        rows.append(("other layers", "backbone_other_macs"))
    rows.append(("backbone", "backbone_macs"))
    if "detector_macs" in models[labels[0]]:
        rows += [("neck + heads", "rest_macs"), ("detector", "detector_macs")]
    for name, key in rows:
        print("  " + f"{name:>12} " + " ".join(f"{models[k][key] / 1e9:10.3f}" for k in labels) + "  GMACs/img")
    print("  " + f"{'FLOP bound':>12} " + " ".join(f"{models[k]['flop_bound']:9.2f}x" for k in labels) + "  backbone")
    if "detector_flop_bound" in models[labels[0]]:
        bounds = " ".join(f"{models[k]['detector_flop_bound']:9.2f}x" for k in labels)
        print("  " + f"{'':>12} " + bounds + "  detector")


def run_backbone(args: argparse.Namespace) -> dict:
    device = bench.setup_device(args)
    setup = bench.setup_backbone_models(args, device)
    backbone, reducers = setup.backbone, setup.reducers
    ctx = lambda: bench.autocast(device, args.amp)  # noqa: E731
    results = []
    for batch in args.batch:
        batches = bench.backbone_batches(args, batch, device)
        macs, padded, stats = {}, {}, {}
        for label, reducer in reducers.items():
            backbone.set_reducer(reducer)
            macs[label], padded[label], stats[label] = bench.count_backbone(backbone, batches, ctx)
        models = bench.flop_summary(macs, "dense", padded)
        for label in models:
            models[label]["stats"] = stats[label]
        results.append({"batch": batch, "num_images": batch * len(batches), "models": models})
        h, w = batches[0].shape[-2:]
        print_blocks(f"\nbackbone MACs per image, input {h}x{w}, batch {batch}, {batch * len(batches)} images:", models)
        bench.print_skipped(setup.skipped)
    backbone.set_reducer(None)
    return {
        "tool": "get_flops",
        "mode": "backbone",
        "unit": "MACs per image (1 MAC = 2 FLOPs)",
        "settings": bench.backbone_settings(args, backbone),
        "models": setup.models_json(),
        "skipped": setup.skipped_json(),
        "results": results,
        "notes": setup.notes,
    }


def run_detector(args: argparse.Namespace) -> dict:
    from tokenprune.mmdet_plugin import benchmarking as det_bench

    device = bench.setup_device(args)
    settings = det_bench.detector_settings(args)
    detectors, cfgs = det_bench.build_detectors(args)
    settings["head_work"] = args.head_work
    ctx = lambda: bench.autocast(device, args.amp)  # noqa: E731
    reference = next(iter(detectors))
    results = []
    for batch in args.batch:
        data = det_bench.detector_data(args, detectors, cfgs[0], batch)
        models = det_bench.detector_flops(detectors, data, ctx, reference)
        shapes = sorted({tuple(d["inputs"].shape[-2:]) for d in data[reference]})
        images = batch * len(data[reference])
        results.append({"batch": batch, "num_images": images, "input_hw": [list(s) for s in shapes], "models": models})
        hw = ", ".join(f"{h}x{w}" for h, w in shapes)
        print_blocks(f"\ndetector MACs per image, padded input {hw}, batch {batch}, {images} images:", models)
        for label, m in models.items():
            parts = {"backbone outside the blocks": m["backbone_other_macs"], **m["rest_macs_by_part"]}
            print(f"  {label}: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in parts.items()) + " GMACs/img")
    return {
        "tool": "get_flops",
        "mode": "detector",
        "unit": "MACs per image (1 MAC = 2 FLOPs)",
        "settings": settings,
        "models": [{"label": label, "config": c} for label, c in zip(detectors, args.configs)],
        "results": results,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    bb = sub.add_parser("backbone", help="the ViT backbone alone (torch + timm only)")
    bench.add_backbone_model_args(bb)
    bench.add_common_args(bb, timing=False)
    det = sub.add_parser("detector", help="whole MMDetection detectors")
    bench.add_detector_model_args(det)
    bench.add_common_args(det, timing=False)
    for p in (bb, det):
        p.set_defaults(batch=[1])
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Count the MACs of ``argv`` (the command line without the program name); returns the JSON dict."""
    args = build_parser().parse_args(argv)
    return bench.run_cli(run_backbone if args.mode == "backbone" else run_detector, args)


if __name__ == "__main__":
    main()
