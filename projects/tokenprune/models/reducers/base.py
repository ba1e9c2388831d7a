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

One vocabulary, read by tools and tests: every reducer has ``blocks`` (the config key and attribute: the block
indices it reduces at, strictly increasing; None where a reducer reduces every block),
:meth:`TokenReducer.reduced_blocks` and :meth:`TokenReducer.keep_schedule`. Config keys renamed to it are
refused with the new name (``renamed_keys``); ``docs/reducers.md`` tabulates the keys of all reducers.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ConfigError

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
        runs_on_grid: True for a reducer that can drive windowed and relative-position blocks (ViTDet): it
            keeps every token at its place on the (h, w) grid between blocks and runs the blocks with the grid
            (SViT and TPC on the kept tokens of each window, ToMe merging inside each window, through
            :mod:`tokenprune.models.reducers.windowed`); the backbone refuses the others (:meth:`use_grid`).
        renamed_keys: Old config key -> its new name; a config (or constructor call) that still uses an old
            key is refused with a message that gives the new one (:func:`reject_renamed_keys`).
        embed_dim: Token channels C the reducer was built for (set by every constructor).
        blocks: The reduced block indices, strictly increasing, as configured; None: every block of the backbone
            (merging reducers' default). Read it through :meth:`reduced_blocks`.
    """

    keeps_token_set: bool = False
    runs_on_grid: bool = False
    renamed_keys: ClassVar[dict[str, str]] = {}
    embed_dim: int
    blocks: tuple[int, ...] | None

    def __new__(cls, *args: Any, **kwargs: Any) -> TokenReducer:
        reject_renamed_keys(cls, kwargs)
        return super().__new__(cls)

    # the vocabulary

    def reduced_blocks(self, depth: int | None = None) -> tuple[int, ...]:
        """The blocks this reducer acts at (prunes, pauses, merges or gates), sorted.

        Args:
            depth: The backbone's number of blocks; needed only by a reducer configured to reduce every block
                (``blocks=None``), else ignored.
        """
        if self.blocks is not None:
            return self.blocks
        if depth is None:
            raise ValueError(f"{type(self).__name__} reduces every block: reduced_blocks() needs the backbone's depth")
        return tuple(range(depth))

    @abc.abstractmethod
    def keep_schedule(self, depth: int | None = None, num_patches: int | None = None) -> tuple[float, ...]:
        """The nominal keep schedule: for each block of :meth:`reduced_blocks`, the fraction of the image's patch
        tokens kept after it (cumulative over the reduced blocks so far), in (0, 1].

        Nominal: what the configured budget asks, before rounding to whole tokens and without a method's extra
        tokens (EViT's fused token, BAT's clusters); a learned-gate method's targets (its realised rate varies
        per image). A per-block ratio ``keep_ratio`` gives the running product of the ratios; cumulative
        targets ``keep_targets`` are the schedule as they are.

        Args:
            depth: The backbone's number of blocks (see :meth:`reduced_blocks`).
            num_patches: Patch tokens per image; needed only for budgets in absolute counts (``r``).
        """

    def check_backbone(self, depth: int, embed_dim: int) -> None:
        """Called by the backbone's constructor; raise ValueError if the reducer does not fit the backbone:
        built for another ``embed_dim``, or reduced blocks beyond ``depth``."""
        name = type(self).__name__
        if embed_dim != self.embed_dim:
            raise ValueError(f"{name} was built for embed_dim={self.embed_dim}, the backbone has {embed_dim}")
        blocks = self.reduced_blocks(depth)
        if blocks and blocks[-1] >= depth:
            raise ValueError(f"{name} blocks {blocks} do not fit a backbone of depth {depth}")

    def use_grid(self, grid: bool) -> None:
        """Called by the backbone when it attaches the reducer, after :meth:`check_backbone`: ``grid`` is True when
        its blocks need the token grid (windows or relative positions; only a ``runs_on_grid`` reducer gets
        there). Default: nothing (SViT and TPC dispatch per block on ``block.needs_grid``); ToMe merges inside
        each window then, instead of shrinking the token set. May raise ValueError for settings that do not fit."""

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


def keep_rate_stats(fractions: dict[int, Tensor]) -> dict[str, Tensor]:
    """The keep-rate statistics every reducer reports, from block -> (B,) kept fraction of each image's patch
    tokens: ``keep_rate.block{i}`` (0-dim, mean over images), ``keep_rate_per_image.block{i}`` (B,) and
    ``keep_rate.mean`` (mean over the blocks, in the dict's order); detached tensors, so logging forces no device
    sync here."""
    out: dict[str, Tensor] = {}
    for block, f in fractions.items():
        out[f"keep_rate.block{block}"] = f.detach().mean()
        out[f"keep_rate_per_image.block{block}"] = f.detach()
    if fractions:
        out["keep_rate.mean"] = torch.stack([f.detach().mean() for f in fractions.values()]).mean()
    return out


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


# ------------------------------------------------------------------------------------------ config validation


def reject_renamed_keys(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse config keys that were renamed: ConfigError naming the new key.

    Args:
        cls: The reducer class; its ``renamed_keys`` maps old keys to new ones.
        kwargs: The constructor's keyword arguments.
    """
    for old, new in getattr(cls, "renamed_keys", {}).items():
        if old in kwargs:
            raise ConfigError(f"{cls.__name__}: {old!r} was renamed to {new!r}; write {new}=... in the config")


def check_blocks(blocks: Iterable[int], non_empty: bool = False) -> tuple[int, ...]:
    """``blocks`` as a tuple of ints; ValueError unless non-negative and strictly increasing (and, with
    ``non_empty``, not empty).

    Args:
        blocks: Block indices, as configured.
        non_empty: Refuse an empty list.
    """
    blocks = tuple(int(b) for b in blocks)
    if (non_empty and not blocks) or any(b < 0 for b in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:])):
        empty = "non-empty, " if non_empty else ""
        raise ValueError(f"blocks must be {empty}non-negative and strictly increasing, got {blocks}")
    return blocks


def check_fractions(values: Sequence[float], name: str) -> tuple[float, ...]:
    """``values`` as a tuple of floats; ValueError unless each is in (0, 1].

    Args:
        values: The configured fractions.
        name: Their config key, for the message.
    """
    values = tuple(float(v) for v in values)
    if not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"{name} must each be in (0, 1] (1.0: keep every token), got {values}")
    return values


def check_min_keep(min_keep: int) -> None:
    """ValueError unless ``min_keep`` (patch tokens kept per image at least) is >= 1: attention needs a key.

    Args:
        min_keep: The configured value.
    """
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1 (attention needs a key), got {min_keep}")


def check_per_block(values: Sequence, blocks: Sequence[int], name: str, single_ok: bool = False) -> None:
    """ValueError unless ``values`` has one entry per reduced block.

    Args:
        values: The per-block values.
        blocks: The reduced blocks.
        name: The values' config key, for the message.
        single_ok: The key also takes a single value for all blocks (mentioned in the message).
    """
    if len(values) != len(blocks):
        single = " (or a single value)" if single_ok else ""
        raise ValueError(
            f"{name} needs one value per reducing block{single}: got {len(values)} values {tuple(values)} for "
            f"{len(blocks)} reducing blocks {tuple(blocks)}"
        )


def cumulative(ratios: Iterable[float]) -> tuple[float, ...]:
    """Per-block keep ratios -> the running products: the nominal keep schedule of a per-block budget."""
    out, kept = [], 1.0
    for ratio in ratios:
        kept *= ratio
        out.append(kept)
    return tuple(out)
