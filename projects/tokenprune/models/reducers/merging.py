"""Machinery the merging reducers (ToMe, PPT, BAT) share: split blocks, bipartite soft matching, weighted
merges with source tracking, and exact restoration of the full token map.

All three reduce *inside* a block, between attention and MLP, as their papers do, with the block halves of
:mod:`tokenprune.models.reducers.toolkit` (``attention_half`` returns keys, values and, when asked, the
attention probabilities; ``mlp_half`` runs the rest).

A reduction step is an *assignment*: every current token j of an image goes to output token ``assign[j]``
(several tokens to one output: merged, as a weighted average) or is dropped (``-1``: pruned). Assignments
compose, and size-weighted averages compose exactly, so multi-round merges are applied once.
:class:`MergeState` follows every original position (prefix included) to the token carrying it
(``source``), keeps the value of dropped positions as they left (``frozen``), and :meth:`MergeState.restore`
copies every token back to all its source positions: the dense-safe output (see ``base.py``).

Counts are the same for every image of a batch in all three methods (a step removes the same number of
tokens from each), so no padding is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    PRUNED,
    TokenReducer,
    check_blocks,
    check_fractions,
    check_per_block,
    cumulative,
    dense_token_counts,
    keep_rate_stats,
)
from .toolkit import HalfBlock, attention_half, keep_count

# ---------------------------------------------------------------------------------------- attention importance


IMPORTANCE = ("cls", "mean")  # the choices of attention_importance


def attention_importance(attn: Tensor, size: Tensor, num_prefix: int, importance: str) -> Tensor:
    """Attention each patch token receives, summed over heads: -> (B, M - P).

    Args:
        attn: Attention probabilities, (B, heads, M, M), or (B, heads, 1, M) (the first row) for ``'cls'``.
        size: (B, M) token sizes.
        num_prefix: Prefix tokens P.
        importance: ``'cls'``: from the class token (row 0), for backbones with one; ``'mean'``, needing no
            class token: averaged over all queries, each weighted by its size, i.e. as if every original
            position asked.
    """
    if importance == "cls":
        return attn[:, :, 0, num_prefix:].sum(dim=1)
    w = (size / size.sum(dim=1, keepdim=True)).to(attn.dtype)
    return (w[:, None, None, :] @ attn).sum(dim=1)[:, 0, num_prefix:]


def check_importance(importance: str, num_prefix: int, method: str) -> None:
    """Raise ValueError if ``importance`` is unknown, or is ``'cls'`` on a backbone without class token."""
    if importance not in IMPORTANCE:
        raise ValueError(f"{method} importance must be one of {IMPORTANCE}, got {importance!r}")
    if importance == "cls" and num_prefix == 0:
        raise ValueError(
            f"{method} importance='cls' scores tokens by the class token's attention, but the backbone has no "
            "class token: build it with cls_token=True, or use importance='mean' (no class token needed)"
        )


# ------------------------------------------------------------------------------------------------ assignments


def merge_tokens(x: Tensor, assign: Tensor, num_out: int, weights: Tensor) -> Tensor:
    """Weighted average of the tokens each output token receives.

    Args:
        x: Tokens (B, M, C) (or any per-token vectors, e.g. keys).
        assign: (B, M) long, output index in [0, num_out) of each token, or -1 (dropped, ignored).
        num_out: Output tokens per image.
        weights: (B, M) positive weights (token sizes, importance scores).

    Returns:
        (B, num_out, C): ``sum_j w_j x_j / sum_j w_j`` over the tokens j assigned to each output, in float32
        for the sums and x's dtype for the result. Every output index must receive at least one token.
    """
    B, M, C = x.shape
    kept = assign >= 0
    w = torch.where(kept, weights.float(), torch.zeros((), device=x.device))
    index = assign.clamp(min=0)
    total = torch.zeros(B, num_out, C, device=x.device, dtype=torch.float32)
    total = total.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, C), x.float() * w.unsqueeze(-1))
    wsum = torch.zeros(B, num_out, device=x.device, dtype=torch.float32).scatter_add(1, index, w)
    return (total / wsum.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)).to(x.dtype)


def compose(first: Tensor, second: Tensor) -> Tensor:
    """Assignment ``second`` after ``first``: (B, M) and (B, M') -> (B, M), -1 stays -1."""
    return torch.where(first >= 0, second.gather(1, first.clamp(min=0)), first)


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Tensor:
    """ToMe's bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), as an
    assignment.

    Tokens alternate between set A (even index) and set B (odd index); each A token's edge is its most
    similar B token (cosine of ``metric``); the ``r`` A tokens with the most similar edges merge into their
    B token, the rest stay. A protected first token (a class token) never merges.

    The output order is that of ToMe's code, which decides the A/B split of the next merging block: first the
    unmerged A tokens (by index when a class token is protected, else by decreasing edge similarity), then
    the B tokens.

    Args:
        metric: (B, M, D) per-token similarity features (ToMe: keys averaged over heads).
        r: Merges, 0 <= r <= (M - num_protected) // 2.
        num_protected: 1 to protect the first token (it stays first), or 0.

    Returns:
        (B, M) long assignment to M - r output tokens.
    """
    if num_protected not in (0, 1):
        raise ValueError(f"bipartite_soft_matching protects at most one leading token, got {num_protected}")
    B, M, _ = metric.shape
    if r == 0:
        return torch.arange(M, device=metric.device).expand(B, M)
    device = metric.device
    metric = F.normalize(metric.float(), dim=-1)
    a_pos = torch.arange(0, M, 2, device=device)
    b_pos = torch.arange(1, M, 2, device=device)
    scores = metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)  # (B, |A|, |B|)
    if num_protected:
        scores[:, 0, :] = float("-inf")
    best, best_b = scores.max(dim=-1)  # (B, |A|)
    edges = best.argsort(dim=-1, descending=True, stable=True)
    src, unmerged = edges[:, :r], edges[:, r:]  # A-local indices
    if num_protected:
        unmerged = unmerged.sort(dim=1).values
    num_unmerged = len(a_pos) - r
    assign = torch.empty(B, M, dtype=torch.long, device=device)
    assign[:, b_pos] = num_unmerged + torch.arange(len(b_pos), device=device)
    assign = assign.scatter(1, a_pos[unmerged], torch.arange(num_unmerged, device=device).expand(B, -1))
    return assign.scatter(1, a_pos[src], num_unmerged + best_b.gather(1, src))


@torch.no_grad()
def bipartite_merge_rounds(metric: Tensor, size: Tensor, r: int, num_protected: int) -> tuple[Tensor, int, float]:
    """``r`` merges by bipartite soft matching, in several rounds when r exceeds half of the tokens.

    Each round merges at most half of the unprotected tokens (ToMe's limit); the next round matches the
    size-weighted average of the merged ``metric``. Used where a keep ratio below 0.5 is asked of one block.

    Args:
        metric: (B, M, D) similarity features.
        size: (B, M) token sizes (weights of the metric's averages).
        r: Merges in all, 0 <= r < M - num_protected.
        num_protected: Leading tokens left alone.

    Returns:
        The composed (B, M) assignment, the output count M - r, and the similarity MACs per image.
    """
    B, M, D = metric.shape
    assign = torch.arange(M, device=metric.device).expand(B, M)
    macs, m = 0.0, M
    while r > 0:
        step = min(r, (m - num_protected) // 2)
        if step <= 0:
            raise ValueError(f"cannot merge {r} more of {m} tokens ({num_protected} protected)")
        macs += math.ceil(m / 2) * (m // 2) * D
        a = bipartite_soft_matching(metric, step, num_protected)
        assign = compose(assign, a)
        m, r = m - step, r - step
        if r > 0:
            metric = merge_tokens(metric, a, m, size)
            size = torch.zeros(B, m, device=size.device, dtype=size.dtype).scatter_add(1, a, size)
    return assign, m, macs


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class MergeState:
    """One forward of a merging reducer.

    Attributes:
        num_prefix: Prefix (class) tokens P in front of the patch tokens; never merged or dropped.
        hw: Patch grid (h, w).
        source: (B, N) long, for every original position (prefix first), the index of the current token
            carrying it, or -1 once it was dropped.
        size: (B, M) float, number of original positions each current token carries.
        frozen: (B, N, C) values of dropped and pinned positions, as they left or were pinned; None while
            nothing was dropped or pinned.
        pinned: (B, N) bool, positions still carried by a token (for attention) whose output value is their
            own frozen one instead of their token's (see :meth:`pin`); None while nothing was pinned.
        previous_source: ``source`` before the last :meth:`apply`.
        merged: Whether any token carries more than one position (sizes not all 1).
        counts: Block index -> tokens (prefix included) the block received, the same for every image.
        sources: Reducing block index -> ``source`` after its reduction (for :meth:`token_maps`).
        handed_on: Reducing block index -> tokens (prefix included) after its reduction.
        extra_macs: (B,) the method's own multiply-accumulates per image so far.
        extra: Method-specific per-block records (e.g. PPT's pooled images).
    """

    num_prefix: int
    hw: tuple[int, int]
    source: Tensor
    size: Tensor
    extra_macs: Tensor
    frozen: Tensor | None = None
    pinned: Tensor | None = None
    previous_source: Tensor | None = None
    merged: bool = False
    counts: dict[int, int] = field(default_factory=dict)
    sources: dict[int, Tensor] = field(default_factory=dict)
    handed_on: dict[int, int] = field(default_factory=dict)
    extra: dict[str, dict[int, Tensor]] = field(default_factory=dict)

    @classmethod
    def start(cls, x: Tensor, hw: tuple[int, int], num_prefix: int) -> MergeState:
        B, N, _ = x.shape
        return cls(
            num_prefix=num_prefix,
            hw=tuple(hw),
            source=torch.arange(N, device=x.device).expand(B, N),
            size=torch.ones(B, N, device=x.device),
            extra_macs=torch.zeros(B, device=x.device),
        )

    @property
    def batch(self) -> int:
        return self.source.shape[0]

    @property
    def num_patches(self) -> int:
        return self.hw[0] * self.hw[1]

    def attn_mask(self, x: Tensor, prop_attn: bool) -> Tensor | None:
        """Proportional attention (ToMe): log(size) added to the logits of every key, (B, 1, 1, M), once
        some token carries more than one position; None before (or with ``prop_attn`` off)."""
        if not (prop_attn and self.merged):
            return None
        return self.size.log().to(x.dtype)[:, None, None, :]

    def apply(self, assign: Tensor, num_out: int) -> Tensor:
        """Follow an assignment (B, M) -> ``num_out`` tokens: update ``source`` and ``size``.

        Returns:
            (B, N) bool, the positions this step dropped (read their values with :meth:`freeze`).
        """
        alive = self.source >= 0
        moved = assign.gather(1, self.source.clamp(min=0))
        dropped = alive & (moved < 0)
        self.previous_source = self.source
        self.source = torch.where(alive, moved, self.source)
        kept = assign >= 0
        self.size = torch.zeros(self.batch, num_out, device=self.size.device).scatter_add(
            1, assign.clamp(min=0), torch.where(kept, self.size, torch.zeros_like(self.size))
        )
        self.merged = self.merged or bool((self.size > 1).any())
        return dropped

    def freeze(self, dropped: Tensor, values: Tensor) -> None:
        """Keep the values of the positions the last :meth:`apply` dropped.

        Args:
            dropped: (B, N) bool, as returned by :meth:`apply`.
            values: (B, M, C) the last values of the tokens before that step (only the dropped tokens' rows
                are read).
        """
        if not bool(dropped.any()):
            return
        C = values.shape[-1]
        index = self.previous_source.clamp(min=0).unsqueeze(-1).expand(-1, -1, C)
        last = values.gather(1, index)
        if self.frozen is None:
            self.frozen = torch.zeros_like(last)
        self.frozen = torch.where(dropped.unsqueeze(-1), last, self.frozen)

    def pin(self, positions: Tensor, values: Tensor) -> None:
        """Let ``positions`` keep their current value in the output map, while their tokens still travel on
        (merged) for the attention of later blocks. A position pinned once stays pinned.

        Args:
            positions: (B, N) bool, positions to pin now (already pinned ones keep their earlier value).
            values: (B, M, C) the tokens carrying the positions before the last :meth:`apply` (e.g. the
                block's input).
        """
        new = positions if self.pinned is None else positions & ~self.pinned
        if not bool(new.any()):
            return
        C = values.shape[-1]
        last = values.gather(1, self.previous_source.clamp(min=0).unsqueeze(-1).expand(-1, -1, C))
        self.frozen = torch.where(new.unsqueeze(-1), last, last if self.frozen is None else self.frozen)
        self.pinned = new if self.pinned is None else self.pinned | new

    def restore(self, x: Tensor) -> Tensor:
        """Current tokens (B, M, C) -> all positions (B, N, C): every token at each of its source positions,
        dropped and pinned positions with their frozen values."""
        C = x.shape[-1]
        out = x.gather(1, self.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, C))
        if self.frozen is None:
            return out
        own = self.source >= 0
        if self.pinned is not None:
            own = own & ~self.pinned
        return torch.where(own.unsqueeze(-1), out, self.frozen.to(out.dtype))


def token_ids(source: Tensor, num_prefix: int) -> Tensor:
    """(B, N) source indices -> (B, h*w) token map ids over the patch grid: the smallest patch index of the
    positions sharing a token (so a token on its own has its own index), ``PRUNED`` where dropped."""
    B, N = source.shape
    patch = source[:, num_prefix:]
    positions = torch.arange(N - num_prefix, device=source.device).expand_as(patch)
    alive = patch >= 0
    first = torch.full((B, N), N, device=source.device, dtype=torch.long)
    first = first.scatter_reduce(1, patch.clamp(min=0), torch.where(alive, positions, N), reduce="amin")
    return torch.where(alive, first.gather(1, patch.clamp(min=0)), torch.full_like(patch, PRUNED))


# --------------------------------------------------------------------------------------------- base reducer


class MergingReducer(TokenReducer):
    """Common part of the reducers that merge (and prune) inside blocks: the state, the restoration of the
    full map in :meth:`finish`, statistics, token counts and maps. Subclasses implement :meth:`reduce`.

    Budgets are keep ratios of the tokens a block receives (``keep_ratio``), or, for the classification
    schedules of the papers, absolute counts removed per block (``r``; capped at half the patch tokens as the
    papers' code does). No trainable parameters: the methods run the same in training and inference.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the reducing blocks, strictly increasing; None: every block.
        keep_ratio: Per reducing block (or one for all), in (0, 1]: the fraction of its patch tokens the
            block hands on.
        r: Instead of ``keep_ratio``: patch tokens removed per reducing block (or one count for all).
        prop_attn: Proportional attention: log(size) added to the attention logits of every block once
            tokens were merged.
        default_keep_ratio: The subclass's default ``keep_ratio``.
        importance: How the subclass scores tokens by the attention they receive (``'cls'`` or ``'mean'``,
            :func:`attention_importance`; ``'cls'`` refused at :meth:`begin` on a backbone without class token);
            None: it does not.
    """

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] | None,
        keep_ratio: float | Sequence[float] | None,
        r: int | Sequence[int] | None,
        prop_attn: bool,
        default_keep_ratio: float | Sequence[float],
        importance: str | None = None,
    ) -> None:
        super().__init__()
        if importance is not None:
            check_importance(importance, 1, self.method)
        if blocks is not None:
            blocks = check_blocks(blocks, non_empty=True)
        if keep_ratio is not None and r is not None:
            raise ValueError(
                "give either keep_ratio (fractions, for dense prediction) or r (absolute counts), not both"
            )
        if r is not None:
            counts = (r,) if isinstance(r, int) else tuple(r)
            if not all(isinstance(c, int) and c >= 0 for c in counts):
                raise ValueError(f"r must be non-negative integers, got {r}")
        elif keep_ratio is None:
            keep_ratio = default_keep_ratio
        if keep_ratio is not None:
            ratios = (keep_ratio,) if isinstance(keep_ratio, (int, float)) else tuple(keep_ratio)
            if not ratios:
                raise ValueError("keep_ratio must not be empty")
            check_fractions(ratios, "keep_ratio")
        self.embed_dim = embed_dim
        self.blocks = blocks
        self.keep_ratio = (
            keep_ratio if keep_ratio is None or isinstance(keep_ratio, (int, float)) else tuple(keep_ratio)
        )
        self.r = r if r is None or isinstance(r, int) else tuple(r)
        self.prop_attn = prop_attn
        self.importance = importance
        if blocks is not None:  # else checked against the backbone's depth
            self._check_budget_length(blocks)

    def _check_budget_length(self, blocks: tuple[int, ...]) -> None:
        for name, value in (("keep_ratio", self.keep_ratio), ("r", self.r)):
            if isinstance(value, tuple):
                check_per_block(value, blocks, name, single_ok=True)

    def check_backbone(self, depth: int, embed_dim: int) -> None:
        super().check_backbone(depth, embed_dim)
        self._check_budget_length(self.reduced_blocks(depth))

    def keep_schedule(self, depth: int | None = None, num_patches: int | None = None) -> tuple[float, ...]:
        """The running product of the keep ratios; with ``r`` (counts), the fraction of ``num_patches`` left after
        removing the counts (each capped at half, as a block does)."""
        blocks = self.reduced_blocks(depth)
        if self.r is None:
            return cumulative(self.budget(b)[1] for b in blocks)
        if num_patches is None:
            raise ValueError(f"{type(self).__name__} removes r tokens per block: keep_schedule() needs num_patches")
        out, n = [], int(num_patches)
        for b in blocks:
            n -= min(int(self.budget(b)[1]), n // 2)
            out.append(n / num_patches)
        return tuple(out)

    @property
    def method(self) -> str:
        """The method's name in messages (the class name without ``Reducer``)."""
        return type(self).__name__.removesuffix("Reducer")

    def is_reducing(self, index: int) -> bool:
        return self.blocks is None or index in self.blocks

    def budget(self, index: int) -> tuple[str, float]:
        """(``'keep'``, keep ratio) or (``'r'``, count) of reducing block ``index``."""
        position = index if self.blocks is None else self.blocks.index(index)
        kind, value = ("r", self.r) if self.r is not None else ("keep", self.keep_ratio)
        return kind, value[position] if isinstance(value, tuple) else value

    def removals(self, index: int, n: int) -> int:
        """Patch tokens block ``index`` removes from the ``n`` it receives (0: it runs plainly)."""
        if not self.is_reducing(index):
            return 0
        kind, value = self.budget(index)
        if kind == "r":
            return min(int(value), n // 2)
        return n - keep_count(value, n, min_keep=1)

    def extra_repr(self) -> str:
        budget = f"r={self.r}" if self.r is not None else f"keep_ratio={self.keep_ratio}"
        return f"blocks={self.blocks if self.blocks is not None else 'all'}, {budget}, prop_attn={self.prop_attn}"

    # the three calls of the backbone

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, MergeState]:
        if self.importance is not None:
            check_importance(self.importance, num_prefix, self.method)
        return x, MergeState.start(x, hw, num_prefix)

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor:
        state.counts[index] = x.shape[1]
        out = None
        if self.is_reducing(index) and x.shape[1] - state.num_prefix > 1:
            out = self.reduce(index, block, x, state)
        if out is None:
            out = block(x, state.attn_mask(x, self.prop_attn))
        if self.is_reducing(index):
            state.sources[index] = state.source
            state.handed_on[index] = out.shape[1]
        return out

    def reduce(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor | None:
        """Run block ``index`` reducing its tokens; return None to have it run plainly instead."""
        raise NotImplementedError

    def importance_half(self, block: nn.Module, x: Tensor, state: MergeState) -> HalfBlock:
        """The attention half of ``block`` on tokens x (B, M, C) (proportional attention once merged), with the
        attention probabilities ``importance`` reads: the class token's row beside the fused kernel (``'cls'``),
        or all rows, computed explicitly (``'mean'``)."""
        rows = "first" if self.importance == "cls" else "all"
        return attention_half(block, x, state.attn_mask(x, self.prop_attn), attn_rows=rows)

    def importance_macs(self, num_tokens: int, channels: int, heads: int) -> int:
        """Multiply-accumulates per image of reading the importance beside the fused attention: the class
        token's attention row again (M C), or the mean over all rows (heads M^2).

        Args:
            num_tokens: Tokens M the block received.
            channels: Token channels C.
            heads: Attention heads.
        """
        return num_tokens * channels if self.importance == "cls" else heads * num_tokens * num_tokens

    def finish(self, x: Tensor, state: MergeState) -> Tensor:
        return state.restore(x)

    # what the backbone keeps afterwards

    def stats(self, state: MergeState) -> dict[str, float | Tensor]:
        """Per reducing block i, ``keep_rate.block{i}`` (0-dim): the patch tokens it hands on (after its
        reduction; what its MLP ran) over the image's patch tokens, as its token map counts them;
        ``keep_rate_per_image.block{i}`` (B,); and ``keep_rate.mean`` over the reducing blocks."""
        device, n = state.source.device, state.num_patches
        fractions = {
            block: torch.full((state.batch,), (count - state.num_prefix) / n, device=device)
            for block, count in sorted(state.handed_on.items())
        }
        return keep_rate_stats(fractions)

    def token_counts(self, state: MergeState, depth: int) -> Tensor:
        """The tokens each block received: a reducing block counts all of them (its MLP ran on fewer, so FLOPs
        counted from these are slightly pessimistic)."""
        counts = dense_token_counts(depth, state.batch, state.num_prefix + state.num_patches, state.source.device)
        for block, count in state.counts.items():
            counts[block] = float(count)
        return counts

    def extra_macs(self, state: MergeState) -> Tensor:
        return state.extra_macs

    def token_maps(self, state: MergeState) -> dict[int, Tensor]:
        """For each block that reduced: the tokens after its reduction (what its MLP and the next blocks ran)
        over the patch grid; merged positions share the smallest patch index among them, dropped positions
        are ``PRUNED``."""
        return {block: token_ids(source, state.num_prefix) for block, source in state.sources.items()}
