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
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .merging import MergeState, MergingReducer, bipartite_merge_rounds, merge_tokens
from .toolkit import attention_half, mlp_half

#: keep ratio per block by default: 0.875 ** 12 = 0.2 of the tokens after 12 blocks, the final count of ToMe's
#: DeiT-S setting r = 13 at 224 x 224 (196 -> 40 patch tokens)
DEFAULT_KEEP_RATIO = 0.875


class ToMeReducer(MergingReducer):
    """ToMe (Bolya et al., ICLR 2023) for the dense ViT backbone.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the merging blocks; None (default): every block, as ToMe.
        keep_ratio: Fraction in (0, 1] of its patch tokens each merging block keeps (a list: one per merging
            block); 1.0 merges nothing. Default 0.875.
        r: Instead of ``keep_ratio``: tokens merged per block, the paper's classification budget (DeiT-S:
            13), at most half the patch tokens.
        prop_attn: Proportional attention (the paper's, for models not trained with merging).
    """

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] | None = None,
        keep_ratio: float | Sequence[float] | None = None,
        r: int | Sequence[int] | None = None,
        prop_attn: bool = True,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_ratio, r, prop_attn, DEFAULT_KEEP_RATIO)

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
