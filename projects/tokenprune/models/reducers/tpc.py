"""TPC: a token propagation controller that pauses tokens and restarts them later.

Zhu, "TPC-ViT: Token Propagation Controller for Efficient Vision Transformer", arXiv 2401.01470, 2024
(arXiv 2401.01470). No code is public and the paper is known to us from its abstract only, which names
four parts: a **pause probability** per token (skip the current block), a **restart probability** (come back
at a later block), a **smoothing** regulariser on these distributions against noisy outliers, and a **model
stabilizer** that implicitly encodes local image structure. How each part works here is our design
(``docs/reducers/tpc.md``):

- Controller: every block of ``blocks`` owns a head LayerNorm(C) -> Linear(C, C/4) -> GELU ->
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
``train_compute='sparse'`` runs the active tokens with autograd and the paused ones' outputs without, as SViT's
(:mod:`tokenprune.models.reducers.sparse_train`): the same values and gradients, the backward over the active
tokens only; ``probe`` < 1 samples the paused tokens whose output feeds the controller's gradient.

Inference is deterministic and gathers: the active tokens of each image are gathered, the block runs on them
only (images with different counts are padded and the padding masked,
:func:`tokenprune.models.reducers.toolkit.run_on_kept`) and scattered back. A token runs if its s clears a
per-block threshold calibrated like SViT's (the learned-gate base, :mod:`tokenprune.models.reducers.gated`:
``inference='threshold'``, an EMA over training batches of the s at which the batch meets its target; the
rate varies per image; ``SViTCalibrationHook`` recalibrates it after training, and ``with
reducer.calibration():`` around eval forwards recalibrates a checkpoint, e.g. with
``tools/analysis_tools/recalibrate.py``; a block never calibrated falls back to the fixed rule), or the
``ceil(target * N)`` tokens of highest s run (``inference='fixed'``). SViT's official rules (``'official'``,
``'sample'``) have no TPC counterpart: TPC has no released code. At least ``min_keep`` patch tokens run, in
training too.

ViTDet's windowed blocks and global blocks with relative positions (``docs/vitdet.md``): as SViT's, a controlled
block at inference runs each window on its active tokens at their original places
(:func:`tokenprune.models.reducers.windowed.run_block_on_kept`), and in training masks the paused tokens out as
keys window by window; the stabilizer's convolution runs on the whole token grid, across windows, as on a
global backbone. ``train_compute='sparse'`` is refused there (global blocks without relative positions only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gated import DEFAULT_BLOCKS, DEFAULT_KEEP_TARGETS, GatedReducer, GatedState
from .gates import MLPGate
from .sparse_train import check_train_compute, run_gated_sparse
from .toolkit import force_min_keep, keep_target_loss, run_masked
from .windowed import run_block_on_kept

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
class TPCState(GatedState):
    """What one forward of :class:`TPCReducer` remembers: a :class:`GatedState` (``keep``: the active tokens
    after the last controlled block, ``fractions`` and ``masks``: the active ones at each), and

    Attributes:
        restarts: Controlled block index -> 0-dim fraction of the tokens paused before it that it restarted.
        probs: Controlled block index -> (B, 2, h, w) pause and restart probabilities (training).
    """

    restarts: dict[int, Tensor] = field(default_factory=dict)
    probs: dict[int, Tensor] = field(default_factory=dict)


class TPCReducer(GatedReducer):
    """Token propagation controller with pause and restart (after Zhu, 2024); see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Blocks with a controller (the others run densely), strictly increasing.
        keep_targets: Target fraction of active patch tokens per controlled block, in (0, 1].
        budget_loss_weight: Weight of the budget loss.
        smooth_loss_weight: Weight of the smoothing regulariser (0 turns it off).
        stabilizer: Give paused tokens the depth-wise convolution update (the model stabilizer).
        min_keep: Patch tokens active per image at least, at every controlled block (>= 1).
        tau: Temperature of the relaxed Bernoulli samples in training.
        inference: ``'threshold'`` (s against the calibrated per-block threshold; per-image rate) or
            ``'fixed'`` (exactly ceil(target * N) tokens of highest s per image).
        threshold_momentum: EMA momentum of the threshold calibration, in (0, 1].
        train_compute: ``'masked'`` (every token through a controlled block in training, the paused ones masked
            out as keys) or ``'sparse'`` (the active ones with autograd, the paused ones' outputs without: the
            same values and gradients, a cheaper backward).
        probe: ``train_compute='sparse'``: the fraction in (0, 1] of each image's paused tokens whose output
            feeds the controller's gradient (1: all, exact; below 1: an unbiased estimate).
    """

    runs_on_grid = True  # windowed / relative-position blocks run per window on the active tokens (windowed.py)
    renamed_keys = {"controlled_blocks": "blocks"}
    state_type = TPCState

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
        keep_targets: Sequence[float] = DEFAULT_KEEP_TARGETS,
        budget_loss_weight: float = 4.0,
        smooth_loss_weight: float = 1.0,
        stabilizer: bool = True,
        min_keep: int = 1,
        tau: float = 1.0,
        inference: str = "threshold",
        threshold_momentum: float = 0.1,
        train_compute: str = "masked",
        probe: float = 1.0,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_targets, min_keep, tau, inference, threshold_momentum)
        check_train_compute(train_compute, probe)
        self.train_compute = train_compute
        self.probe = float(probe)
        if budget_loss_weight < 0 or smooth_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got budget_loss_weight={budget_loss_weight}, "
                f"smooth_loss_weight={smooth_loss_weight}"
            )
        self.budget_loss_weight = budget_loss_weight
        self.smooth_loss_weight = smooth_loss_weight
        self.controllers = nn.ModuleList(TPCController(embed_dim) for _ in self.blocks)
        self.stabilizers = nn.ModuleList(TPCStabilizer(embed_dim) for _ in self.blocks) if stabilizer else None

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, keep_targets={self.keep_targets}, "
            f"stabilizer={self.stabilizers is not None}, inference={self.inference!r}"
            + (f", train_compute={self.train_compute!r}, probe={self.probe}" if self.train_compute != "masked" else "")
        )

    def run_gated(self, g: int, block: nn.Module, x: Tensor, state: TPCState) -> Tensor:
        P = state.num_prefix
        patch = x[:, P:]
        logits = self.controllers[g](patch)
        p = torch.sigmoid(logits)
        was_active = None if state.keep is None else state.keep.detach() > 0.5
        s = (1.0 - p[..., PAUSE]).detach()  # the probability of running this block
        if was_active is not None:
            s = torch.where(was_active, s, p[..., RESTART].detach())
        if self.training or self.calibrating:
            self.update_threshold(g, s, floor=None)
        if self.training:
            active = self._sample(logits, state.keep)
            active = force_min_keep(active, s, self.min_keep)
            state.probs[self.blocks[g]] = p.permute(0, 2, 1).reshape(p.shape[0], 2, *state.hw)
            if self.train_compute == "sparse":  # the same values and gradients, the backward over active tokens
                rest = torch.cat([x[:, :P], self._stabilized(g, patch, state)], dim=1)
                out = run_gated_sparse(block, x, active, P, self.probe, rest=rest)
            else:
                y = run_masked(block, x, active, P, state.hw)
                a = active.unsqueeze(-1)
                out = torch.cat([y[:, :P], a * y[:, P:] + (1.0 - a) * self._stabilized(g, patch, state)], dim=1)
        else:
            active = self.decide(g, s)
            if self.stabilizers is not None and not bool(active.all()):
                stable = torch.where(active.unsqueeze(-1), patch, self._stabilized(g, patch, state))
                x = torch.cat([x[:, :P], stable], dim=1)
            out = run_block_on_kept(block, x, active, state.hw, P)
        mask = self.record(g, active, state)
        if was_active is not None:
            paused = ~was_active
            state.restarts[self.blocks[g]] = (mask & paused).sum() / paused.sum().clamp(min=1)
        return out

    def aux_losses(self, state: TPCState) -> dict[str, Tensor]:
        if state.gathered or not state.fractions:
            return {}
        fractions = self.stacked_fractions(state)
        budget = keep_target_loss(fractions, fractions.new_tensor(self.keep_targets))
        smooth = torch.stack([tpc_smooth_loss(state.probs[b]) for b in self.blocks]).mean()
        return {
            "loss_tpc_budget": self.budget_loss_weight * budget,
            "loss_tpc_smooth": self.smooth_loss_weight * smooth,
        }

    def stats(self, state: TPCState) -> dict[str, float | Tensor]:
        """The gated base's keep rates (the active fraction), and ``restart_rate.block{i}`` (the fraction of the
        tokens paused before block i that it restarted, from the second controlled block on); detached."""
        out = super().stats(state)
        out.update({f"restart_rate.block{block}": rate for block, rate in state.restarts.items()})
        return out

    def gate_macs_per_token(self) -> int:
        """The controller's linear layers, and the stabilizer's 9 C."""
        c = self.embed_dim
        return c * (c // 4) + (c // 4) * 2 + (9 * c if self.stabilizers is not None else 0)

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
