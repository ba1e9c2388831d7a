"""The interface between the ViT backbone and a token-reduction method.

Every method (SViT, PPT, ToMe, EViT, ...) is one :class:`TokenReducer` subclass in its own file. The backbone
(:class:`tokenprune.models.ViT`) drives it with three calls per forward::

    x, state = reducer.begin(x, hw, num_prefix)          # once, after the embedding
    for index, block in enumerate(blocks):
        x = reducer.run_block(index, block, x, state)    # the reducer decides how each block runs
    x = reducer.finish(x, state)                          # complete (B, N, C) token set again

and afterwards keeps ``reducer.aux_losses(state)`` and ``reducer.stats(state)`` for a detector wrapper and
loggers. ``state`` is a per-forward object the reducer defines; the reducer module itself holds only
parameters and buffers, so one reducer serves any batch and image size.

Dense-safe (METHODS.md section 6): whatever a reducer prunes, pauses or merges, :meth:`TokenReducer.finish`
returns every token position: pruned or paused tokens keep their last value, merged tokens are copied back to
all their source positions.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor, nn


class TokenReducer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of token-reduction methods for :class:`tokenprune.models.ViT`.

    Shapes: B images, N = ``num_prefix`` + h*w tokens (prefix, e.g. a CLS token, first), C channels.
    Between :meth:`begin` and :meth:`finish` a reducer may hand the blocks fewer tokens than N.
    """

    def check_backbone(self, depth: int, embed_dim: int) -> None:  # noqa: B027 (optional hook)
        """Called by the backbone's constructor; raise ValueError if the reducer does not fit the backbone."""

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
