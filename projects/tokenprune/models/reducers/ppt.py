"""PPT: per image, prune inattentive tokens or pool duplicated ones, by a redundancy criterion.

Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers". No
trainable parameters. In each reducing block (default 3, 6, 9), between attention and MLP, per image:

- score every patch token j: s_j = a_j * ||v_j||, a_j its attention from the class token summed over heads,
  v_j its value vector over all heads; normalised to sum 1 over the patch tokens;
- if the scores are nearly uniform (*duplicative* redundancy) **pool**: ToMe's bipartite soft matching on
  the keys averaged over heads, size-weighted averages, sizes summed; otherwise (*inattentive* redundancy)
  **prune** the r lowest-scored tokens. The class token always stays. Both remove r tokens, so every image
  of a batch keeps the same count;
- proportional attention (log(size) on the logits) in every block once tokens were pooled.

What dense prediction needs, and we chose (docs/reducers/ppt.md):

- ``criterion='cv'`` (default): the redundancy test is on the coefficient of variation std(s) / mean(s),
  which does not depend on the token count. The paper's test, Var(s) < tau with scores summing to 1, equals
  std/mean < N * sqrt(tau): at detection resolutions almost every image would pool. The default threshold
  196 * sqrt(7e-5) = 1.64 is the paper's DeiT-S threshold at 224 x 224 (196 patch tokens) carried over.
  ``criterion='variance'`` is the paper's test (default threshold 7e-5).
- ``importance='cls'`` is the paper's class-token attention and needs a backbone with ``cls_token=True``
  (a learned class token). ``importance='mean'`` needs none: a_j is the attention token j receives,
  averaged over all queries (each weighted by its size), summed over heads.
- Budgets are keep ratios of a block's patch tokens (default 146/196, 96/146, 48/96: the paper's schedule
  r = 50 of 196 at 224 x 224, as fractions); ``r`` gives the paper's absolute count (capped at half).
  Pooling below half runs further matching rounds in the same block.
- A pruned token leaves after its block's MLP (which is per token) and keeps that value in the output map;
  pooled tokens are copied back to every position they carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .merging import (
    MergeState,
    MergingReducer,
    attention_importance,
    bipartite_merge_rounds,
    merge_tokens,
)
from .toolkit import mlp_half

DEFAULT_BLOCKS = (3, 6, 9)
DEFAULT_KEEP_RATIO = (146 / 196, 96 / 146, 48 / 96)
PAPER_VARIANCE_THRESHOLD = 7e-5  # DeiT-S off the shelf
PAPER_CV_THRESHOLD = 196 * math.sqrt(PAPER_VARIANCE_THRESHOLD)  # the same test at 196 patch tokens: 1.64
CRITERIA = ("cv", "variance")


def ppt_scores(attn: Tensor, v: Tensor, size: Tensor, num_prefix: int, importance: str) -> Tensor:
    """PPT's token scores (B, M - P): importance x value norm, normalised to sum 1 over the patch tokens.

    Args:
        attn: (B, heads, M, M) attention probabilities.
        v: (B, heads, M, d) values.
        size: (B, M) token sizes.
        num_prefix: Class tokens in front.
        importance: ``'cls'`` or ``'mean'``, see :func:`attention_importance`.
    """
    B, h, M, d = v.shape
    v_norm = v.transpose(1, 2).reshape(B, M, h * d).float().norm(dim=-1)[:, num_prefix:]
    s = attention_importance(attn, size, num_prefix, importance).float() * v_norm
    return s / s.sum(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)


def prune_assignment(scores: Tensor, r: int, num_prefix: int) -> Tensor:
    """Drop the ``r`` lowest-scored of the (B, n) patch tokens: (B, P + n) assignment, -1 for the dropped.

    The kept tokens follow the prefix in decreasing score, the order of PPT's code (it decides the A/B split
    of later pooling).
    """
    B, n = scores.shape
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter(1, ranked, torch.arange(n, device=scores.device).expand(B, -1))
    patch = torch.where(rank < n - r, num_prefix + rank, torch.full_like(rank, -1))
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, -1)
    return torch.cat([prefix, patch], dim=1)


def redundancy(scores: Tensor, criterion: str) -> Tensor:
    """(B, n) scores summing to 1 -> (B,) the statistic compared with the threshold (below: pool)."""
    var = scores.var(dim=1)  # unbiased, as the paper's torch.var
    if criterion == "variance":
        return var
    return var.sqrt() / scores.mean(dim=1).clamp(min=torch.finfo(scores.dtype).tiny)


class PPTReducer(MergingReducer):
    """PPT (Wu et al.) for the dense ViT backbone; see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the reducing blocks (default 3, 6, 9).
        keep_ratio: Per reducing block (or one for all), in (0, 1]: the fraction of its patch tokens it keeps
            (1.0: none removed). Default 146/196, 96/146, 48/96.
        r: Instead of ``keep_ratio``: tokens removed per reducing block, the paper's budget (DeiT-S: 50),
            at most half the patch tokens.
        criterion: ``'cv'`` (std / mean of the scores, resolution-free; default) or ``'variance'`` (the
            paper's).
        threshold: Pool when the criterion is below it; None: 1.64 for ``'cv'``, 7e-5 for ``'variance'``.
        importance: ``'cls'`` (attention from the class token, the paper's; needs ``cls_token=True``) or
            ``'mean'`` (mean attention received; no class token needed).
        prop_attn: Proportional attention after pooling (the paper's, off the shelf).
    """

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
        keep_ratio: float | Sequence[float] | None = None,
        r: int | Sequence[int] | None = None,
        criterion: str = "cv",
        threshold: float | None = None,
        importance: str = "cls",
        prop_attn: bool = True,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if threshold is None:
            threshold = PAPER_CV_THRESHOLD if criterion == "cv" else PAPER_VARIANCE_THRESHOLD
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        super().__init__(embed_dim, blocks, keep_ratio, r, prop_attn, DEFAULT_KEEP_RATIO, importance)
        self.criterion = criterion
        self.threshold = float(threshold)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, criterion={self.criterion!r}, threshold={self.threshold:.4g}, "
            f"importance={self.importance!r}"
        )

    def reduce(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor | None:
        P = state.num_prefix
        B, M, C = x.shape
        r = self.removals(index, M - P)
        if r == 0:
            return None
        half = self.importance_half(block, x, state)
        scores = ppt_scores(half.attn, half.v, state.size, P, self.importance)
        stat = redundancy(scores, self.criterion)
        pool = stat < self.threshold  # (B,)
        # value norms, and the class token's attention row (computed again) or the mean over all rows
        macs = torch.full((B,), float(M * C + self.importance_macs(M, C, half.attn.shape[1])))
        macs = macs.to(x.device)

        assign = prune_assignment(scores, r, P)
        pooled = pool.nonzero().squeeze(1)
        if len(pooled):
            metric = half.k[pooled].mean(dim=1)
            pool_assign, _, pool_macs = bipartite_merge_rounds(metric, state.size[pooled], r, P)
            assign = assign.index_copy(0, pooled, pool_assign)
            macs = macs.index_add(0, pooled, torch.full((len(pooled),), pool_macs, device=x.device))
        state.extra_macs = state.extra_macs + macs
        state.extra.setdefault("pooled", {})[index] = pool
        state.extra.setdefault("redundancy", {})[index] = stat

        merged = merge_tokens(half.x, assign, M - r, state.size)
        dropped = state.apply(assign, M - r)
        out = mlp_half(block, merged)
        pruned = assign < 0
        if bool(pruned.any()):  # pruned tokens finish their block, then keep that value
            last = torch.zeros_like(half.x)
            last[pruned] = mlp_half(block, half.x[pruned].unsqueeze(0)).squeeze(0)
            state.freeze(dropped, last)
        return out

    def stats(self, state: MergeState) -> dict[str, float | Tensor]:
        """As :meth:`MergingReducer.stats`, plus ``pool_rate.block{i}``: the fraction of images that pooled."""
        out = super().stats(state)
        for block, pool in state.extra.get("pooled", {}).items():
            out[f"pool_rate.block{block}"] = pool.float().mean()
        return out
