"""TPC: a token propagation controller that pauses tokens and restarts them later.

Zhu, "TPC-ViT: Token Propagation Controller for Efficient Vision Transformer", arXiv 2401.01470, 2024
(arXiv 2401.01470). No code is public and the paper is known to us from its abstract only, which names
four parts: a **pause probability** per token (skip the current block), a **restart probability** (come back
at a later block), a **smoothing** regulariser on these distributions against noisy outliers, and a **model
stabilizer** that implicitly encodes local image structure. How each part works here is our design
(``docs/reducers/tpc.md``):

- Controller: every block of ``controlled_blocks`` owns a head LayerNorm(C) -> Linear(C, C/4) -> GELU ->
  Linear(C/4, 2) giving two logits per patch token, pause and restart, p = sigmoid(logit). A token active
  before the block is paused with probability p_pause; a paused token restarts with probability p_restart.
  Its probability of running the block is ``s = 1 - p_pause`` if it was active, ``s = p_restart`` if paused.
  Before the first controlled block every token is active; prefix (CLS) tokens always run.
- Stabilizer: a depth-wise 3x3 convolution on the token grid per controlled block, initialised to zero;
  a paused token skips the block but gets ``x + dwconv(x)`` at its position, so it still follows its
  neighbourhood, cheaply (9 C multiply-accumulates per token). ``stabilizer=False``: a paused token keeps its
  last value exactly.
- Smoothing: ``loss_tpc_smooth = weight * mean (p - mean_3x3(p))^2`` over both probability maps on the grid
  and all controlled blocks: a token's probability should not stand out from its neighbours'.
- Budget: ``loss_tpc_budget = weight * mean_blocks (batch-mean fraction of active tokens - target)^2``.

Training: each decision is a Bernoulli sample by the Gumbel (logistic-noise) trick, hard, with
straight-through gradients; all tokens run through the block, paused ones masked out as attention keys, and
the output is ``a * block(x) + (1 - a) * stabilized(x)`` with a in {0, 1} the token's new state.

Inference is deterministic and gathers: the active tokens of each image are gathered, the block runs on them
only (images with different counts are padded and the padding masked, :func:`.svit.run_on_kept`) and
scattered back. A token runs if its s clears a per-block threshold calibrated like SViT's
(``inference='threshold'``, an EMA over training batches of the s at which the batch meets its target; the
rate varies per image; ``SViTCalibrationHook`` recalibrates it after training, and ``with
reducer.calibration():`` around eval forwards recalibrates a checkpoint, e.g. with
``tools/analysis_tools/recalibrate.py``; a block never calibrated falls back to the fixed rule), or the
``ceil(target * N)`` tokens of highest s run (``inference='fixed'``). SViT's official rules (``'official'``,
``'sample'``) have no TPC counterpart: TPC has no released code. At least ``min_keep`` patch tokens run, in
training too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenReducer, dense_token_counts, keep_masks_to_token_maps
from .dynamicvit import force_min_keep
from .gates import MLPGate
from .svit import (
    DEFAULT_KEEP_TARGETS,
    CalibratedThresholds,
    keep_count,
    run_on_kept,
    svit_ratio_loss,
    topk_mask,
    with_prefix,
)

PAUSE, RESTART = 0, 1  # the controller's logit indices


def tpc_smooth_loss(probs: Tensor) -> Tensor:
    """Smoothing regulariser, unweighted: mean of (p - mean of p over its 3x3 neighbourhood)^2.

    Args:
        probs: (B, K, h, w) K probability maps on the token grid.
    """
    local = F.avg_pool2d(probs, 3, stride=1, padding=1, count_include_pad=False)
    return ((probs - local) ** 2).mean()


def sample_bernoulli(logits: Tensor, tau: float = 1.0) -> Tensor:
    """Hard Bernoulli samples {0, 1} of sigmoid(logits), with straight-through gradients of the relaxed
    sample sigmoid((logits + logistic noise) / tau)."""
    u = torch.rand_like(logits).clamp(1e-6, 1.0 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class TPCController(MLPGate):
    """Pause and restart logits per token: SViT's gate network, LayerNorm -> Linear(C, C/4) -> GELU ->
    Linear(C/4, 2), read as two independent logits (no softmax).

    Args:
        dim: Token channels C.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (B, N, C) -> logits (B, N, 2) of (pause, restart)."""
        return self.logits(x)


class TPCStabilizer(nn.Module):
    """Depth-wise 3x3 convolution on the token grid, zero at initialisation.

    Args:
        dim: Token channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Patch tokens (B, h*w, C) in row-major order -> the update (B, h*w, C) for each position."""
        B, _, C = x.shape
        grid = x.transpose(1, 2).reshape(B, C, *hw)
        return self.conv(grid).flatten(2).transpose(1, 2)


@dataclass
class TPCState:
    """What one forward of :class:`TPCReducer` remembers.

    Attributes:
        num_prefix: Prefix tokens in front of the patch tokens.
        hw: Patch grid (h, w).
        batch: Images B.
        device: Device of the tokens.
        gathered: Whether controlled blocks ran on the active tokens only (inference) rather than on all
            tokens with the paused ones masked (training).
        active: (B, h*w) state after the last controlled block: float {0, 1} with straight-through gradients in
            training, bool at inference; None before the first controlled block (all active).
        fractions: Controlled block index -> (B,) fraction of active patch tokens (gradients in training).
        masks: Controlled block index -> (B, h*w) bool, active positions, detached.
        restarts: Controlled block index -> 0-dim fraction of the tokens paused before it that it restarted.
        probs: Controlled block index -> (B, 2, h, w) pause and restart probabilities (training).
    """

    num_prefix: int
    hw: tuple[int, int]
    batch: int
    device: torch.device
    gathered: bool
    active: Tensor | None = None
    fractions: dict[int, Tensor] = field(default_factory=dict)
    masks: dict[int, Tensor] = field(default_factory=dict)
    restarts: dict[int, Tensor] = field(default_factory=dict)
    probs: dict[int, Tensor] = field(default_factory=dict)


class TPCReducer(CalibratedThresholds, TokenReducer):
    """Token propagation controller with pause and restart (after Zhu, 2024); see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone.
        controlled_blocks: Blocks with a controller (the others run densely), strictly increasing.
        keep_targets: Target fraction of active patch tokens per controlled block, in (0, 1].
        budget_loss_weight: Weight of the budget loss.
        smooth_loss_weight: Weight of the smoothing regulariser (0 turns it off).
        stabilizer: Give paused tokens the depth-wise convolution update (the model stabilizer).
        min_keep: Patch tokens active per image at least, at every controlled block (>= 1).
        tau: Temperature of the relaxed Bernoulli samples in training.
        inference: ``'threshold'`` (s against the calibrated per-block threshold; per-image rate) or
            ``'fixed'`` (exactly ceil(target * N) tokens of highest s per image).
        threshold_momentum: EMA momentum of the threshold calibration, in (0, 1].
    """

    keeps_token_set = True  # pruned / paused tokens stay in the token tensor

    def __init__(
        self,
        embed_dim: int,
        controlled_blocks: Sequence[int] = tuple(range(3, 12)),
        keep_targets: Sequence[float] = DEFAULT_KEEP_TARGETS,
        budget_loss_weight: float = 4.0,
        smooth_loss_weight: float = 1.0,
        stabilizer: bool = True,
        min_keep: int = 1,
        tau: float = 1.0,
        inference: str = "threshold",
        threshold_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        blocks, targets = tuple(int(b) for b in controlled_blocks), tuple(float(t) for t in keep_targets)
        if len(targets) != len(blocks):
            raise ValueError(
                f"keep_targets needs one value per controlled block: {len(targets)} targets {targets} for "
                f"{len(blocks)} controlled blocks {blocks}"
            )
        if any(b < 0 for b in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:])):
            raise ValueError(f"controlled_blocks must be non-negative and strictly increasing, got {blocks}")
        if not all(0.0 < t <= 1.0 for t in targets):
            raise ValueError(f"keep_targets must each be in (0, 1], got {targets}")
        if budget_loss_weight < 0 or smooth_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got budget_loss_weight={budget_loss_weight}, "
                f"smooth_loss_weight={smooth_loss_weight}"
            )
        if inference not in ("threshold", "fixed"):
            raise ValueError(f"inference must be 'threshold' or 'fixed', got {inference!r}")
        if min_keep < 1:
            raise ValueError(f"min_keep must be >= 1 (attention needs a key), got {min_keep}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < threshold_momentum <= 1.0:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.embed_dim = embed_dim
        self.controlled_blocks = blocks
        self.keep_targets = targets
        self.budget_loss_weight = budget_loss_weight
        self.smooth_loss_weight = smooth_loss_weight
        self.min_keep = min_keep
        self.tau = tau
        self.inference = inference
        self.threshold_momentum = threshold_momentum
        self.calibrating = False
        self.threshold_blocks = blocks
        self.index_of = {block: g for g, block in enumerate(blocks)}
        self.controllers = nn.ModuleList(TPCController(embed_dim) for _ in blocks)
        self.stabilizers = nn.ModuleList(TPCStabilizer(embed_dim) for _ in blocks) if stabilizer else None
        self.register_buffer("thresholds", torch.zeros(len(blocks)))
        self.register_buffer("calibration_steps", torch.zeros(len(blocks), dtype=torch.long))

    def check_backbone(self, depth: int, embed_dim: int) -> None:
        self.check_width_and_blocks(depth, embed_dim, "controlled_blocks", self.controlled_blocks)

    def extra_repr(self) -> str:
        return (
            f"controlled_blocks={self.controlled_blocks}, keep_targets={self.keep_targets}, "
            f"stabilizer={self.stabilizers is not None}, inference={self.inference!r}"
        )

    # the three calls of the backbone

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, TPCState]:
        state = TPCState(
            num_prefix=num_prefix, hw=tuple(hw), batch=x.shape[0], device=x.device, gathered=not self.training
        )
        return x, state

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: TPCState) -> Tensor:
        g = self.index_of.get(index)
        if g is None:
            return block(x)
        P = state.num_prefix
        patch = x[:, P:]
        logits = self.controllers[g](patch)
        p = torch.sigmoid(logits)
        was_active = None if state.active is None else state.active.detach() > 0.5
        s = (1.0 - p[..., PAUSE]).detach()  # the probability of running this block
        if was_active is not None:
            s = torch.where(was_active, s, p[..., RESTART].detach())
        if self.training or self.calibrating:
            self._update_threshold(g, s, floor=None)
        if self.training:
            active = self._sample(logits, state.active)
            active = force_min_keep(active, s, self.min_keep)
            state.probs[index] = p.permute(0, 2, 1).reshape(p.shape[0], 2, *state.hw)
            y = block(x, with_prefix(active.detach() > 0.5, P, True)[:, None, None, :])
            a = active.unsqueeze(-1)
            out = torch.cat([y[:, :P], a * y[:, P:] + (1.0 - a) * self._stabilized(g, patch, state)], dim=1)
        else:
            active = self._decide(g, s)
            if self.stabilizers is not None and not bool(active.all()):
                stable = torch.where(active.unsqueeze(-1), patch, self._stabilized(g, patch, state))
                x = torch.cat([x[:, :P], stable], dim=1)
            out = run_on_kept(block, x, with_prefix(active, P, True))
        self._record(index, active, was_active, state)
        return out

    def finish(self, x: Tensor, state: TPCState) -> Tensor:
        return x  # paused tokens were never removed from x

    def aux_losses(self, state: TPCState) -> dict[str, Tensor]:
        if state.gathered or not state.fractions:
            return {}
        fractions = torch.stack([state.fractions[b] for b in self.controlled_blocks])
        budget = svit_ratio_loss(fractions, fractions.new_tensor(self.keep_targets))
        smooth = torch.stack([tpc_smooth_loss(state.probs[b]) for b in self.controlled_blocks]).mean()
        return {
            "loss_tpc_budget": self.budget_loss_weight * budget,
            "loss_tpc_smooth": self.smooth_loss_weight * smooth,
        }

    def stats(self, state: TPCState) -> dict[str, float | Tensor]:
        """``keep_rate.block{i}`` (0-dim, mean over images, the active fraction), ``keep_rate_per_image.block{i}``
        (B,), ``keep_rate.mean`` over the controlled blocks, and ``restart_rate.block{i}`` (the fraction of the
        tokens paused before block i that it restarted, from the second controlled block on); detached."""
        out: dict[str, float | Tensor] = {}
        for block, fractions in state.fractions.items():
            out[f"keep_rate.block{block}"] = fractions.detach().mean()
            out[f"keep_rate_per_image.block{block}"] = fractions.detach()
        if state.fractions:
            out["keep_rate.mean"] = torch.stack([f.detach().mean() for f in state.fractions.values()]).mean()
        out.update({f"restart_rate.block{block}": rate for block, rate in state.restarts.items()})
        return out

    def token_counts(self, state: TPCState, depth: int) -> Tensor:
        """All tokens at uncontrolled blocks and in training (masking runs every token); prefix + active at
        controlled blocks at inference."""
        n = state.num_prefix + state.hw[0] * state.hw[1]
        counts = dense_token_counts(depth, state.batch, n, device=state.device)
        if state.gathered:
            for block, mask in state.masks.items():
                counts[block] = state.num_prefix + mask.sum(dim=1).float()
        return counts

    def extra_macs(self, state: TPCState) -> float:
        """The controllers' linear layers over every patch token, and the stabilizer's 9 C per patch token, at
        every controlled block."""
        c = self.embed_dim
        per_token = c * (c // 4) + (c // 4) * 2 + (9 * c if self.stabilizers is not None else 0)
        return float(len(state.masks) * state.hw[0] * state.hw[1] * per_token)

    def token_maps(self, state: TPCState) -> dict[int, Tensor]:
        """Active positions carry their own index, paused ones ``PRUNED``."""
        return keep_masks_to_token_maps(state.masks)

    # controlled blocks

    def _sample(self, logits: Tensor, active: Tensor | None) -> Tensor:
        """Training: the new state (B, N) in {0, 1} with straight-through gradients, from Bernoulli pause and
        restart samples and the previous state."""
        samples = self.sample_pause_restart(logits)
        if active is None:
            return 1.0 - samples[..., PAUSE]
        return active * (1.0 - samples[..., PAUSE]) + (1.0 - active) * samples[..., RESTART]

    def sample_pause_restart(self, logits: Tensor) -> Tensor:
        """Logits (B, N, 2) -> hard samples (B, N, 2) of (pause, restart) with straight-through gradients."""
        return sample_bernoulli(logits, self.tau)

    def _stabilized(self, g: int, patch: Tensor, state: TPCState) -> Tensor:
        """What a paused token holds after the block: its value, plus the stabilizer's update if any."""
        if self.stabilizers is None:
            return patch
        return patch + self.stabilizers[g](patch, state.hw)

    def _decide(self, g: int, s: Tensor) -> Tensor:
        """(B, N) probability of running -> (B, N) bool decision at inference, by the rule
        :meth:`inference_rules` names for block ``g``."""
        target = self.keep_targets[g]
        if target >= 1.0:
            keep = torch.ones_like(s, dtype=torch.bool)
        elif self._block_rule(g)[0] == "fixed":
            keep = topk_mask(s, keep_count(target, s.shape[1]))
        else:
            keep = s >= self.thresholds[g]
        return keep | topk_mask(s, self.min_keep)

    def _record(self, index: int, active: Tensor, was_active: Tensor | None, state: TPCState) -> None:
        mask = active.detach() > 0.5 if active.is_floating_point() else active
        if was_active is not None:
            paused = ~was_active
            state.restarts[index] = (mask & paused).sum() / paused.sum().clamp(min=1)
        state.active = active
        state.fractions[index] = active.float().mean(dim=1)
        state.masks[index] = mask
