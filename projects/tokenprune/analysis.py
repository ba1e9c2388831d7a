"""What a token reducer did, from its token maps alone: keep rates, reactivation, tokens inside objects.

Works for every method behind :class:`tokenprune.models.reducers.base.TokenReducer`, because it reads only
``TokenReducer.token_maps`` (``backbone.last_record.token_maps`` after a forward with
``backbone.record_tokens = True``): per reducing block a (B, h*w) long tensor over the patch grid, ``PRUNED``
(-1) where that block's input did not carry the position, otherwise the id of the token carrying it; merged
positions share an id.

Definitions (used by ``tools/analysis_tools/token_stats.py``, ``visualize_tokens.py`` and ``TokenStatsHook``):

- **keep rate** of a block: tokens the block ran (distinct ids) / positions h*w. For a pruning method it is
  the kept fraction (SViT's ``keep_rate``); for a merging method it counts each merged token once.
- **coverage**: positions carried (merged or not) / positions.
- **reactivated** at reducing block b_j: carried at b_j and not carried at the previous reducing block
  b_(j-1). Its **gap** is the number of consecutive reducing blocks before b_j that did not carry it: 1 = it
  came back at the next reducing block (SViT's reducing blocks are consecutive, so that is the next block).
- **inside objects**: a token (a ``patch`` x ``patch`` pixel square of the network input, after the test
  pipeline's resize and the batch padding) is inside if at least ``min_fraction`` (default 0.5) of its pixels
  are object pixels, i.e. in the union of the ground-truth masks resized like the image. Tokens of which less
  than ``min_fraction`` are image pixels (mostly padding) are left out of the inside/background shares.
- **kept share inside objects**: of the tokens a block ran, the share inside objects. A position carried by a
  token that stands for k positions weighs 1/k, so every token counts once (for pruning: the share of kept
  positions that are inside). Compared with the **area share**: the share of all (valid) tokens inside.

Only torch and numpy: the functions here are tested on hand-made maps and masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .models.reducers.base import PRUNED

# position states of :func:`position_states`, in drawing priority
KEPT, PRUNED_STATE, REACTIVATED, MERGED = 0, 1, 2, 3


@dataclass
class TokenMapAnalysis:
    """Per image and reducing block, what happened to every patch position.

    Attributes:
        blocks: The reducing blocks, increasing (G of them).
        ids: (G, B, N) the token maps stacked, N = h*w.
        carried: (G, B, N) bool, the block's input carried the position.
        cluster_size: (G, B, N) long, positions sharing the carrying token (1 = on its own), 0 where pruned.
        reactivated: (G, B, N) bool, carried here and not at the previous reducing block.
        gap: (G, B, N) long, for reactivated positions the number of reducing blocks it was away, else 0.
    """

    blocks: list[int]
    ids: Tensor
    carried: Tensor
    cluster_size: Tensor
    reactivated: Tensor
    gap: Tensor

    @property
    def weight(self) -> Tensor:
        """(G, B, N) float: 1 / cluster size where carried, 0 where pruned; sums to the token count."""
        return self.carried.float() / self.cluster_size.clamp(min=1).float()

    @property
    def keep_rate(self) -> Tensor:
        """(G, B) tokens run / positions."""
        return self.weight.sum(-1) / self.ids.shape[-1]

    @property
    def coverage(self) -> Tensor:
        """(G, B) positions carried / positions."""
        return self.carried.float().mean(-1)

    @property
    def merged_fraction(self) -> Tensor:
        """(G, B) positions carried by a token standing for more than one position / positions."""
        return (self.cluster_size > 1).float().mean(-1)


def analyse_token_maps(token_maps: dict[int, Tensor], shape: tuple[int, int] = (0, 0)) -> TokenMapAnalysis:
    """Token maps (block -> (B, N) long) -> :class:`TokenMapAnalysis`; every map must have the same shape. An
    empty dict (a dense model) gives G = 0 blocks of ``shape`` (B, N)."""
    blocks = sorted(int(b) for b in token_maps)
    if not blocks:
        empty = torch.zeros(0, *shape, dtype=torch.long)
        return TokenMapAnalysis([], empty, empty.bool(), empty, empty.bool(), empty)
    shapes = {tuple(token_maps[b].shape) for b in blocks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"token maps must all be (B, h*w) tensors of one shape, got shapes {sorted(shapes)}")
    ids = torch.stack([token_maps[b].detach().long().cpu() for b in blocks])
    if ids.numel() and int(ids.min()) < PRUNED:
        raise ValueError(f"token maps hold ids >= 0 and PRUNED ({PRUNED}) only, got {int(ids.min())}")
    G, B, N = ids.shape
    carried = ids >= 0
    # cluster sizes: count equal ids within each (block, image) row, by making ids unique across rows
    flat = ids.reshape(G * B, N)
    span = int(flat.max()) + 2
    keys = torch.arange(G * B)[:, None] * span + flat + 1
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    cluster_size = torch.where(carried, counts[inverse].reshape(G, B, N), torch.zeros_like(ids))
    reactivated = torch.zeros_like(carried)
    gap = torch.zeros_like(ids)
    away = torch.zeros(B, N, dtype=torch.long)  # consecutive reducing blocks not carrying the position
    for g in range(G):
        if g > 0:
            reactivated[g] = carried[g] & ~carried[g - 1]
            gap[g] = torch.where(reactivated[g], away, torch.zeros_like(away))
        away = torch.where(carried[g], torch.zeros_like(away), away + 1)
    return TokenMapAnalysis(blocks, ids, carried, cluster_size, reactivated, gap)


def keep_rates(token_maps: dict[int, Tensor]) -> dict[int, Tensor]:
    """Token maps -> block -> (B,) keep rate (tokens run / positions) of each image."""
    analysis = analyse_token_maps(token_maps)
    return {b: analysis.keep_rate[g] for g, b in enumerate(analysis.blocks)}


def patch_fractions(mask: Tensor, patch: int, grid_hw: tuple[int, int] | None = None) -> Tensor:
    """Fraction of set pixels in every patch.

    Args:
        mask: (H, W) or (B, H, W) bool or float pixel mask of the network input.
        patch: Patch size in pixels.
        grid_hw: Token grid (h, w); the mask is padded with zeros (bottom, right) to (h * patch, w * patch).
            Default: ceil(H / patch), ceil(W / patch), as the backbone pads.

    Returns:
        (B, h*w) float in [0, 1], row-major like the token maps ((1, h*w) for an (H, W) mask).
    """
    m = mask.float()
    if m.dim() == 2:
        m = m[None]
    H, W = m.shape[-2:]
    h, w = grid_hw if grid_hw is not None else (math.ceil(H / patch), math.ceil(W / patch))
    if H > h * patch or W > w * patch:
        raise ValueError(f"a mask of {H}x{W} pixels does not fit a {h}x{w} grid of {patch}-pixel patches")
    m = F.pad(m, (0, w * patch - W, 0, h * patch - H))
    return F.avg_pool2d(m[:, None], patch).flatten(1)


def tokens_inside(
    mask: Tensor, patch: int, grid_hw: tuple[int, int] | None = None, min_fraction: float = 0.5
) -> Tensor:
    """(B, h*w) bool: at least ``min_fraction`` of the token's pixels are set in ``mask`` (see
    :func:`patch_fractions`)."""
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    return patch_fractions(mask, patch, grid_hw) >= min_fraction - 1e-6


def position_states(analysis: TokenMapAnalysis, image: int) -> Tensor:
    """(G, N) long drawing state of each position of one image at each reducing block: ``KEPT``,
    ``PRUNED_STATE``, ``REACTIVATED`` (carried again after being pruned) or ``MERGED`` (carried by a token of
    several positions; a reactivated position shows as reactivated)."""
    states = torch.full_like(analysis.ids[:, image], KEPT)
    states[analysis.cluster_size[:, image] > 1] = MERGED
    states[analysis.reactivated[:, image]] = REACTIVATED
    states[~analysis.carried[:, image]] = PRUNED_STATE
    return states


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, population std, min, 5th/50th/95th percentile and max of finite values (NaN if none)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {k: float("nan") for k in ("mean", "std", "min", "p05", "median", "p95", "max")}
    p05, p50, p95 = np.percentile(v, [5, 50, 95])
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "p05": float(p05),
        "median": float(p50),
        "p95": float(p95),
        "max": float(v.max()),
    }


def json_ready(obj):
    """``obj`` with NaN and infinite floats replaced by None, so strict JSON parsers read it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


class TokenStatistics:
    """Accumulates token-map statistics over images; :meth:`summary` gives the JSON-ready result.

    Feed it batch by batch with :meth:`update`. See the module docstring for the definitions.

    Args:
        min_fraction: The share of a token's pixels that must be object pixels for it to count as inside
            an object (and image pixels for it to count at all), in (0, 1].
        bins: Histogram bins of the per-image keep rate over [0, 1].
    """

    def __init__(self, min_fraction: float = 0.5, bins: int = 20) -> None:
        if not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
        self.min_fraction = min_fraction
        self.bins = bins
        self.blocks: list[int] | None = None
        self.images: list[dict] = []
        self.gap_counts: dict[int, int] = {}

    def update(
        self,
        token_maps: dict[int, Tensor],
        inside: Tensor | None = None,
        valid: Tensor | None = None,
        image_ids: Sequence | None = None,
    ) -> TokenMapAnalysis:
        """Add a batch.

        Args:
            token_maps: Block -> (B, N) token maps of the batch (empty for a dense model: then ``inside`` is
                required, to know B and N).
            inside: (B, N) bool, the token is inside an object (:func:`tokens_inside`); None: no object
                statistics for these images.
            valid: (B, N) bool, the token counts for the inside/background shares (mostly image pixels, not
                padding); None: all.
            image_ids: B ids stored with the per-image values.

        Returns:
            The batch's :class:`TokenMapAnalysis`.
        """
        if token_maps:
            B, N = next(iter(token_maps.values())).shape
        elif inside is not None:
            B, N = inside.shape
        else:
            raise ValueError("a dense model's batch (no token maps) needs `inside` to know its images")
        analysis = analyse_token_maps(token_maps, (B, N))
        if self.blocks is None:
            self.blocks = analysis.blocks
        elif analysis.blocks != self.blocks:
            raise ValueError(f"token maps of blocks {analysis.blocks} after batches of blocks {self.blocks}")
        for name, t in (("inside", inside), ("valid", valid)):
            if t is not None and tuple(t.shape) != (B, N):
                raise ValueError(f"{name} must be (B, N) = ({B}, {N}) like the token maps, got {tuple(t.shape)}")
        if image_ids is not None and len(image_ids) != B:
            raise ValueError(f"got {len(image_ids)} image ids for a batch of {B} images")
        valid = torch.ones(B, N, dtype=torch.bool) if valid is None else valid.bool().cpu()
        keep, cover, merged = analysis.keep_rate, analysis.coverage, analysis.merged_fraction
        weight = analysis.weight
        for gap in analysis.gap[analysis.reactivated].tolist():
            self.gap_counts[gap] = self.gap_counts.get(gap, 0) + 1
        for i in range(B):
            record = {
                "image_id": image_ids[i] if image_ids is not None else len(self.images),
                "num_tokens": N,
                "keep_rate": keep[:, i].tolist(),
                "coverage": cover[:, i].tolist(),
                "merged_fraction": merged[:, i].tolist(),
                "kept_tokens": weight[:, i].sum(-1).tolist(),
                "reactivated": analysis.reactivated[:, i].sum(-1).tolist(),
                "reactivated_tokens": (weight[:, i] * analysis.reactivated[:, i]).sum(-1).tolist(),
                "ever_reactivated": int(analysis.reactivated[:, i].any(0).sum()) if analysis.blocks else 0,
            }
            if inside is not None:
                inn, ok = inside[i].bool().cpu() & valid[i], valid[i]
                w = weight[:, i]
                record.update(
                    valid_tokens=int(ok.sum()),
                    inside_tokens=int(inn.sum()),
                    kept_valid=(w * ok).sum(-1).tolist(),
                    kept_inside=(w * inn).sum(-1).tolist(),
                )
            self.images.append(record)
        return analysis

    def summary(self) -> dict:
        """Everything, JSON-ready (NaN where undefined):

        - ``blocks``, ``num_images``, ``min_fraction``, ``definitions``;
        - ``keep_rate``: block -> spread over images (mean, std, min, p05, median, p95, max) of the keep rate;
          ``coverage`` and ``merged_fraction``: block -> mean over images;
        - ``per_image_keep_rate``: the mean over blocks of each image's keep rate: ``values``, the spread, and
          ``histogram`` (``edges``, ``counts``);
        - ``reactivation``: per block the mean over images of the reactivated fraction of positions and the
          pooled share of the block's tokens that were reactivated; ``share_of_kept_tokens`` pooled over
          blocks after the first; ``positions_ever_reactivated`` (mean over images); ``gap_histogram``
          (gap -> count) and ``share_at_gap_1``;
        - ``inside_objects`` (images with ground truth only): ``area_share`` (pooled: inside tokens / valid
          tokens), per block ``kept_share`` (pooled: kept tokens inside / kept tokens), ``keep_rate_inside``
          and ``keep_rate_background`` (pooled), ``images_above_area_share`` (fraction of images whose kept
          share exceeds their own area share), ``kept_share_mean_over_blocks`` and ``kept_share_all_blocks``
          (pooled over blocks: every token any reducing block ran);
        - ``per_image``: the per-image records.
        """
        blocks = self.blocks or []
        keys = [f"block{b}" for b in blocks]
        imgs = self.images
        out: dict = {
            "num_images": len(imgs),
            "blocks": blocks,
            "min_fraction": self.min_fraction,
            "definitions": {
                "keep_rate": "tokens the block ran (distinct token ids) / patch positions",
                "reactivated": "carried at this reducing block, not carried at the previous reducing block",
                "gap": "consecutive reducing blocks that did not carry a reactivated position",
                "inside": f"at least {self.min_fraction:g} of the token's pixels (network input, after resize "
                "and padding) are in the union of the ground-truth masks",
                "kept_share": "kept tokens inside objects / kept tokens, a token of k positions weighing 1/k per "
                "position; tokens that are mostly padding are left out",
            },
        }
        out["keep_rate"] = {k: _spread([r["keep_rate"][g] for r in imgs]) for g, k in enumerate(keys)}
        out["coverage"] = {k: _spread([r["coverage"][g] for r in imgs])["mean"] for g, k in enumerate(keys)}
        out["merged_fraction"] = {
            k: _spread([r["merged_fraction"][g] for r in imgs])["mean"] for g, k in enumerate(keys)
        }
        per_image = [float(np.mean(r["keep_rate"])) if blocks else 1.0 for r in imgs]
        counts, edges = np.histogram(per_image, bins=self.bins, range=(0.0, 1.0))
        out["per_image_keep_rate"] = {
            **_spread(per_image),
            "values": per_image,
            "histogram": {"edges": [round(e, 6) for e in edges.tolist()], "counts": counts.tolist()},
        }
        out["reactivation"] = self._reactivation(keys)
        with_gt = [r for r in imgs if "inside_tokens" in r]
        if with_gt:
            out["inside_objects"] = self._inside(keys, with_gt)
        out["per_image"] = imgs
        return out

    def _reactivation(self, keys: list[str]) -> dict:
        imgs = self.images
        per_block = {}
        for g, k in enumerate(keys):
            react = sum(r["reactivated_tokens"][g] for r in imgs)
            kept = sum(r["kept_tokens"][g] for r in imgs)
            per_block[k] = {
                "fraction_of_positions": _spread([r["reactivated"][g] / r["num_tokens"] for r in imgs])["mean"],
                "share_of_kept_tokens": _ratio(react, kept),
            }
        react = sum(sum(r["reactivated_tokens"][1:]) for r in imgs)
        kept = sum(sum(r["kept_tokens"][1:]) for r in imgs)
        total_gaps = sum(self.gap_counts.values())
        return {
            "per_block": per_block,
            "share_of_kept_tokens": _ratio(react, kept),
            "positions_ever_reactivated": _spread([r["ever_reactivated"] / r["num_tokens"] for r in imgs])["mean"],
            "gap_histogram": {str(gap): n for gap, n in sorted(self.gap_counts.items())},
            "share_at_gap_1": _ratio(self.gap_counts.get(1, 0), total_gaps),
        }

    def _inside(self, keys: list[str], imgs: list[dict]) -> dict:
        valid = sum(r["valid_tokens"] for r in imgs)
        inside = sum(r["inside_tokens"] for r in imgs)
        area = _ratio(inside, valid)
        kept_share, keep_in, keep_bg, above = {}, {}, {}, {}
        for g, k in enumerate(keys):
            kept_in = sum(r["kept_inside"][g] for r in imgs)
            kept_valid = sum(r["kept_valid"][g] for r in imgs)
            kept_share[k] = _ratio(kept_in, kept_valid)
            keep_in[k] = _ratio(kept_in, inside)
            keep_bg[k] = _ratio(kept_valid - kept_in, valid - inside)
            above[k] = float(
                np.mean(
                    [
                        _ratio(r["kept_inside"][g], r["kept_valid"][g]) > _ratio(r["inside_tokens"], r["valid_tokens"])
                        for r in imgs
                    ]
                )
            )
        shares = [v for v in kept_share.values() if math.isfinite(v)]
        all_in = sum(sum(r["kept_inside"]) for r in imgs)
        all_kept = sum(sum(r["kept_valid"]) for r in imgs)
        return {
            "num_images": len(imgs),
            "valid_tokens": valid,
            "inside_tokens": inside,
            "area_share": area,
            "area_share_per_image": _spread([_ratio(r["inside_tokens"], r["valid_tokens"]) for r in imgs]),
            "kept_share": kept_share,
            "kept_share_mean_over_blocks": float(np.mean(shares)) if shares else float("nan"),
            "kept_share_all_blocks": _ratio(all_in, all_kept),
            "keep_rate_inside": keep_in,
            "keep_rate_background": keep_bg,
            "images_above_area_share": above,
        }

    def table(self) -> str:
        """The summary as a plain-text table, one row per reducing block."""
        s = self.summary()
        lines = [f"{s['num_images']} images, reducing blocks {s['blocks'] or 'none (dense)'}"]
        inside = s.get("inside_objects")
        head = f"{'block':>6} {'keep':>6} {'std':>6} {'p05':>6} {'p95':>6} {'react':>6}"
        if inside:
            head += f" {'in-obj':>7} {'keep-obj':>8} {'keep-bg':>8}"
        lines.append(head)
        for b in s["blocks"]:
            k = f"block{b}"
            kr = s["keep_rate"][k]
            row = (
                f"{b:>6} {kr['mean']:6.3f} {kr['std']:6.3f} {kr['p05']:6.3f} {kr['p95']:6.3f} "
                f"{s['reactivation']['per_block'][k]['fraction_of_positions']:6.3f}"
            )
            if inside:
                row += (
                    f" {inside['kept_share'][k]:7.3f} {inside['keep_rate_inside'][k]:8.3f}"
                    f" {inside['keep_rate_background'][k]:8.3f}"
                )
            lines.append(row)
        p = s["per_image_keep_rate"]
        lines.append(
            f"per-image keep rate (mean over blocks): mean {p['mean']:.3f}, std {p['std']:.3f}, "
            f"5-95% {p['p05']:.3f}-{p['p95']:.3f}, range {p['min']:.3f}-{p['max']:.3f}"
        )
        r = s["reactivation"]
        lines.append(
            f"reactivated: {r['share_of_kept_tokens']:.3f} of the kept tokens after the first reducing block; "
            f"{r['positions_ever_reactivated']:.3f} of the positions at least once; "
            f"share back after 1 reducing block: {r['share_at_gap_1']:.3f}; gaps {r['gap_histogram']}"
        )
        if inside:
            lines.append(
                f"inside objects (>= {s['min_fraction']:g} of a token's pixels): "
                f"area share {inside['area_share']:.3f}, kept share {inside['kept_share_all_blocks']:.3f} "
                f"(all reducing blocks), {inside['kept_share_mean_over_blocks']:.3f} (mean of the blocks' shares)"
            )
        return "\n".join(lines)
