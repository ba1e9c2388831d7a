"""The bases of learned-gate reducers: per-token keep decisions at the blocks of ``blocks`` against keep targets.

:class:`KeepMaskReducer` (SViT, TPC, DynamicViT): the configuration (``blocks``, ``keep_targets``, ``min_keep``,
``tau``), the per-forward state, and what such a reducer reports, from the keep mask of each decided block:
keep rates, token counts and token maps. :class:`GatedReducer` (SViT, TPC) adds calibrated inference thresholds.

A :class:`GatedReducer` keeps the token set (pruned or paused tokens stay in place with their value). At each
block of ``blocks`` its subclass scores every patch token (a gate's p_keep, TPC's probability of running) and
decides which ones the block runs:

- Training: the subclass samples the decision (straight-through) and runs all tokens, the others masked out as
  keys (:func:`tokenprune.models.reducers.toolkit.run_masked`).
- Inference (see :data:`INFERENCE_RULES`): ``'threshold'`` keeps a token if its score clears the block's
  calibrated threshold (the rate then varies per image); ``'fixed'`` keeps the ``ceil(target * N)`` top-scored
  of the N patch tokens; the subclass may offer more rules (SViT's official ones). The kept tokens are gathered
  (:func:`tokenprune.models.reducers.toolkit.run_on_kept`). At least ``min_keep`` patch tokens are kept, in
  training too.

Thresholds: a buffer per block (saved in checkpoints), an EMA (``threshold_momentum``) of the per-batch
(1 - target) quantile of the scores, updated by every training forward, and by eval forwards inside ``with
reducer.calibration():``, which recalibrates from scratch with every batch weighing the same (the calibration
hook and ``tools/analysis_tools/recalibrate.py`` use it). A block whose threshold was never updated, or whose
target is 1.0, decides by the fixed rule (:meth:`GatedReducer.inference_fallbacks` says where). Under
DistributedDataParallel buffers are broadcast from rank 0 at each forward, so thresholds follow rank 0's batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import (
    TokenReducer,
    check_blocks,
    check_fractions,
    check_min_keep,
    check_per_block,
    dense_token_counts,
    keep_masks_to_token_maps,
    keep_rate_stats,
)
from .toolkit import keep_count, topk_mask, update_threshold

DEFAULT_BLOCKS = tuple(range(3, 12))
DEFAULT_KEEP_TARGETS = (0.7,) * 3 + (0.49,) * 3 + (0.343,) * 3
"""The default schedule of the learned-gate reducers on a 12-block backbone: SViT's paper (0.7 ** s)."""

INFERENCE_RULES = ("threshold", "fixed", "official", "sample")
"""Inference rules of the learned-gate reducers: calibrated threshold (default), fixed budget, and SViT's official
deterministic rule (p_keep > 0.5) and official evaluation rule (a hard Gumbel draw per token)."""

FALLBACK_REASONS = {
    "uncalibrated": "never calibrated",
    "keep_all": "keep target 1.0: every token kept",
}


@dataclass
class KeepMaskState:
    """What one forward of a :class:`KeepMaskReducer` remembers.

    Attributes:
        num_prefix: Prefix tokens in front of the patch tokens.
        hw: Patch grid (h, w).
        batch: Images B.
        device: Device of the tokens.
        gathered: Whether decided blocks ran on the kept tokens only (inference) rather than on all tokens with
            the others masked (training).
        fractions: Decided block index -> (B,) kept fraction of each image's patch tokens (gradients in
            training).
        masks: Decided block index -> (B, h*w) bool decision, detached.
    """

    num_prefix: int
    hw: tuple[int, int]
    batch: int
    device: torch.device
    gathered: bool
    fractions: dict[int, Tensor] = field(default_factory=dict)
    masks: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class GatedState(KeepMaskState):
    """What one forward of a :class:`GatedReducer` remembers: a :class:`KeepMaskState`, and

    Attributes:
        keep: (B, h*w) the last decision: float {0, 1} carrying straight-through gradients in training, bool at
            inference; None before the first decided block.
    """

    keep: Tensor | None = None


class KeepMaskReducer(TokenReducer):
    """Base class of reducers that decide a keep mask over the patch tokens at each block of ``blocks``, from a
    learned gate per block, against keep targets (cumulative fractions of the image's patch tokens).

    A subclass runs its blocks and calls :meth:`record_mask` at each decided block; this class starts the state
    (``state_type``) and reports from the masks: keep rates (:meth:`stats`), token maps and token counts (the
    kept tokens at a decided block at inference; with ``keeps_token_set`` False, also at the blocks after it up
    to the next decided one, as the dropped tokens left the set).

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: The decided blocks, strictly increasing.
        keep_targets: Target fraction of each image's patch tokens kept at each decided block, in (0, 1].
        min_keep: Patch tokens kept per image at least, at every decided block (>= 1).
        tau: Temperature of the training samples (> 0).
    """

    state_type: ClassVar[type[KeepMaskState]] = KeepMaskState

    def __init__(
        self, embed_dim: int, blocks: Sequence[int], keep_targets: Sequence[float], min_keep: int, tau: float
    ) -> None:
        super().__init__()
        blocks, targets = check_blocks(blocks), tuple(float(t) for t in keep_targets)
        check_per_block(targets, blocks, "keep_targets")
        check_fractions(targets, "keep_targets")
        check_min_keep(min_keep)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.embed_dim = embed_dim
        self.blocks = blocks
        self.keep_targets = targets
        self.min_keep = min_keep
        self.tau = tau
        self.gate_index = {block: g for g, block in enumerate(blocks)}

    def keep_schedule(self, depth: int | None = None, num_patches: int | None = None) -> tuple[float, ...]:
        """The keep targets, one per decided block (not cumulative products: each is a fraction of the image's
        patch tokens already)."""
        return self.keep_targets

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, KeepMaskState]:
        state = self.state_type(
            num_prefix=num_prefix, hw=tuple(hw), batch=x.shape[0], device=x.device, gathered=not self.training
        )
        return x, state

    def record_mask(self, block: int, keep: Tensor, state: KeepMaskState) -> Tensor:
        """Remember decided block ``block``'s decision (B, Np) (float {0, 1} with gradients, or bool): its kept
        fraction per image and its detached bool mask, which it returns."""
        mask = keep.detach() > 0.5 if keep.is_floating_point() else keep
        state.fractions[block] = keep.float().mean(dim=1)
        state.masks[block] = mask
        return mask

    # what the backbone keeps afterwards

    def stats(self, state: KeepMaskState) -> dict[str, float | Tensor]:
        """``keep_rate.block{i}`` (0-dim, mean over images), ``keep_rate_per_image.block{i}`` (B,), and
        ``keep_rate.mean`` over the decided blocks; detached."""
        return keep_rate_stats(state.fractions)

    def token_counts(self, state: KeepMaskState, depth: int) -> Tensor:
        """All tokens in training (masking runs every token) and before the first decided block; at inference
        prefix + kept at each decided block (and, for a reducer that drops tokens from the set, at the blocks
        after it up to the next decided one)."""
        n = state.num_prefix + state.hw[0] * state.hw[1]
        counts = dense_token_counts(depth, state.batch, n, device=state.device)
        if state.gathered:
            for block, keep in sorted(state.masks.items()):
                rows = block if self.keeps_token_set else slice(block, None)  # dropped tokens stay dropped
                counts[rows] = state.num_prefix + keep.sum(dim=1).float()
        return counts

    def token_maps(self, state: KeepMaskState) -> dict[int, Tensor]:
        """Kept positions carry their own index, pruned (paused, dropped) ones ``PRUNED``."""
        return keep_masks_to_token_maps(state.masks)


class GatedReducer(KeepMaskReducer):
    """Base class of learned-gate reducers; see the module docstring.

    A subclass builds its per-block modules after calling this constructor, implements :meth:`run_gated`
    (and :meth:`gate_macs_per_token`), and may add inference rules (``inference_rules_offered``, decided in
    :meth:`decide_by_rule`).

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: The decided blocks (the others run densely), strictly increasing.
        keep_targets: Target fraction of each image's patch tokens kept at each decided block, in (0, 1].
        min_keep: Patch tokens kept per image at least, at every decided block (>= 1).
        tau: Temperature of the training samples.
        inference: The inference rule, one of ``inference_rules_offered``.
        threshold_momentum: EMA momentum of the threshold calibration, in (0, 1].
    """

    keeps_token_set = True  # pruned / paused tokens stay in the token tensor
    inference_rules_offered: ClassVar[tuple[str, ...]] = ("threshold", "fixed")
    state_type: ClassVar[type[GatedState]] = GatedState

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int],
        keep_targets: Sequence[float],
        min_keep: int,
        tau: float,
        inference: str,
        threshold_momentum: float,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_targets, min_keep, tau)
        if inference not in self.inference_rules_offered:
            raise ValueError(f"inference must be one of {self.inference_rules_offered}, got {inference!r}")
        if not 0.0 < threshold_momentum <= 1.0:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.inference = inference
        self.threshold_momentum = threshold_momentum
        self.calibrating = False  # eval forwards update the thresholds (set by calibration())
        self.register_buffer("thresholds", torch.zeros(len(self.blocks)))
        self.register_buffer("calibration_steps", torch.zeros(len(self.blocks), dtype=torch.long))

    # what a subclass implements

    def run_gated(self, g: int, block: nn.Module, x: Tensor, state: GatedState) -> Tensor:
        """Run decided block ``self.blocks[g]`` on tokens x (B, N, C); return (B, N, C)."""
        raise NotImplementedError

    def gate_macs_per_token(self) -> int:
        """Multiply-accumulates of the method's own computation per patch token at a decided block."""
        raise NotImplementedError

    def decide_by_rule(self, rule: str, log_p: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """The (B, Np) bool decision of a subclass's own inference rule (beyond threshold and fixed)."""
        raise NotImplementedError(f"{type(self).__name__} has no inference rule {rule!r}")

    # the calls of the backbone, beyond the base's

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: GatedState) -> Tensor:
        g = self.gate_index.get(index)
        if g is None:
            return block(x, None, state.hw)
        return self.run_gated(g, block, x, state)

    def finish(self, x: Tensor, state: GatedState) -> Tensor:
        return x  # pruned / paused tokens were never removed from x

    def extra_macs(self, state: GatedState) -> float:
        """The method's own computation (:meth:`gate_macs_per_token`) over every patch token, at every decided
        block."""
        return float(len(state.masks) * state.hw[0] * state.hw[1] * self.gate_macs_per_token())

    # decisions

    def decide(
        self, g: int, scores: Tensor, log_p: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, Np) scores (higher = keep) -> (B, Np) bool decision at inference at decided block ``g`` (index into
        ``blocks``), by the rule :meth:`inference_rules` names for it; at least ``min_keep`` kept.

        Args:
            g: Index into ``blocks``.
            scores: (B, Np) scores.
            log_p: (B, Np, 2) the gate's (keep, prune) log-probabilities, for a subclass's own rules.
            generator: Random source of a sampling rule.
        """
        rule = self._block_rule(g)[0]
        if rule == "fixed":
            target = self.keep_targets[g]
            if target >= 1.0:
                keep = torch.ones_like(scores, dtype=torch.bool)
            else:
                keep = topk_mask(scores, keep_count(target, scores.shape[1]))
        elif rule == "threshold":
            keep = scores >= self.thresholds[g]
        else:
            keep = self.decide_by_rule(rule, log_p, generator)
        return keep | topk_mask(scores, self.min_keep)

    def record(self, g: int, keep: Tensor, state: GatedState) -> Tensor:
        """Remember decided block ``g``'s decision (B, Np) (float with gradients, or bool); returns its detached
        bool mask; the decision is the state's ``keep`` from now on."""
        state.keep = keep
        return self.record_mask(self.blocks[g], keep, state)

    def stacked_fractions(self, state: GatedState) -> Tensor:
        """(G, B) kept fractions at the decided blocks, in block order (gradients in training)."""
        return torch.stack([state.fractions[b] for b in self.blocks])

    # thresholds and their calibration

    def reset_thresholds(self) -> None:
        """Forget the calibrated thresholds: inference falls back to the fixed rule until recalibrated."""
        self.thresholds.zero_()
        self.calibration_steps.zero_()

    @contextmanager
    def calibration(self) -> Iterator[GatedReducer]:
        """Recalibrate the thresholds from scratch on the forwards run inside the block::

            model.eval()
            with torch.no_grad(), reducer.calibration():
                for images in batches:
                    model(images)

        On entry the thresholds are reset; every eval forward inside then updates them with equal weight per
        batch (the mean over batches of the threshold at which each batch keeps exactly its target), and
        decides by the threshold rule (a block's threshold applied as at test time, from the first batch on),
        whatever ``inference`` is set to. On exit ``inference``, ``threshold_momentum`` and ``calibrating`` are
        restored. Run it on training images, in eval mode (a training forward updates the thresholds too, but
        decides by its samples).
        """
        saved = self.inference, self.threshold_momentum, self.calibrating
        self.reset_thresholds()
        self.inference, self.threshold_momentum, self.calibrating = "threshold", 0.0, True
        try:
            yield self
        finally:
            self.inference, self.threshold_momentum, self.calibrating = saved

    def update_threshold(self, g: int, scores: Tensor, floor: float | None = 0.0) -> None:
        """One calibration step of block ``g``'s threshold on this batch's (B, Np) scores (EMA of the score at
        which the batch keeps its target; ``floor`` bounds that score from below, None: no bound)."""
        update_threshold(
            self.thresholds, self.calibration_steps, g, scores, self.keep_targets[g], self.threshold_momentum, floor
        )

    def _block_rule(self, g: int) -> tuple[str, str | None]:
        """The rule block ``g`` (index into ``blocks``) applies at inference now, and why it is not the
        configured one (a key of ``FALLBACK_REASONS``; None when it is)."""
        if self.inference != "threshold":
            return self.inference, None
        if self.keep_targets[g] >= 1.0:
            return "fixed", "keep_all"
        if not bool(self.calibration_steps[g]):
            return "fixed", "uncalibrated"
        return "threshold", None

    def inference_rules(self) -> dict[int, str]:
        """Block index -> the inference rule (one of :data:`INFERENCE_RULES`) its decision follows now: the
        configured ``inference``, except ``'fixed'`` where ``'threshold'`` falls back to it."""
        return {block: self._block_rule(g)[0] for g, block in enumerate(self.blocks)}

    def inference_fallbacks(self) -> dict[int, str]:
        """Block index -> why it does not follow the configured rule (blocks that do are left out): a
        ``'threshold'`` block never calibrated, or with keep target 1.0, uses the fixed rule."""
        out = {}
        for g, block in enumerate(self.blocks):
            reason = self._block_rule(g)[1]
            if reason is not None:
                out[block] = FALLBACK_REASONS[reason]
        return out
