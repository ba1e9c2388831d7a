"""Pictures of what a token reducer did: per image, the network input with the detections, and one panel per
reducing block showing the kept, pruned and reactivated tokens (and, for merging methods, the clusters).

Reads only the reducer's token maps (``TokenReducer.token_maps``), so it works for every method; a dense model
gives the image panel alone. Images are drawn at the network input (after the test pipeline's resize and the
batch padding), where the 16x16 tokens are.

    python tools/analysis_tools/visualize_tokens.py CONFIG CHECKPOINT --out-dir DIR
        [--images a.jpg b.jpg | --split {train,val,test} [--indices 0 5 9 | --num-images 8]]
        [--score-thr 0.3] [--cfg-options k=v ...] [--device cpu]

Writes ``DIR/<image name>.png`` per image.
"""

from __future__ import annotations

import argparse
import io
import os
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402
from PIL import Image  # noqa: E402

import tokenprune  # noqa: E402,F401  (registers the models; allow-lists checkpoint contents)
from tokenprune.analysis import (  # noqa: E402
    KEPT,
    MERGED,
    PRUNED_STATE,
    REACTIVATED,
    analyse_token_maps,
    position_states,
)
from tokenprune.errors import ConfigError  # noqa: E402
from tokenprune.mmdet_plugin.analysis import (  # noqa: E402
    batches,
    image_file_items,
    load_detector,
    run_batch,
    split_dataset,
)
from tokenprune.mmdet_plugin.cli import report_errors  # noqa: E402

STATE_RGBA = {
    KEPT: (0.0, 0.0, 0.0, 0.0),
    PRUNED_STATE: (0.0, 0.0, 0.0, 0.7),
    REACTIVATED: (1.0, 0.5, 0.0, 0.6),
}
CLUSTER_COLORS = plt.get_cmap("tab20").colors
CLUSTER_ALPHA = 0.45


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Draw the tokens each reducing block kept, pruned and reactivated")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--out-dir", required=True, help="folder for the PNG files")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="image files (default: images of --split)")
    source.add_argument("--split", choices=["train", "val", "test"], default="test", help="dataset split")
    parser.add_argument("--indices", type=int, nargs="+", help="dataset indices to draw (default: the first ones)")
    parser.add_argument("--num-images", type=int, default=4, help="how many images of the split, without --indices")
    parser.add_argument("--score-thr", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("--max-dets", type=int, default=20, help="draw at most this many detections per image")
    parser.add_argument("--panel-size", type=float, default=2.4, help="inches per panel")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--colors", type=int, default=256, help="palette colours of the PNG (0: full colour)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override config settings, e.g. model.backbone.reducer=..."
    )
    return parser.parse_args(argv)


def class_colors(meta: dict, num: int) -> list[tuple[float, float, float]]:
    palette = meta.get("palette")
    if isinstance(palette, list) and len(palette) >= num:
        return [tuple(c / 255 for c in color) for color in palette]
    return [plt.get_cmap("tab10")(i % 10)[:3] for i in range(num)]


def draw_detections(ax, sample, classes: list[str], colors: list, score_thr: float, max_dets: int) -> int:
    """Boxes, labels and translucent masks of the detections scoring at least ``score_thr``; returns how many."""
    pred = sample.get("pred_instances")
    if pred is None:
        return 0
    keep = (pred.scores >= score_thr).nonzero().flatten()[:max_dets]
    for i in keep.tolist():
        label = int(pred.labels[i])
        color = colors[label % len(colors)]
        x0, y0, x1, y1 = pred.bboxes[i].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        name = classes[label] if label < len(classes) else str(label)
        box = dict(facecolor=color, alpha=0.8, pad=0.5, linewidth=0)
        ax.text(x0, y0, f"{name} {float(pred.scores[i]):.2f}", color="white", fontsize=6, va="bottom", bbox=box)
        if "masks" in pred:
            mask = pred.masks[i].cpu().numpy().astype(bool)
            rgba = np.zeros((*mask.shape, 4))
            rgba[mask] = (*color, 0.4)
            ax.imshow(rgba, extent=(0, mask.shape[1], mask.shape[0], 0), interpolation="nearest")
    return len(keep)


def token_overlay(states: np.ndarray, ids: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 4) RGBA per token: pruned dark, reactivated orange, merged clusters in their colour, kept clear."""
    rgba = np.array([STATE_RGBA.get(int(s), (0, 0, 0, 0)) for s in states], dtype=float)
    for pos in np.nonzero(states == MERGED)[0]:
        rgba[pos] = (*CLUSTER_COLORS[int(ids[pos]) % len(CLUSTER_COLORS)], CLUSTER_ALPHA)
    return rgba.reshape(*grid_hw, 4)


def cluster_edges(ids: np.ndarray, states: np.ndarray, grid_hw: tuple[int, int], patch: int) -> list:
    """Line segments between neighbouring tokens of different ids where one of them is merged."""
    h, w = grid_hw
    grid, merged = ids.reshape(h, w), (states == MERGED).reshape(h, w)
    segments = []
    for y, x in zip(*np.nonzero((grid[:, 1:] != grid[:, :-1]) & (merged[:, 1:] | merged[:, :-1]))):
        segments.append([((x + 1) * patch, y * patch), ((x + 1) * patch, (y + 1) * patch)])
    for y, x in zip(*np.nonzero((grid[1:] != grid[:-1]) & (merged[1:] | merged[:-1]))):
        segments.append([(x * patch, (y + 1) * patch), ((x + 1) * patch, (y + 1) * patch)])
    return segments


def draw_image(path: str, image: np.ndarray, sample, analysis, index: int, grid_hw, patch, args, meta) -> None:
    """One figure: the image with its detections, then one panel per reducing block."""
    blocks = analysis.blocks
    panels = 1 + len(blocks)
    cols = min(panels, 5)
    rows = -(-panels // cols)
    size = (args.panel_size * cols, (args.panel_size + 0.25) * rows + 0.6)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    H, W = image.shape[:2]
    extent = (0, grid_hw[1] * patch, grid_hw[0] * patch, 0)
    classes = list(meta.get("classes", []))
    ax = axes.flat[0]
    ax.imshow(image, extent=(0, W, H, 0))
    n = draw_detections(ax, sample, classes, class_colors(meta, max(len(classes), 1)), args.score_thr, args.max_dets)
    ax.set_title(f"{n} detections >= {args.score_thr:g}", fontsize=8)
    ax.set_xlim(0, extent[1])
    ax.set_ylim(extent[2], 0)
    states = position_states(analysis, index).numpy() if blocks else None
    merged_any = False
    for g, block in enumerate(blocks):
        ax = axes.flat[g + 1]
        ids = analysis.ids[g, index].numpy()
        ax.imshow(image, extent=(0, W, H, 0))
        ax.imshow(token_overlay(states[g], ids, grid_hw), extent=extent, interpolation="nearest")
        segments = cluster_edges(ids, states[g], grid_hw, patch)
        if segments:
            merged_any = True
            ax.add_collection(LineCollection(segments, colors="white", linewidths=0.6))
        ax.set_xlim(0, extent[1])
        ax.set_ylim(extent[2], 0)
        keep = float(analysis.keep_rate[g, index])
        react = int(analysis.reactivated[g, index].sum())
        ax.set_title(f"block {block}: keep {keep:.2f}" + (f", {react} back" if react else ""), fontsize=8)
    present = set(np.unique(states).tolist()) if blocks else set()
    legend = [Patch(facecolor="none", edgecolor="gray", label="kept")]
    if PRUNED_STATE in present:
        legend.append(Patch(facecolor="black", alpha=STATE_RGBA[PRUNED_STATE][3], label="pruned"))
    if REACTIVATED in present:
        legend.append(
            Patch(facecolor=STATE_RGBA[REACTIVATED][:3], alpha=STATE_RGBA[REACTIVATED][3], label="reactivated")
        )
    if merged_any:
        legend.append(Patch(facecolor=CLUSTER_COLORS[0], alpha=CLUSTER_ALPHA, label="merged (one colour per token)"))
    name = osp.basename(sample.get("img_path", "") or "")
    if blocks:
        fig.suptitle(f"{name}  ({grid_hw[0]}x{grid_hw[1]} tokens, {len(blocks)} reducing blocks)", fontsize=9)
    else:
        fig.suptitle(f"{name}\ndense: all {grid_hw[0]}x{grid_hw[1]} tokens in every block", fontsize=8)
    if blocks:
        fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=7, frameon=False)
    save_png(fig, path, args.dpi, args.colors)


def save_png(fig, path: str, dpi: int, colors: int) -> None:
    """Save ``fig`` as PNG; ``colors`` > 0 quantises it to that many palette colours (files several times
    smaller, for docs), 0 keeps full colour."""
    if not colors:
        fig.savefig(path, dpi=dpi)
    else:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi)
        buffer.seek(0)
        Image.open(buffer).convert("RGB").quantize(colors=colors).save(path, optimize=True)
    plt.close(fig)


def select_items(args, cfg):
    """(number of images, iterator of packed samples) from --images or the split."""
    if args.images:
        return len(args.images), image_file_items(cfg, args.images)
    dataset = split_dataset(cfg, args.split)
    indices = args.indices if args.indices is not None else list(range(min(args.num_images, len(dataset))))
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise ConfigError(f"--indices {bad} are outside the {args.split} split of {len(dataset)} images")
    return len(indices), (dataset[i] for i in indices)


def output_name(sample, taken: set[str]) -> str:
    stem = osp.splitext(osp.basename(sample.get("img_path", "") or f"image_{sample.get('img_id', 0)}"))[0]
    name, k = stem, 1
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    taken.add(name)
    return name


def run(argv: list[str] | None = None) -> list[str]:
    """The tool, on command-line arguments ``argv`` (default: sys.argv); returns the PNG paths written."""
    args = parse_args(argv)
    model, cfg = load_detector(args.config, args.checkpoint, args.cfg_options, args.device)
    meta = dict(model.dataset_meta or {})
    num, items = select_items(args, cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    written, taken = [], set()
    progress = ProgressBar(num, file=sys.stderr)
    for batch in batches(items, 1):
        out = run_batch(model, batch, predict=True)
        analysis = analyse_token_maps(out.token_maps)
        for i, sample in enumerate(out.data_samples):
            path = osp.join(args.out_dir, output_name(sample, taken) + ".png")
            draw_image(path, out.images[i].numpy(), sample, analysis, i, out.grid_hw, out.patch, args, meta)
            written.append(path)
            progress.update()
    print(f"\nwrote {len(written)} images to {args.out_dir}")
    return written


@report_errors
def main() -> None:
    run()


if __name__ == "__main__":
    main()
