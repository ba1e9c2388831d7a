"""Token statistics of a token-reducing detector over a dataset split: realised keep rate per block (mean and
spread), the distribution of per-image keep rates, reactivation (how many tokens, after how many blocks), and
the share of kept tokens inside ground-truth objects against the share of object area.

Reads only the reducer's token maps (``TokenReducer.token_maps``; definitions in :mod:`tokenprune.analysis`),
so it works for every method. Runs the backbone alone (the heads do not change the tokens).

    python tools/analysis_tools/token_stats.py CONFIG CHECKPOINT --out-dir DIR [--split test]
        [--num-images N] [--batch-size 1] [--min-fraction 0.5] [--cfg-options k=v ...] [--device cpu]

Prints a table and writes ``DIR/token_stats.json`` and the plots ``DIR/keep_rate_per_block.png``,
``per_image_keep_rate.png``, ``reactivation.png`` and ``inside_objects.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

import tokenprune  # noqa: E402,F401  (registers the models; allow-lists checkpoint contents)
from tokenprune.analysis import TokenStatistics, json_ready, tokens_inside  # noqa: E402
from tokenprune.errors import ConfigError  # noqa: E402
from tokenprune.mmdet_plugin.analysis import (  # noqa: E402
    batches,
    image_area,
    load_detector,
    object_masks,
    run_batch,
    split_dataset,
)
from tokenprune.mmdet_plugin.cli import report_errors  # noqa: E402

PLOTS = ("keep_rate_per_block.png", "per_image_keep_rate.png", "reactivation.png", "inside_objects.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Keep-rate, reactivation and inside-object token statistics")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--out-dir", required=True, help="folder for token_stats.json and the plots")
    parser.add_argument("--split", choices=["train", "val", "test"], default="test", help="dataset split")
    parser.add_argument("--num-images", type=int, help="only the first N images of the split")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward (padded to the largest)")
    parser.add_argument(
        "--min-fraction", type=float, default=0.5, help="a token is inside an object if this share of its pixels is"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override config settings, e.g. model.backbone.reducer=..."
    )
    return parser.parse_args(argv)


def reducer_targets(model, blocks: list[int]) -> dict[int, float]:
    """Block -> the reducer's nominal keep fraction after it (``reducer.keep_schedule()``: the keep targets of
    SViT, TPC and DynamicViT, the running product of the keep ratios of the others), for the blocks in ``blocks``;
    empty without a reducer or for a budget in absolute counts (``r``)."""
    reducer = getattr(model.backbone, "reducer", None)
    if reducer is None:
        return {}
    depth = getattr(model.backbone, "depth", None)
    try:
        schedule = reducer.keep_schedule(depth)
    except ValueError:  # r budgets: the fraction depends on the image size
        return {}
    return {int(b): float(t) for b, t in zip(reducer.reduced_blocks(depth), schedule) if int(b) in blocks}


def collect(model, dataset, num: int, batch_size: int, min_fraction: float) -> TokenStatistics:
    """Run the backbone over the first ``num`` images and accumulate their token statistics."""
    stats = TokenStatistics(min_fraction=min_fraction)
    progress = ProgressBar(num, file=sys.stderr)
    for batch in batches((dataset[i] for i in range(num)), batch_size):
        out = run_batch(model, batch, predict=False)
        pad_hw = tuple(out.images.shape[1:3])
        objects = object_masks(out.data_samples, pad_hw)
        inside = None if objects is None else tokens_inside(objects, out.patch, out.grid_hw, min_fraction)
        valid = tokens_inside(image_area(out.data_samples, pad_hw), out.patch, out.grid_hw, min_fraction)
        if not out.token_maps and inside is None:
            inside = valid & False  # a dense model on images without masks: only the counts
        ids = [s.metainfo.get("img_id", s.metainfo.get("img_path")) for s in out.data_samples]
        stats.update(out.token_maps, inside, valid, ids)
        for _ in batch:
            progress.update()
    sys.stderr.write("\n")
    return stats


def plot_all(summary: dict, targets: dict[int, float], out_dir: str) -> list[str]:
    """The four plots; returns their paths."""
    blocks = summary["blocks"]
    keys = [f"block{b}" for b in blocks]
    x = np.arange(len(blocks))
    paths = [osp.join(out_dir, name) for name in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    if blocks:
        per_block = [[r["keep_rate"][g] for r in summary["per_image"]] for g in range(len(blocks))]
        ax.boxplot(per_block, positions=x, widths=0.5, showfliers=True, flierprops=dict(markersize=2))
        ax.plot(x, [summary["keep_rate"][k]["mean"] for k in keys], "o", color="C0", label="mean over images")
        if targets:
            ax.plot([blocks.index(b) for b in targets], list(targets.values()), "x", color="C3", label="target")
        ax.legend(fontsize=8)
    ax.set_xticks(x, [str(b) for b in blocks])
    ax.set(xlabel="block", ylabel="keep rate per image", ylim=(0, 1.05), title="Realised keep rate per block")
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    p = summary["per_image_keep_rate"]
    edges = p["histogram"]["edges"]
    ax.stairs(p["histogram"]["counts"], edges, fill=True, alpha=0.7)
    if math.isfinite(p["mean"]):
        ax.axvline(p["mean"], color="C3", label=f"mean {p['mean']:.3f}")
        ax.legend(fontsize=8)
    ax.set(xlabel="image's keep rate (mean over reducing blocks)", ylabel="images", title="Per-image keep rate")
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)

    r = summary["reactivation"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    ax1.bar(x, [r["per_block"][k]["share_of_kept_tokens"] for k in keys])
    ax1.set_xticks(x, [str(b) for b in blocks])
    ax1.set(xlabel="block", ylabel="share of the block's tokens", title="Reactivated tokens")
    gaps = r["gap_histogram"]
    total = max(sum(gaps.values()), 1)
    ax2.bar([int(g) for g in gaps], [n / total for n in gaps.values()])
    ax2.set(xlabel="reducing blocks away before coming back", ylabel="share of reactivations", title="Reactivation gap")
    fig.savefig(paths[2], dpi=90)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), layout="constrained")
    inside = summary.get("inside_objects")
    if inside:
        ax1.plot(x, [inside["kept_share"][k] for k in keys], "o-", label="kept tokens inside objects")
        ax1.axhline(inside["area_share"], color="C3", ls="--", label=f"object area share {inside['area_share']:.3f}")
        ax2.plot(x, [inside["keep_rate_inside"][k] for k in keys], "o-", label="object tokens")
        ax2.plot(x, [inside["keep_rate_background"][k] for k in keys], "s-", label="background tokens")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x, [str(b) for b in blocks])
        ax.set(xlabel="block", ylim=(0, 1.05))
    ax1.set(ylabel="share", title="Where the kept tokens are")
    ax2.set(ylabel="keep rate", title="Keep rate: objects vs background")
    fig.savefig(paths[3], dpi=90)
    plt.close(fig)
    return paths


def run(argv: list[str] | None = None) -> dict:
    """The tool, on command-line arguments ``argv`` (default: sys.argv); returns the JSON it wrote."""
    args = parse_args(argv)
    if args.batch_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise ConfigError(f"--batch-size and --num-images must be >= 1, got {args.batch_size}, {args.num_images}")
    model, cfg = load_detector(args.config, args.checkpoint, args.cfg_options, args.device)
    dataset = split_dataset(cfg, args.split)
    num = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    stats = collect(model, dataset, num, args.batch_size, args.min_fraction)
    summary = stats.summary()
    targets = reducer_targets(model, summary["blocks"])
    summary = {
        "config": args.config,
        "checkpoint": args.checkpoint,
        "split": args.split,
        "targets": {f"block{b}": t for b, t in targets.items()},
        **summary,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(osp.join(args.out_dir, "token_stats.json"), "w") as f:
        json.dump(json_ready(summary), f, indent=1, allow_nan=False)
    plot_all(summary, targets, args.out_dir)
    print(stats.table())
    print(f"wrote {osp.join(args.out_dir, 'token_stats.json')} and {', '.join(PLOTS)}")
    return summary


@report_errors
def main() -> None:
    run()


if __name__ == "__main__":
    main()
