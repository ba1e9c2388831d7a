"""EViT: keep the attentive tokens, fuse the inattentive ones into one token.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
ICLR 2022 (official code: github.com/youweiliang/evit). Training-free here: no parameters.

At each block of ``blocks``, between its attention and its MLP (as the paper): the patch tokens of the
current set (a fused token of an earlier step included) are scored by the attention of that block, the top
``ceil(keep_ratio * M)`` of the M current tokens are kept, and the others are fused into one token, their
attention-weighted average, appended after the kept ones. The MLP of that block and all later blocks run on
the smaller set. Every image of a batch keeps the same number of tokens, so the set really shrinks: no
padding, no masking, in training and inference alike.

The score (``score``):

- ``'cls'`` (the paper): the class token's attention to each token, averaged over heads. Needs a backbone
  with ``cls_token=True`` (e.g. DeiT's, loaded from ImageNet weights).
- ``'mean_attention'`` (our CLS-free choice for detection backbones, which have no class token): the
  attention each token receives, averaged over heads and over all queries.

Dense-safe (``restore``): the complete (B, N, C) set is rebuilt at :meth:`EViTReducer.finish`. Kept tokens go
back to their positions. A position fused into a token is restored from the token that carries it at the
end: with ``'fused'`` (default) it gets that fused token's final value (a fused token that is fused again
hands its positions on to the new one), so every position of a cluster holds the cluster's value; with
``'last'`` it keeps its own value from before the block that fused it, and the fused token only serves the
attention of the later blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    PRUNED,
    TokenReducer,
    check_blocks,
    check_fractions,
    check_min_keep,
    check_per_block,
    cumulative,
    keep_rate_stats,
)
from .toolkit import attention_half, keep_count, mlp_half

SCORES = ("cls", "mean_attention")
FUSIONS = ("mean", "sum", "none")
RESTORES = ("fused", "last")


@dataclass
class EViTState:
    """What one forward of :class:`EViTReducer` remembers.

    Attributes:
        num_prefix: Prefix tokens in front of the patch tokens.
        hw: Patch grid (h, w).
        batch: Images B.
        owner: (B, h*w) long, for every patch position the index of the current patch-part token that carries
            it (-1: dropped, with ``fuse='none'``).
        fused: (B, M) bool, which current patch-part tokens are fused tokens.
        reduced: Whether a block has reduced the set yet.
        last: (B, h*w, C) with ``restore='last'``: the value each position had before the block that fused or
            dropped its token; None until a block reduces.
        fused_tokens: Tokens fused so far, per image.
        counts: Block index -> tokens (prefix included) the block's input had, one number for the batch.
        maps: Reducing block index -> (B, h*w) long token map after its reduction (see ``token_maps``).
        fractions: Reducing block index -> (B,) patch-part tokens after the reduction / h*w.
    """

    num_prefix: int
    hw: tuple[int, int]
    batch: int
    owner: Tensor
    fused: Tensor
    reduced: bool = False
    last: Tensor | None = None
    fused_tokens: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    maps: dict[int, Tensor] = field(default_factory=dict)
    fractions: dict[int, Tensor] = field(default_factory=dict)


class EViTReducer(TokenReducer):
    """EViT token reorganisation (Liang et al., ICLR 2022); see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Blocks that reduce the token set between their attention and MLP, strictly increasing
            (the paper's DeiT setting: 3, 6, 9).
        keep_ratio: Fraction of the current patch-part tokens kept at each reducing block, in (0, 1] (the
            paper's keep rate); one number for all, or one per reducing block. The paper's main setting is 0.7.
        score: ``'cls'`` (class-token attention, the paper's; needs ``cls_token=True``) or
            ``'mean_attention'`` (attention received, averaged over heads and queries; CLS-free).
        fuse: How the inattentive tokens become one: ``'mean'`` (attention-weighted average, the paper's
            text), ``'sum'`` (attention-weighted sum, the official code), or ``'none'`` (dropped, no fused
            token: EViT without fusion).
        restore: What a fused position holds in the output map: ``'fused'`` (its fused token's final value) or
            ``'last'`` (its own value from before it was fused). ``fuse='none'`` needs ``'last'``.
        min_keep: Tokens kept at least at every reducing block (>= 1).
    """

    renamed_keys = {"reduce_blocks": "blocks", "keep_rate": "keep_ratio"}

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = (3, 6, 9),
        keep_ratio: float | Sequence[float] = 0.7,
        score: str = "cls",
        fuse: str = "mean",
        restore: str = "fused",
        min_keep: int = 1,
    ) -> None:
        super().__init__()
        blocks = check_blocks(blocks)
        single = isinstance(keep_ratio, (int, float))
        ratios = (keep_ratio,) * len(blocks) if single else tuple(keep_ratio)
        check_per_block(ratios, blocks, "keep_ratio", single_ok=True)
        ratios = check_fractions(ratios, "keep_ratio")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if fuse not in FUSIONS:
            raise ValueError(f"fuse must be one of {FUSIONS}, got {fuse!r}")
        if restore not in RESTORES:
            raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
        if fuse == "none" and restore == "fused":
            raise ValueError("fuse='none' leaves no fused token to restore positions from: use restore='last'")
        check_min_keep(min_keep)
        self.embed_dim = embed_dim
        self.blocks = blocks
        self.keep_ratio = float(keep_ratio) if single else ratios
        self.score = score
        self.fuse = fuse
        self.restore = restore
        self.min_keep = min_keep
        self.ratio_of = dict(zip(blocks, ratios))

    def keep_schedule(self, depth: int | None = None, num_patches: int | None = None) -> tuple[float, ...]:
        """The running product of the keep ratios (the fused token not counted)."""
        return cumulative(self.ratio_of[b] for b in self.blocks)

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, keep_ratio={self.keep_ratio}, score={self.score!r}, "
            f"fuse={self.fuse!r}, restore={self.restore!r}"
        )

    # the three calls of the backbone

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, EViTState]:
        if self.score == "cls" and num_prefix != 1:
            raise ValueError(
                "EViT score='cls' needs a class token: build the backbone with cls_token=True, or use "
                "score='mean_attention' (CLS-free)"
            )
        B, n = x.shape[0], hw[0] * hw[1]
        owner = torch.arange(n, device=x.device).expand(B, n)
        fused = torch.zeros(B, n, dtype=torch.bool, device=x.device)
        return x, EViTState(num_prefix=num_prefix, hw=tuple(hw), batch=B, owner=owner, fused=fused)

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: EViTState) -> Tensor:
        state.counts[index] = x.shape[1]
        ratio = self.ratio_of.get(index)
        if ratio is None:
            return block(x)
        P, M = state.num_prefix, x.shape[1] - state.num_prefix
        k = keep_count(ratio, M, min_keep=self.min_keep)
        if k == M:
            self._record(index, state)
            return block(x)
        half = attention_half(block, x, attn_rows="first" if self.score == "cls" else "all")
        y = self._reduce(half.x, x, self._scores(half.attn, P), k, state)
        self._record(index, state)
        return mlp_half(block, y)

    def finish(self, x: Tensor, state: EViTState) -> Tensor:
        if not state.reduced:
            return x
        P, owner = state.num_prefix, state.owner.clamp(min=0)
        patches = x[:, P:].gather(1, owner.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.restore == "last":
            own_token = (state.owner >= 0) & ~state.fused.gather(1, owner)
            patches = torch.where(own_token.unsqueeze(-1), patches, state.last)
        return torch.cat([x[:, :P], patches], dim=1)

    def stats(self, state: EViTState) -> dict[str, float | Tensor]:
        """``keep_rate.block{i}`` (0-dim, mean over images; tokens after the reduction / h*w, the fused token
        counted), ``keep_rate_per_image.block{i}`` (B,) and ``keep_rate.mean`` over the reducing blocks."""
        return keep_rate_stats(state.fractions)

    def token_counts(self, state: EViTState, depth: int) -> Tensor:
        """Tokens of each block's input. A reducing block runs its MLP on fewer tokens than its attention;
        it is counted at its input, so the MACs of the reducing blocks' MLPs are overestimated. Blocks this
        forward did not run (another stage of ViT-Adapter) are counted with every token."""
        full = state.num_prefix + state.hw[0] * state.hw[1]
        counts = torch.tensor([float(state.counts.get(i, full)) for i in range(depth)], device=state.owner.device)
        return counts[:, None].expand(depth, state.batch).clone()

    def extra_macs(self, state: EViTState) -> float:
        """The fusion: one multiply-accumulate per channel of every token fused, at every reducing block."""
        return float(state.fused_tokens * self.embed_dim)

    def token_maps(self, state: EViTState) -> dict[int, Tensor]:
        """After each reducing block: a position carried alone has its own index as id; the positions fused
        into one token share an id (the smallest of them); dropped ones (``fuse='none'``) are ``PRUNED``."""
        return dict(state.maps)

    # reduction

    def _scores(self, attn: Tensor, num_prefix: int) -> Tensor:
        """Attention probabilities (B, heads, N, N), or the class token's row only (B, heads, 1, N) for
        ``score='cls'`` -> (B, M) score of each patch-part token."""
        if self.score == "cls":
            return attn[:, :, 0, num_prefix:].mean(dim=1)
        return attn[:, :, :, num_prefix:].mean(dim=(1, 2))

    def _reduce(self, y: Tensor, x: Tensor, scores: Tensor, k: int, state: EViTState) -> Tensor:
        """Keep the top-k patch-part tokens of y (B, P + M, C) by score, fuse the rest; update the state.

        ``x`` is the block's input: the value a position keeps with ``restore='last'`` when its token is fused.
        """
        P, C = state.num_prefix, y.shape[-1]
        B, M = scores.shape
        order = scores.argsort(dim=1, descending=True)
        top = order[:, :k].sort(dim=1).values  # kept tokens stay in their current order
        rest = order[:, k:]
        patch = y[:, P:]
        parts = [y[:, :P], patch.gather(1, top.unsqueeze(-1).expand(-1, -1, C))]
        new_slot = torch.full((B, M), -1, dtype=torch.long, device=y.device)
        new_slot.scatter_(1, top, torch.arange(k, device=y.device).expand(B, k))
        fused = state.fused.gather(1, top)
        if self.fuse != "none":
            weights = scores.gather(1, rest).unsqueeze(-1)
            token = (patch.gather(1, rest.unsqueeze(-1).expand(-1, -1, C)) * weights).sum(dim=1, keepdim=True)
            if self.fuse == "mean":
                token = token / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
            parts.append(token)
            new_slot.scatter_(1, rest, k)
            fused = torch.cat([fused, fused.new_ones(B, 1)], dim=1)
            state.fused_tokens += M - k
        owner = state.owner.clamp(min=0)
        moved = new_slot.gather(1, owner)
        if self.restore == "last":
            # positions whose own token is fused or dropped now keep their value from before this block
            current = x[:, P:].gather(1, owner.unsqueeze(-1).expand(-1, -1, C))
            leaving = (state.owner >= 0) & ~state.fused.gather(1, owner) & ((moved < 0) | (moved == k))
            base = current if state.last is None else state.last
            state.last = torch.where(leaving.unsqueeze(-1), current, base)
        state.owner = torch.where(state.owner >= 0, moved, state.owner)
        state.fused = fused
        state.reduced = True
        return torch.cat(parts, dim=1)

    def _record(self, index: int, state: EViTState) -> None:
        """Token map and keep fraction after reducing block ``index``."""
        owner, n = state.owner, state.owner.shape[1]
        slots = int(state.fused.shape[1])
        positions = torch.arange(n, device=owner.device).expand_as(owner)
        slot = torch.where(owner >= 0, owner, slots)  # dropped positions go to a spare column
        first = torch.full((state.batch, slots + 1), n, dtype=torch.long, device=owner.device)
        first = first.scatter_reduce(1, slot, positions, reduce="amin")
        ids = torch.where(owner >= 0, first.gather(1, slot), torch.full_like(owner, PRUNED))
        state.maps[index] = ids
        state.fractions[index] = torch.full((state.batch,), slots / n, device=owner.device)
