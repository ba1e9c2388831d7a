"""ToMe: token merging by bipartite soft matching, with exact unmerge for dense prediction.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (official code:
github.com/facebookresearch/ToMe). In every reducing block, between attention and MLP: the tokens alternate
between sets A and B, each A token's edge is its most similar B token (cosine of the block's keys averaged
over heads), and the r A tokens with the most similar edges are merged into their B token by a size-weighted
average, sizes summed. A class token is never merged. Proportional attention adds log(size) to the attention
logits of every following block. Training-free.

Dense use: every merge is remembered (:class:`tokenprune.models.reducers.merging.MergeState`), and
:meth:`finish` copies each final token back to all the positions it was merged from (ToMe's unmerge), so the
backbone returns the complete map. The budget is ``keep_ratio``, the fraction of its patch tokens a block
keeps; a ratio below 0.5 is met by further matching rounds in the same block (ToMe merges at most half the
tokens in one round). ``r`` gives the paper's absolute count per block instead, capped at half as in ToMe.

Windowed backbones (ViTDet: window attention or relative positions, ``docs/vitdet.md``): the token set cannot
shrink across blocks there, so each reducing block merges, computes and unmerges within itself, as ToMe for
Stable Diffusion does (Bolya & Hoffman, "Token Merging for Fast Stable Diffusion", CVPRW 2023), window by
window (:func:`merge_in_windows`; the backbone switches it on through :meth:`ToMeReducer.use_grid`):

- in every window (a global block: the whole grid, one window) the block's normalised tokens ``norm1(x)`` of
  the window's real positions (the grid padding is no content: never merged, never counted) are matched by
  ToMe's bipartite soft matching on their own cosine similarity (ToMe for SD's metric; the keys, ToMe's, would
  cost the qkv projection of every token), and ``ceil``-rounded ``keep_ratio`` of them are kept: the others
  are merged, each group into its average;
- attention runs among the merged tokens of each window, the zero padding taking part as keys as in the dense
  windowed block; a merged token's relative positions are those of its **destination**, the token the others
  were merged into (ToMe's code keeps a merged token at its B token's slot), and with ``prop_attn`` log(size)
  is added to its logits as a key;
- the attention output is unmerged (every position receives its merged token's) and added to each position's
  own residual; the MLP input ``norm2(x)`` is merged with the same assignment, the MLP runs on the merged
  tokens and its output is unmerged and added the same way. The block's output is the full grid again, so
  every block, windowed or global, sees every token; positions of one group differ by their residuals.

With ``keep_ratio`` 1.0 nothing merges and the block runs densely. Each block merges afresh: ``keep_ratio`` is
the fraction of the patch tokens each reducing block computes on (not a running product). ``r`` (a count per
image) is refused there: give ``keep_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .merging import (
    MergeState,
    MergingReducer,
    bipartite_merge_rounds,
    bipartite_soft_matching,
    compose,
    merge_tokens,
)
from .toolkit import attention_half, mlp_half
from .windowed import WindowGroup, block_window, window_groups

#: keep ratio per block by default: 0.875 ** 12 = 0.2 of the tokens after 12 blocks, the final count of ToMe's
#: DeiT-S setting r = 13 at 224 x 224 (196 -> 40 patch tokens)
DEFAULT_KEEP_RATIO = 0.875


class ToMeReducer(MergingReducer):
    """ToMe (Bolya et al., ICLR 2023) for the dense ViT backbone.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the merging blocks; None (default): every block, as ToMe.
        keep_ratio: Fraction in (0, 1] of its patch tokens each merging block keeps (a list: one per merging
            block); 1.0 merges nothing. Default 0.875. On a windowed backbone: of each window's tokens.
        r: Instead of ``keep_ratio``: tokens merged per block, the paper's classification budget (DeiT-S:
            13), at most half the patch tokens. Not on a windowed backbone.
        prop_attn: Proportional attention (the paper's, for models not trained with merging).
    """

    runs_on_grid = True  # on a windowed backbone: merge, compute and unmerge inside each window (use_grid)

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] | None = None,
        keep_ratio: float | Sequence[float] | None = None,
        r: int | Sequence[int] | None = None,
        prop_attn: bool = True,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_ratio, r, prop_attn, DEFAULT_KEEP_RATIO)
        self.on_grid = False  # set by the backbone (use_grid): merge inside each window, the token set kept

    def use_grid(self, grid: bool) -> None:
        """On a backbone whose blocks need the grid, merge within each block and window instead of shrinking the
        token set (module docstring); ValueError for an ``r`` budget, which counts tokens of a whole image."""
        if grid and self.r is not None:
            raise ValueError(
                f"ToMe with r={self.r} cannot run on a windowed or relative-position backbone: there it merges "
                "inside each window, so give keep_ratio (the fraction of each window's tokens a block keeps)"
            )
        self.on_grid = bool(grid)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", in windows" if self.on_grid else "")

    def keep_schedule(self, depth: int | None = None, num_patches: int | None = None) -> tuple[float, ...]:
        """As the merging base (a running product); on a windowed backbone every block merges from the full grid,
        so the schedule is each block's keep ratio."""
        if not self.on_grid:
            return super().keep_schedule(depth, num_patches)
        return tuple(float(self.budget(b)[1]) for b in self.reduced_blocks(depth))

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor:
        if not self.on_grid:
            return super().run_block(index, block, x, state)
        if not self.is_reducing(index):
            return block(x, None, state.hw)
        out, merged = merge_in_windows(block, x, state.hw, lambda n: self.removals(index, n), self.prop_attn)
        count = int(merged.tokens_per_image)
        state.counts[index] = state.handed_on[index] = count
        state.sources[index] = merged.labels
        state.extra_macs = state.extra_macs + merged.macs_per_image
        return out

    def finish(self, x: Tensor, state: MergeState) -> Tensor:
        return x if self.on_grid else super().finish(x, state)

    def reduce(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor | None:
        P = state.num_prefix
        r = self.removals(index, x.shape[1] - P)
        if r == 0:
            return None
        half = attention_half(block, x, state.attn_mask(x, self.prop_attn))
        assign, num_out, macs = bipartite_merge_rounds(half.k.mean(dim=1), state.size, r, P)
        merged = merge_tokens(half.x, assign, num_out, state.size)
        state.apply(assign, num_out)
        state.extra_macs = state.extra_macs + macs
        return mlp_half(block, merged)


# ------------------------------------------------------------------------------------------- inside windows


@torch.no_grad()
def match_with_destinations(metric: Tensor, r: int) -> tuple[Tensor, int, Tensor, float]:
    """``r`` merges among the tokens of each row by ToMe's bipartite soft matching (in rounds of at most half
    the tokens, as :func:`tokenprune.models.reducers.merging.bipartite_merge_rounds`), and the destination of
    every merged token: the token the others were merged into, which was never merged away itself (in each
    round the B token of a group, or an unmerged A token on its own).

    Args:
        metric: (W, n, D) similarity features of W rows (windows) of n tokens.
        r: Merges per row, 0 <= r < n.

    Returns:
        The (W, n) assignment to ``n - r`` merged tokens, ``n - r``, the (W, n - r) slot of each merged token's
        destination, and the similarity MACs per row.
    """
    W, n, D = metric.shape
    assign = torch.arange(n, device=metric.device).expand(W, n)
    dest = assign
    size = torch.ones(W, n, device=metric.device)
    macs, m = 0.0, n
    while r > 0:
        step = min(r, m // 2)
        macs += math.ceil(m / 2) * (m // 2) * D
        a = bipartite_soft_matching(metric, step)
        out = m - step
        slot = torch.arange(m, device=metric.device)
        rank = (slot + m * (slot % 2)).expand(W, m)  # a group's B token (odd slot) outranks its A tokens
        receiver = torch.full((W, out), -1, device=metric.device, dtype=torch.long)
        receiver = receiver.scatter_reduce(1, a, rank, reduce="amax") % m
        dest, assign = dest.gather(1, receiver), compose(assign, a)
        if r > step:
            metric = merge_tokens(metric, a, out, size)
            size = torch.zeros(W, out, device=size.device).scatter_add(1, a, size)
        m, r = out, r - step
    return assign, m, dest, macs


@dataclass
class WindowMerge:
    """How one block merged the windows of a group (:func:`merge_in_windows`).

    Attributes:
        group: The windows.
        assign: (W, n) long, each real position's merged token, 0..m-1; None: nothing merged (m = n).
        num_out: m, merged tokens per window.
        dest: (W, m) long, the slot of each merged token's destination in its window.
        macs: Similarity MACs per window.
    """

    group: WindowGroup
    assign: Tensor | None
    num_out: int
    dest: Tensor
    macs: float

    def merge(self, t: Tensor) -> Tensor:
        """(W, n, C) per-position vectors -> (W, m, C), each merged token the average of its positions'."""
        if self.assign is None:
            return t
        return merge_tokens(t, self.assign, self.num_out, torch.ones(t.shape[:2], device=t.device))

    def unmerge(self, t: Tensor) -> Tensor:
        """(W, m, C) -> (W, n, C): every position its merged token's vector."""
        if self.assign is None:
            return t
        return t.gather(1, self.assign.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    def sizes(self) -> Tensor:
        """(W, m) float, the positions each merged token stands for."""
        W, n = self.group.index.shape
        if self.assign is None:
            return torch.ones(W, n, device=self.group.index.device)
        ones = torch.ones(W, n, device=self.assign.device)
        return torch.zeros(W, self.num_out, device=ones.device).scatter_add(1, self.assign, ones)


@dataclass
class WindowMergeResult:
    """What :func:`merge_in_windows` did, for the reducer's counts, maps and MACs.

    Attributes:
        merges: One :class:`WindowMerge` per group of windows.
        batch: Images B.
        num_patches: h*w.
    """

    merges: list[WindowMerge]
    batch: int
    num_patches: int

    @property
    def tokens_per_image(self) -> int:
        """The merged tokens one image ran (the same for every image): sum over its windows of n_w."""
        return sum(m.group.per_image * m.num_out for m in self.merges)

    @property
    def macs_per_image(self) -> float:
        """The matching's similarity MACs of one image."""
        return sum(m.group.per_image * m.macs for m in self.merges)

    @property
    def labels(self) -> Tensor:
        """(B, h*w) long, each position's merged token, numbered per image (a ``source`` for
        :func:`tokenprune.models.reducers.merging.token_ids`: positions sharing a label were one token)."""
        B, device = self.batch, self.merges[0].group.index.device
        labels = torch.empty(B, self.num_patches, dtype=torch.long, device=device)
        offset = 0
        for m in self.merges:
            k, n = m.group.positions.shape
            own = torch.arange(n, device=device).expand(B * k, n) if m.assign is None else m.assign
            windows = torch.arange(k, device=device).repeat(B)[:, None]  # each row's window within its image
            label = (offset + windows * m.num_out + own).reshape(B, k * n)
            labels.scatter_(1, m.group.positions.reshape(1, -1).expand(B, -1), label)
            offset += k * m.num_out
        return labels


def merge_in_windows(
    block: nn.Module, x: Tensor, hw: tuple[int, int], removals: Callable[[int], int], prop_attn: bool
) -> tuple[Tensor, WindowMergeResult]:
    """Run a block with ToMe inside each of its windows: merge, attention and MLP on the merged tokens, unmerge
    (module docstring). A global block is one window over the whole grid.

    Args:
        block: A :class:`tokenprune.models.vit.Block`, windowed or global (with or without relative positions).
        x: Tokens (B, h*w, C), no prefix token.
        hw: The token grid (h, w).
        removals: Callable n -> the tokens to merge away of a window holding n real tokens.
        prop_attn: Add log(size) of each merged token to its logits as a key.

    Returns:
        (B, h*w, C), the block's output at every position; and what was merged.
    """
    B, N, C = x.shape
    if hw[0] * hw[1] != N:
        raise ValueError(f"{N} tokens do not fill a {hw[0]}x{hw[1]} grid: merging in windows needs no prefix")
    window = block_window(block, hw)
    groups = window_groups(B, hw, window, x.device)
    y = block.norm1(x).reshape(B * N, C)
    merges = []
    for group in groups:
        r = removals(group.size)
        W, n = group.index.shape
        if r == 0:
            dest = torch.arange(n, device=x.device).expand(W, n)
            merges.append(WindowMerge(group=group, assign=None, num_out=n, dest=dest, macs=0.0))
            continue
        assign, m, dest, macs = match_with_destinations(y[group.index], r)
        merges.append(WindowMerge(group=group, assign=assign, num_out=m, dest=dest, macs=macs))
    result = WindowMergeResult(merges=merges, batch=B, num_patches=N)
    if all(m.assign is None for m in merges):
        return block(x, None, hw), result
    attn = torch.empty_like(y)
    for m in merges:
        t, group = y[m.group.index], m.group
        coords = group.coords[m.dest]  # (W, m, 2): each merged token at its destination
        content = None
        if group.content_hw != window:
            content = torch.tensor(group.content_hw, device=x.device).expand(coords.shape[0], 2)
        bias = m.sizes().log() if prop_attn and m.assign is not None else None
        a = block.attn.forward_at(m.merge(t), coords, window, None, content, bias)
        attn[group.index] = m.unmerge(a).to(attn.dtype)  # autocast: attention in half, norms in float
    x = x + block.drop_path1(block.ls1(attn.reshape(B, N, C)))
    z = block.norm2(x).reshape(B * N, C)
    merged = [m.merge(z[m.group.index]) for m in merges]
    out = block.mlp(torch.cat([t.reshape(-1, C) for t in merged]))
    mlp = torch.empty_like(z)
    for m, t in zip(merges, out.split([t.shape[0] * t.shape[1] for t in merged])):
        mlp[m.group.index] = m.unmerge(t.reshape(m.group.index.shape[0], m.num_out, C)).to(mlp.dtype)
    return x + block.drop_path2(block.ls2(mlp.reshape(B, N, C))), result
