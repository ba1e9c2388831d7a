"""The interface between the ViT backbone and a token-reduction method.

Every method (SViT, PPT, ToMe, EViT, ...) is one :class:`TokenReducer` subclass in its own file. The backbone
(:class:`tokenprune.models.ViT`) drives it with three calls per forward::

    x, state = reducer.begin(x, hw, num_prefix)          # once, after the embedding
    for index, block in enumerate(blocks):
        x = reducer.run_block(index, block, x, state)    # the reducer decides how each block runs
    x = reducer.finish(x, state)                          # complete (B, N, C) token set again

and afterwards keeps ``reducer.aux_losses(state)``, ``reducer.stats(state)``, ``reducer.token_counts(state)``
(FLOP counting) and ``reducer.token_maps(state)`` (visualisation) for the detector wrapper, loggers and tools.
``state`` is a per-forward object the reducer defines; the reducer module itself holds only parameters and
buffers, so one reducer serves any batch and image size.

Dense-safe: whatever a reducer prunes, pauses or merges, :meth:`TokenReducer.finish`
returns every token position: pruned or paused tokens keep their last value, merged tokens are copied back to
all their source positions.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

PRUNED = -1  # token_maps value of a position no block input carried


class TokenReducer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of token-reduction methods for :class:`tokenprune.models.ViT`.

    Shapes: B images, N = ``num_prefix`` + h*w tokens (prefix, e.g. a CLS token, first), C channels.
    Between :meth:`begin` and :meth:`finish` a reducer may hand the blocks fewer tokens than N.

    Attributes:
        keeps_token_set: True for a reducer whose token tensor holds all N tokens between blocks (pruned or
            paused ones stay in place, e.g. SViT, TPC), so one forward may span any blocks; False (default)
            for one that shrinks the set, whose forward must cover its blocks from :meth:`begin` to
            :meth:`finish` (ViT-Adapter then runs one forward per stage).
    """

    keeps_token_set: bool = False

    def check_backbone(self, depth: int, embed_dim: int) -> None:  # noqa: B027 (optional hook)
        """Called by the backbone's constructor; raise ValueError if the reducer does not fit the backbone."""

    def check_width_and_blocks(self, depth: int, embed_dim: int, blocks_name: str, blocks) -> None:
        """The checks most reducers' :meth:`check_backbone` make: built for this ``embed_dim`` (the reducer's
        own ``self.embed_dim``), and the last of ``blocks`` (sorted block indices, named ``blocks_name`` in the
        message) inside a backbone of ``depth`` blocks."""
        if embed_dim != self.embed_dim:
            name = type(self).__name__
            raise ValueError(f"{name} was built for embed_dim={self.embed_dim}, the backbone has {embed_dim}")
        if blocks and blocks[-1] >= depth:
            raise ValueError(f"{blocks_name} {blocks} do not fit a backbone of depth {depth}")

    @abc.abstractmethod
    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, Any]:
        """Start a forward.

        Args:
            x: Embedded tokens (B, N, C), ``num_prefix`` prefix tokens first, then the h*w patch tokens in
                row-major order.
            hw: The patch grid (h, w).
            num_prefix: Number of prefix tokens (0 or 1).

        Returns:
            The tokens the first block sees, (B, N', C) with N' <= N, and the per-forward state.
        """

    @abc.abstractmethod
    def run_block(self, index: int, block: nn.Module, x: Tensor, state: Any) -> Tensor:
        """Run block ``index`` on the current tokens (B, N', C) and return the tokens after it (B, N'', C).

        ``block(x, attn_mask)`` is a :class:`tokenprune.models.vit.Block`; ``attn_mask`` is passed to
        scaled_dot_product_attention (bool, True = may attend, broadcastable to (B, heads, N', N')).
        """

    @abc.abstractmethod
    def finish(self, x: Tensor, state: Any) -> Tensor:
        """End a forward: the current tokens (B, N', C) -> the complete token set (B, N, C)."""

    def aux_losses(self, state: Any) -> dict[str, Tensor]:
        """Training losses of this forward (names contain ``loss`` so MMEngine sums them). Default: none."""
        return {}

    def stats(self, state: Any) -> dict[str, float | Tensor]:
        """Detached numbers for logging (e.g. realised keep rate per block). Default: none."""
        return {}

    @abc.abstractmethod
    def token_counts(self, state: Any, depth: int) -> Tensor:
        """Realised work of this forward: (depth, B) float, the number of tokens (prefix included) each image
        fed to each block as queries; attention is counted as these tokens attending to as many keys.

        It counts what the method needs, not padding: a padded batch costs at least the largest count. FLOP
        counters (:mod:`tokenprune.models.flops`) use it, so a reducer must report what really ran in the
        current mode (e.g. all N tokens in a training forward that only masks, the kept ones at inference).
        """

    def extra_macs(self, state: Any) -> Tensor | float:
        """Multiply-accumulates per image of the method's own computation (gates, scores, matching), (B,)
        or a scalar. Default: 0."""
        return 0.0

    def token_maps(self, state: Any) -> dict[int, Tensor]:
        """What each reducing block did to each patch position, for visualisation and statistics.

        Returns:
            Block index -> (B, h*w) long tensor over the patch grid (row-major, prefix excluded): ``PRUNED``
            (-1) where that block's input did not carry the position (pruned, paused or dropped: it kept an
            old value), otherwise the id of the token that carried it; positions merged into one token share
            its id, a position run on its own has its own index as id. Blocks the reducer left alone may be
            omitted. Default: none.
        """
        return {}


def keep_masks_to_token_maps(masks: dict[int, Tensor]) -> dict[int, Tensor]:
    """Block index -> (B, h*w) bool keep mask, as :meth:`TokenReducer.token_maps`: each kept position carries
    its own index, the others ``PRUNED``."""
    out = {}
    for block, keep in masks.items():
        ids = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        out[block] = torch.where(keep, ids, torch.full_like(ids, PRUNED))
    return out


def dense_token_counts(depth: int, batch: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """(depth, B) token counts of a dense forward: every block sees all ``num_tokens`` tokens."""
    return torch.full((depth, batch), float(num_tokens), device=device)
