"""SViT: per-token gates that prune, keep in the map and reactivate tokens.

Liu et al., "Revisiting Token Pruning for Object Detection and Instance Segmentation", WACV 2024
(arXiv 2306.07050). Blocks listed in ``blocks`` each own a 2-layer MLP gate,
LayerNorm(C) -> Linear(C, C/4) -> GELU -> Linear(C/4, 2) -> log-softmax (class 0 = keep), that decides for
every patch token, pruned ones included, whether the block updates it. Prefix (CLS) tokens are always kept.
A pruned token is not discarded: it keeps its last value, so the output map is complete, and a later gate may
reactivate it (``reactivation=False`` makes pruning final instead).

Training (as the paper): a hard Gumbel-softmax with straight-through gradients gives d in {0, 1} per token;
all tokens run through the block with the pruned ones masked out as attention keys, and the block's output
is ``d * block(x) + (1 - d) * x``. The ratio loss is ``weight * mean_blocks (keep fraction - target)^2``, the
keep fraction averaged over the batch (``ratio_loss='batch'``, the paper's) or per image (``'image'``).

Inference: the kept tokens of each image are gathered, the block runs on them only (a batch with different
counts per image is padded to the largest count and the padding masked out as keys) and the results are
scattered back. Which tokens are kept (``inference``, see :data:`tokenprune.models.reducers.gated.INFERENCE_RULES`):

- ``'threshold'`` (default, our choice): keep a token if ``p_keep >= threshold[block]``. The official
  deterministic rule, ``p_keep > 0.5``, keeps almost nothing in the late blocks: the ratio loss is met with
  p_keep near the target everywhere, not with confident gates. So each gated block has a threshold buffer
  (saved in checkpoints), an EMA (``threshold_momentum``) of the per-batch (1 - target) quantile of p_keep
  over the batch's patch tokens, i.e. the threshold at which that batch would have kept exactly its target.
  It is updated by every training forward, and by eval forwards inside ``with reducer.calibration():``
  (which recalibrates from scratch, every batch weighing the same: for a checkpoint that lacks thresholds,
  e.g. a converted official one); ``calibration_steps`` counts the updates, the first 1 / momentum of which
  are averaged equally. The rate then varies per image (the paper's finding 3) and meets the target on
  average over images like the calibration ones. A block whose threshold was never updated falls back to
  the fixed rule (:meth:`SViTReducer.inference_fallbacks` says where). The thresholds, their calibration and
  the fixed rule are those of every learned-gate reducer (:mod:`tokenprune.models.reducers.gated`).
- ``'fixed'``: keep exactly ``ceil(target * N)`` top-p_keep tokens per image (N patch tokens), e.g. to
  benchmark untrained gates.
- ``'official'``: the official code's deterministic rule (its ``SelectiveModule`` with ``inference=True``,
  ``argmin`` over the log-probabilities): keep a token if ``p_keep > p_prune``, i.e. ``p_keep > 0.5``.
- ``'sample'``: the official code's rule at test time, which never switches its deterministic rule on: a
  hard Gumbel-softmax draw per token, as in training (keep if ``log p_keep + g_keep >= log p_prune +
  g_prune``). Seeded: every forward draws its noise from a generator seeded with ``sample_seed``, so the same
  input gives the same decisions (``sample_seed=None``: torch's global generator, as the official code).
  The published SViT numbers were measured under this rule.

Every rule keeps at least ``min_keep`` patch tokens per image (the highest p_keep ones), in training too, so
attention never runs over zero keys (the official code has no such guard). Under DistributedDataParallel the
buffers are broadcast from rank 0 at each forward, so the thresholds follow rank 0's batches.

Faster training (``train_compute='sparse'``, :mod:`tokenprune.models.reducers.sparse_train`): a pruned token's
block output reaches the loss only through the gate's straight-through gradient ``<y_i - x_i, dL/dout_i>``,
which needs its value, not its graph. So a gated block runs its kept tokens (gathered per image, as at
inference) with autograd and the pruned tokens' outputs (their queries attending to the kept keys) without:
the same forward values and gradients as masked training (``'masked'``, the default), the backward over the
kept tokens only. ``probe`` < 1 computes the outputs of a random ``probe`` fraction of each image's pruned
tokens, their gate gradients scaled by the inverse inclusion probability (unbiased, with more variance), the
others' zero. Global-attention blocks only (not windowed or relative-position ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gated import DEFAULT_BLOCKS, DEFAULT_KEEP_TARGETS, INFERENCE_RULES, GatedReducer, GatedState
from .gates import GATES, KEEP, PRUNE, sample_keep
from .sparse_train import check_train_compute, run_gated_sparse
from .toolkit import force_min_keep, keep_target_loss, run_masked, with_prefix
from .windowed import run_block_on_kept


@dataclass
class SViTState(GatedState):
    """What one forward of :class:`SViTReducer` remembers: a :class:`GatedState` (``keep`` is the last gate's
    decision), and

    Attributes:
        generator: The seeded source of this forward's Gumbel noise (``inference='sample'``); None: torch's
            global generator.
    """

    generator: torch.Generator | None = None


class SViTReducer(GatedReducer):
    """SViT token pruning (Liu et al., WACV 2024); see the module docstring for training and inference.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the blocks that get a gate (the others run densely), increasing.
        keep_targets: Keep target in (0, 1] per gated block, as a fraction of the image's patch tokens.
        ratio_loss_weight: Weight of the ratio loss.
        ratio_loss: ``'batch'`` (the paper's: batch-mean keep fraction against the target) or ``'image'``.
        reactivation: Let every gate decide over all tokens, so pruned tokens can come back; False keeps a
            pruned token pruned at every later block.
        min_keep: Patch tokens kept per image at least, at every gated block (>= 1).
        tau: Gumbel-softmax temperature in training.
        inference: The rule that decides at inference (module docstring): ``'threshold'`` (p_keep against the
            calibrated per-block threshold), ``'fixed'`` (exactly ceil(target * N) top-scored tokens per
            image), ``'official'`` (p_keep > 0.5) or ``'sample'`` (a hard Gumbel draw per token).
        threshold_momentum: EMA momentum of the threshold calibration, in (0, 1].
        gate: ``'mlp'`` (the paper's 2-layer MLP on the token's own feature) or ``'local_global'``
            (DynamicViT's heavier predictor, which adds the mean feature of the tokens the previous gate kept;
            for the paper's finding 4).
        keep_pruned: True (the paper's): a pruned token keeps its last value in the output map. False discards
            it as classification pruning does: zero in the output map and never reactivated (needs
            ``reactivation=False``; for the paper's finding 1).
        sample_seed: ``inference='sample'``: the seed of the generator each forward draws its Gumbel noise
            from (the same input, the same decisions); None draws from torch's global generator.
        train_compute: ``'masked'`` (every token through a gated block in training, the pruned ones masked
            out as keys) or ``'sparse'`` (the kept tokens with autograd, the pruned ones' outputs without: the
            same values and gradients, a cheaper backward; module docstring).
        probe: ``train_compute='sparse'``: the fraction in (0, 1] of each image's pruned tokens whose output
            feeds the gate's gradient (1: all, exact; below 1: an unbiased estimate, a cheaper forward).
    """

    runs_on_grid = True  # windowed / relative-position blocks run per window on the kept tokens (windowed.py)
    renamed_keys = {"gated_blocks": "blocks"}
    inference_rules_offered = INFERENCE_RULES
    state_type = SViTState

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
        keep_targets: Sequence[float] = DEFAULT_KEEP_TARGETS,
        ratio_loss_weight: float = 4.0,
        ratio_loss: str = "batch",
        reactivation: bool = True,
        min_keep: int = 1,
        tau: float = 1.0,
        inference: str = "threshold",
        threshold_momentum: float = 0.1,
        gate: str = "mlp",
        keep_pruned: bool = True,
        sample_seed: int | None = 0,
        train_compute: str = "masked",
        probe: float = 1.0,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_targets, min_keep, tau, inference, threshold_momentum)
        if ratio_loss not in ("batch", "image"):
            raise ValueError(f"ratio_loss must be 'batch' or 'image', got {ratio_loss!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {sorted(GATES)}, got {gate!r}")
        if not keep_pruned and reactivation:
            raise ValueError("keep_pruned=False discards pruned tokens, which cannot come back: set reactivation=False")
        self.ratio_loss_weight = ratio_loss_weight
        self.ratio_loss = ratio_loss
        self.reactivation = reactivation
        self.gate = gate
        self.keep_pruned = keep_pruned
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        self.gates = nn.ModuleList(GATES[gate](embed_dim) for _ in self.blocks)
        check_train_compute(train_compute, probe)
        self.train_compute = train_compute
        self.probe = float(probe)

    def extra_repr(self) -> str:
        seed = f", sample_seed={self.sample_seed}" if self.inference == "sample" else ""
        return (
            f"blocks={self.blocks}, keep_targets={self.keep_targets}, inference={self.inference!r}"
            f"{seed}, reactivation={self.reactivation}, ratio_loss={self.ratio_loss!r}, gate={self.gate!r}, "
            f"keep_pruned={self.keep_pruned}"
            + (f", train_compute={self.train_compute!r}, probe={self.probe}" if self.train_compute != "masked" else "")
        )

    # the three calls of the backbone, beyond the gated base's

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, SViTState]:
        x, state = super().begin(x, hw, num_prefix)
        if state.gathered and self.inference == "sample" and self.sample_seed is not None:
            state.generator = torch.Generator(device=x.device).manual_seed(self.sample_seed)
        return x, state

    def finish(self, x: Tensor, state: SViTState) -> Tensor:
        if self.keep_pruned or state.keep is None:
            return x  # pruned tokens were never removed from x
        # discarded tokens: zero in the map (in training through the straight-through decision, so the gates
        # learn what discarding costs)
        keep = with_prefix(state.keep.to(x.dtype), state.num_prefix, 1.0).unsqueeze(-1)
        return x * keep

    def aux_losses(self, state: SViTState) -> dict[str, Tensor]:
        if not state.fractions:
            return {}
        fractions = self.stacked_fractions(state)
        loss = keep_target_loss(fractions, fractions.new_tensor(self.keep_targets), self.ratio_loss)
        return {"loss_svit_ratio": self.ratio_loss_weight * loss}

    def gate_macs_per_token(self) -> int:
        """The gate's linear layers."""
        return self.gates[0].macs_per_token() if len(self.gates) else 0

    # gated blocks

    def run_gated(self, g: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        if self.training:
            return self._run_gated_train(g, block, x, state)
        return self._run_gated_eval(g, block, x, state)

    def _run_gated_train(self, g: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        """Gumbel decision, keys masked, ``d * block(x) + (1 - d) * x``; x stays (B, N, C)."""
        P = state.num_prefix
        log_p = self._gate(g, x, state)
        d = self.sample_keep(log_p)
        p_keep = self._allowed_scores(log_p[..., KEEP].exp(), state)
        if not self.reactivation and state.keep is not None:
            d = d * state.keep
        d = force_min_keep(d, p_keep, self.min_keep)
        self.update_threshold(g, p_keep)
        if self.train_compute == "sparse":  # the same values and gradients, the backward over kept tokens only
            self.record(g, d, state)
            return run_gated_sparse(block, x, d, P, self.probe)
        # a mask over keys: inside a windowed block it applies window by window (window_key_mask)
        y = run_masked(block, x, d, P, state.hw)
        d_full = with_prefix(d, P, 1.0).unsqueeze(-1)
        self.record(g, d, state)
        return d_full * y + (1.0 - d_full) * x

    def sample_keep(self, log_p: Tensor) -> Tensor:
        """Gate log-probabilities (B, Np, 2) -> hard Gumbel-softmax keep decision (B, Np) in {0, 1}, with
        straight-through gradients."""
        return sample_keep(log_p, self.tau)

    def _run_gated_eval(self, g: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        """Decision by the inference rule, block run on the kept tokens only; x stays (B, N, C)."""
        P = state.num_prefix
        log_p = self._gate(g, x, state)
        p_keep = self._allowed_scores(log_p[..., KEEP].exp(), state)
        if self.calibrating:
            self.update_threshold(g, p_keep)
        keep = self.decide(g, p_keep, log_p, state.generator)
        if not self.reactivation and state.keep is not None:
            keep &= state.keep
        self.record(g, keep, state)
        # windowed, or relative positions: per window, at the grid places; else the image's kept tokens
        return run_block_on_kept(block, x, keep, state.hw, P)

    def decide_by_rule(self, rule: str, log_p: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """The official rules: ``'official'`` (the official argmin: a tie prunes) and ``'sample'``."""
        if rule == "official":
            return log_p[..., PRUNE] < log_p[..., KEEP]
        return gumbel_keep(log_p, generator)

    def _gate(self, g: int, x: Tensor, state: SViTState) -> Tensor:
        """Gate ``g``'s (keep, prune) log-probabilities (B, Np, 2) of the patch tokens; a policy-aware gate sees
        the previous gate's decision (all tokens before the first)."""
        policy = None if state.keep is None else state.keep.to(x.dtype)
        return self.gates[g](x[:, state.num_prefix :], policy)

    def _allowed_scores(self, p_keep: Tensor, state: SViTState) -> Tensor:
        """(B, Np) p_keep, set to -1 where a token may not be kept (pruned earlier, without reactivation)."""
        if self.reactivation or state.keep is None:
            return p_keep
        return p_keep.masked_fill(state.keep.detach() <= 0.5, -1.0)


def gumbel_keep(log_p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, N, 2) (keep, prune) log-probabilities -> (B, N) bool hard Gumbel-softmax decision, as
    ``F.gumbel_softmax(log_p, hard=True)[..., KEEP]`` (any temperature: the argmax does not depend on it; a tie
    keeps), with the noise drawn from ``generator`` (None: torch's global generator)."""
    noise = torch.empty(log_p.shape, dtype=torch.float32, device=log_p.device).exponential_(generator=generator)
    z = log_p.float() - noise.log()
    return z[..., KEEP] >= z[..., PRUNE]
