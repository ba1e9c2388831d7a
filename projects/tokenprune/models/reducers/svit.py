"""SViT: per-token gates that prune, keep in the map and reactivate tokens.

Liu et al., "Revisiting Token Pruning for Object Detection and Instance Segmentation", WACV 2024
(arXiv 2306.07050). Blocks listed in ``gated_blocks`` each own a 2-layer MLP gate,
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
scattered back. Which tokens are kept (``inference``, see :data:`INFERENCE_RULES`):

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
  the fixed rule (:meth:`SViTReducer.inference_fallbacks` says where).
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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenReducer, dense_token_counts, keep_masks_to_token_maps
from .gates import GATES, KEEP, PRUNE, MLPGate

DEFAULT_GATED_BLOCKS = tuple(range(3, 12))
DEFAULT_KEEP_TARGETS = (0.7,) * 3 + (0.49,) * 3 + (0.343,) * 3
INFERENCE_RULES = ("threshold", "fixed", "official", "sample")
"""SViT's inference rules: calibrated threshold (default), fixed budget, the official deterministic rule
(p_keep > 0.5) and the official evaluation rule (a hard Gumbel draw per token)."""


def keep_count(target: float, n: int | Tensor) -> int:
    """ceil(target * n), robust to float noise such as 0.7 * 10 = 7.000000000000001.

    ``n`` may be a 0-dim tensor: a size read while ``torch.jit`` traces the model (as MMDetection's
    get_flops.py does) is one. It is made a Python int first, so ``round`` never sees a tensor.
    """
    return math.ceil(round(target * int(n), 6))


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """(B, N) scores -> (B, N) bool, True at the k highest of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    index = scores.topk(min(k, scores.shape[1]), dim=1).indices
    # a tensor source, not the scalar True: torch.jit's tracer has no scatter overload for a bool scalar
    return mask.scatter(1, index, torch.ones_like(index, dtype=torch.bool))


def with_prefix(patch: Tensor, num_prefix: int, value: float | bool) -> Tensor:
    """(B, Np) per-patch values -> (B, num_prefix + Np), the prefix positions set to ``value``."""
    shape, kwargs = (patch.shape[0], num_prefix), dict(dtype=patch.dtype, device=patch.device)
    if isinstance(value, bool):  # not torch.full with a bool scalar: torch.jit's tracer cannot trace it
        prefix = torch.ones(shape, **kwargs) if value else torch.zeros(shape, **kwargs)
    else:
        prefix = torch.full(shape, value, **kwargs)
    return torch.cat([prefix, patch], dim=1)


@torch.no_grad()
def update_threshold(
    thresholds: Tensor, steps: Tensor, g: int, scores: Tensor, target: float, momentum: float, floor: float | None
) -> None:
    """Move ``thresholds[g]`` (EMA, in place) towards the value at which this batch's scores keep ``target`` of
    their tokens, and count the update in ``steps[g]``.

    The first 1 / ``momentum`` updates average the batches equally, so a short calibration does not lean on its
    first batch. ``floor`` bounds the batch's threshold from below (None: no bound).
    """
    flat = scores.detach().flatten().float()
    k = max(1, min(flat.numel(), round(target * flat.numel())))
    batch_threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    if floor is not None:
        batch_threshold = batch_threshold.clamp(min=floor)
    m = (1.0 / (steps[g] + 1)).clamp(min=momentum)
    thresholds[g] += m * (batch_threshold - thresholds[g])
    steps[g] += 1


def svit_ratio_loss(fractions: Tensor, targets: Tensor, mode: str = "batch") -> Tensor:
    """SViT's ratio loss, unweighted: mean over gated blocks of (keep fraction - target)^2.

    Args:
        fractions: (G, B) kept fraction of each image's patch tokens at each of G gated blocks.
        targets: (G,) keep target per gated block.
        mode: ``'batch'`` compares the batch-mean fraction with the target, ``'image'`` each image's.
    """
    if mode == "batch":
        return ((fractions.mean(dim=1) - targets) ** 2).mean()
    return ((fractions - targets[:, None]) ** 2).mean()


SViTGate = MLPGate  # SViT's 2-layer MLP gate

FALLBACK_REASONS = {
    "uncalibrated": "never calibrated",
    "keep_all": "keep target 1.0: every token kept",
}


class CalibratedThresholds:
    """The calibrated per-block inference thresholds and the choice of inference rule, shared by
    :class:`SViTReducer` and :class:`tokenprune.models.reducers.tpc.TPCReducer`.

    The reducer holds ``threshold_blocks`` (the blocks that decide, increasing), ``keep_targets``,
    ``inference``, ``threshold_momentum``, ``calibrating`` and the buffers ``thresholds`` and
    ``calibration_steps`` (one entry per deciding block).
    """

    threshold_blocks: tuple[int, ...]
    keep_targets: tuple[float, ...]
    inference: str
    threshold_momentum: float
    calibrating: bool
    thresholds: Tensor
    calibration_steps: Tensor

    def reset_thresholds(self) -> None:
        """Forget the calibrated thresholds: inference falls back to the fixed rule until recalibrated."""
        self.thresholds.zero_()
        self.calibration_steps.zero_()

    @contextmanager
    def calibration(self) -> Iterator[CalibratedThresholds]:
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
        decides by Gumbel samples).
        """
        saved = self.inference, self.threshold_momentum, self.calibrating
        self.reset_thresholds()
        self.inference, self.threshold_momentum, self.calibrating = "threshold", 0.0, True
        try:
            yield self
        finally:
            self.inference, self.threshold_momentum, self.calibrating = saved

    def _block_rule(self, g: int) -> tuple[str, str | None]:
        """The rule block ``g`` (index into ``threshold_blocks``) applies at inference now, and why it is not
        the configured one (a key of ``FALLBACK_REASONS``; None when it is)."""
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
        return {block: self._block_rule(g)[0] for g, block in enumerate(self.threshold_blocks)}

    def inference_fallbacks(self) -> dict[int, str]:
        """Block index -> why it does not follow the configured rule (blocks that do are left out): a
        ``'threshold'`` block never calibrated, or with keep target 1.0, uses the fixed rule."""
        out = {}
        for g, block in enumerate(self.threshold_blocks):
            reason = self._block_rule(g)[1]
            if reason is not None:
                out[block] = FALLBACK_REASONS[reason]
        return out

    def _update_threshold(self, g: int, scores: Tensor, floor: float | None = 0.0) -> None:
        update_threshold(
            self.thresholds, self.calibration_steps, g, scores, self.keep_targets[g], self.threshold_momentum, floor
        )


@dataclass
class SViTState:
    """What one forward of :class:`SViTReducer` remembers.

    Attributes:
        num_prefix: Prefix tokens in front of the patch tokens.
        hw: Patch grid (h, w).
        keep: (B, h*w) the last gate's decision: float {0, 1} carrying straight-through gradients in
            training, bool at inference; None before the first gated block.
        keep_fractions: Gated block index -> (B,) kept fraction of each image's patch tokens (with gradients
            in training).
        keep_masks: Gated block index -> (B, h*w) bool decision, detached.
        batch: Images B.
        gathered: Whether gated blocks ran on the kept tokens only (inference) rather than on all tokens with
            the pruned ones masked as keys (training).
        generator: The seeded source of this forward's Gumbel noise (``inference='sample'``); None: torch's
            global generator.
    """

    num_prefix: int
    hw: tuple[int, int]
    batch: int
    gathered: bool
    keep: Tensor | None = None
    generator: torch.Generator | None = None
    keep_fractions: dict[int, Tensor] = field(default_factory=dict)
    keep_masks: dict[int, Tensor] = field(default_factory=dict)


class SViTReducer(CalibratedThresholds, TokenReducer):
    """SViT token pruning (Liu et al., WACV 2024); see the module docstring for training and inference.

    Args:
        embed_dim: Token channels C of the backbone.
        gated_blocks: Indices of the blocks that get a gate (the others run densely), increasing.
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
    """

    keeps_token_set = True  # pruned / paused tokens stay in the token tensor

    def __init__(
        self,
        embed_dim: int,
        gated_blocks: Sequence[int] = DEFAULT_GATED_BLOCKS,
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
    ) -> None:
        super().__init__()
        gated_blocks, keep_targets = tuple(int(b) for b in gated_blocks), tuple(float(t) for t in keep_targets)
        self._check_args(gated_blocks, keep_targets, ratio_loss, min_keep, tau, inference, threshold_momentum)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {sorted(GATES)}, got {gate!r}")
        if not keep_pruned and reactivation:
            raise ValueError("keep_pruned=False discards pruned tokens, which cannot come back: set reactivation=False")
        self.embed_dim = embed_dim
        self.gated_blocks = gated_blocks
        self.keep_targets = keep_targets
        self.ratio_loss_weight = ratio_loss_weight
        self.ratio_loss = ratio_loss
        self.reactivation = reactivation
        self.min_keep = min_keep
        self.tau = tau
        self.inference = inference
        self.threshold_momentum = threshold_momentum
        self.gate = gate
        self.keep_pruned = keep_pruned
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        self.calibrating = False
        self.threshold_blocks = gated_blocks
        self.gate_index = {block: i for i, block in enumerate(gated_blocks)}
        self.gates = nn.ModuleList(GATES[gate](embed_dim) for _ in gated_blocks)
        self.register_buffer("thresholds", torch.zeros(len(gated_blocks)))
        self.register_buffer("calibration_steps", torch.zeros(len(gated_blocks), dtype=torch.long))

    @staticmethod
    def _check_args(gated_blocks, keep_targets, ratio_loss, min_keep, tau, inference, momentum) -> None:
        if len(keep_targets) != len(gated_blocks):
            raise ValueError(
                f"keep_targets needs one value per gated block: {len(keep_targets)} targets {keep_targets} "
                f"for {len(gated_blocks)} gated blocks {gated_blocks}"
            )
        if not all(0.0 < t <= 1.0 for t in keep_targets):
            raise ValueError(f"keep_targets must each be in (0, 1], got {keep_targets}")
        if any(b < 0 for b in gated_blocks) or any(a >= b for a, b in zip(gated_blocks, gated_blocks[1:])):
            raise ValueError(f"gated_blocks must be non-negative and strictly increasing, got {gated_blocks}")
        if ratio_loss not in ("batch", "image"):
            raise ValueError(f"ratio_loss must be 'batch' or 'image', got {ratio_loss!r}")
        if inference not in INFERENCE_RULES:
            raise ValueError(f"inference must be one of {INFERENCE_RULES}, got {inference!r}")
        if min_keep < 1:
            raise ValueError(f"min_keep must be >= 1 (attention needs a key), got {min_keep}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {momentum}")

    def check_backbone(self, depth: int, embed_dim: int) -> None:
        self.check_width_and_blocks(depth, embed_dim, "gated_blocks", self.gated_blocks)

    def extra_repr(self) -> str:
        seed = f", sample_seed={self.sample_seed}" if self.inference == "sample" else ""
        return (
            f"gated_blocks={self.gated_blocks}, keep_targets={self.keep_targets}, inference={self.inference!r}"
            f"{seed}, reactivation={self.reactivation}, ratio_loss={self.ratio_loss!r}, gate={self.gate!r}, "
            f"keep_pruned={self.keep_pruned}"
        )

    # the three calls of the backbone

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, SViTState]:
        state = SViTState(num_prefix=num_prefix, hw=tuple(hw), batch=x.shape[0], gathered=not self.training)
        if state.gathered and self.inference == "sample" and self.sample_seed is not None:
            state.generator = torch.Generator(device=x.device).manual_seed(self.sample_seed)
        return x, state

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        g = self.gate_index.get(index)
        if g is None:
            return block(x)
        if self.training:
            return self._run_gated_train(g, block, x, state)
        return self._run_gated_eval(g, block, x, state)

    def finish(self, x: Tensor, state: SViTState) -> Tensor:
        if self.keep_pruned or state.keep is None:
            return x  # pruned tokens were never removed from x
        # discarded tokens: zero in the map (in training through the straight-through decision, so the gates
        # learn what discarding costs)
        keep = with_prefix(state.keep.to(x.dtype), state.num_prefix, 1.0).unsqueeze(-1)
        return x * keep

    def aux_losses(self, state: SViTState) -> dict[str, Tensor]:
        if not state.keep_fractions:
            return {}
        fractions = torch.stack([state.keep_fractions[b] for b in self.gated_blocks])
        targets = fractions.new_tensor(self.keep_targets)
        return {"loss_svit_ratio": self.ratio_loss_weight * svit_ratio_loss(fractions, targets, self.ratio_loss)}

    def stats(self, state: SViTState) -> dict[str, float | Tensor]:
        """``keep_rate.block{i}`` (0-dim, mean over images), ``keep_rate_per_image.block{i}`` (B,), and
        ``keep_rate.mean`` over the gated blocks; tensors, detached, so logging forces no device sync here."""
        out: dict[str, float | Tensor] = {}
        for block, fractions in state.keep_fractions.items():
            out[f"keep_rate.block{block}"] = fractions.detach().mean()
            out[f"keep_rate_per_image.block{block}"] = fractions.detach()
        if state.keep_fractions:
            out["keep_rate.mean"] = torch.stack([f.detach().mean() for f in state.keep_fractions.values()]).mean()
        return out

    def token_counts(self, state: SViTState, depth: int) -> Tensor:
        """All tokens at ungated blocks and in training (masking runs every token); prefix + kept at gated
        blocks at inference."""
        n = state.num_prefix + state.hw[0] * state.hw[1]
        counts = dense_token_counts(depth, state.batch, n, device=self.thresholds.device)
        if state.gathered:
            for block, keep in state.keep_masks.items():
                counts[block] = state.num_prefix + keep.sum(dim=1).float()
        return counts

    def extra_macs(self, state: SViTState) -> float:
        """The gates' linear layers over every patch token, at every gated block."""
        return float(len(state.keep_masks) * state.hw[0] * state.hw[1] * self.gates[0].macs_per_token())

    def token_maps(self, state: SViTState) -> dict[int, Tensor]:
        """Kept positions carry their own index, pruned ones ``PRUNED``."""
        return keep_masks_to_token_maps(state.keep_masks)

    # gated blocks

    def _run_gated_train(self, g: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        """Gumbel decision, keys masked, ``d * block(x) + (1 - d) * x``; x stays (B, N, C)."""
        P = state.num_prefix
        log_p = self._gate(g, x, state)
        d = self.sample_keep(log_p)
        p_keep = self._allowed_scores(log_p[..., KEEP].exp(), state)
        if not self.reactivation and state.keep is not None:
            d = d * state.keep
        d = self._force_min_keep(d, p_keep)
        self._update_threshold(g, p_keep)
        y = block(x, with_prefix(d.detach() > 0.5, P, True)[:, None, None, :])
        d_full = with_prefix(d, P, 1.0).unsqueeze(-1)
        self._record(g, d, state)
        return d_full * y + (1.0 - d_full) * x

    def sample_keep(self, log_p: Tensor) -> Tensor:
        """Gate log-probabilities (B, Np, 2) -> hard Gumbel-softmax keep decision (B, Np) in {0, 1}, with
        straight-through gradients."""
        return F.gumbel_softmax(log_p, tau=self.tau, hard=True, dim=-1)[..., KEEP]

    def _run_gated_eval(self, g: int, block: nn.Module, x: Tensor, state: SViTState) -> Tensor:
        """Decision by the inference rule, block run on the kept tokens only; x stays (B, N, C)."""
        P = state.num_prefix
        log_p = self._gate(g, x, state)
        p_keep = self._allowed_scores(log_p[..., KEEP].exp(), state)
        if self.calibrating:
            self._update_threshold(g, p_keep)
        keep = self._decide(g, p_keep, log_p, state.generator)
        if not self.reactivation and state.keep is not None:
            keep &= state.keep
        self._record(g, keep, state)
        return run_on_kept(block, x, with_prefix(keep, P, True))

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

    def _force_min_keep(self, d: Tensor, p_keep: Tensor) -> Tensor:
        """Keep the top-``min_keep`` tokens of images that kept fewer; gradients still pass through d."""
        short = d.detach().sum(dim=1, keepdim=True) < self.min_keep
        force = topk_mask(p_keep, self.min_keep) & short
        return d + (1.0 - d).detach() * force

    def _decide(
        self, g: int, p_keep: Tensor, log_p: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, Np) p_keep (and the gate's (B, Np, 2) log-probabilities, for the official rules) -> (B, Np) bool
        keep decision at inference, by the rule :meth:`inference_rules` names for gate ``g``."""
        rule = self._block_rule(g)[0]
        if rule == "fixed":
            target = self.keep_targets[g]
            if target >= 1.0:
                keep = torch.ones_like(p_keep, dtype=torch.bool)
            else:
                keep = topk_mask(p_keep, keep_count(target, p_keep.shape[1]))
        elif rule == "threshold":
            keep = p_keep >= self.thresholds[g]
        elif rule == "official":
            keep = log_p[..., PRUNE] < log_p[..., KEEP]  # the official argmin: a tie prunes
        else:
            keep = gumbel_keep(log_p, generator)
        return keep | topk_mask(p_keep, self.min_keep)

    def _record(self, g: int, keep: Tensor, state: SViTState) -> None:
        block = self.gated_blocks[g]
        state.keep = keep
        state.keep_fractions[block] = keep.float().mean(dim=1)
        state.keep_masks[block] = keep.detach() > 0.5 if keep.is_floating_point() else keep


def gumbel_keep(log_p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, N, 2) (keep, prune) log-probabilities -> (B, N) bool hard Gumbel-softmax decision, as
    ``F.gumbel_softmax(log_p, hard=True)[..., KEEP]`` (any temperature: the argmax does not depend on it; a tie
    keeps), with the noise drawn from ``generator`` (None: torch's global generator)."""
    noise = torch.empty(log_p.shape, dtype=torch.float32, device=log_p.device).exponential_(generator=generator)
    z = log_p.float() - noise.log()
    return z[..., KEEP] >= z[..., PRUNE]


def run_on_kept(block: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """Run ``block`` on the kept tokens of each image only; the others keep their value.

    Args:
        block: Callable ``block(x, attn_mask)``, (B, M, C) -> (B, M, C).
        x: Tokens (B, N, C).
        keep: (B, N) bool, at least one True per row.

    Returns:
        (B, N, C): the block's output at kept positions, ``x`` elsewhere. Images keeping fewer tokens than
        the batch's largest count are padded with some of their pruned tokens, masked out as keys, and
        those padding rows are not written back.
    """
    B, N, C = x.shape
    counts = keep.sum(dim=1)
    fewest, most = torch.stack(counts.aminmax()).tolist()
    if fewest == N:
        return block(x)
    # kept tokens first, each group in its original order; positions past an image's count are its pruned tokens
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :most]
    index = order.unsqueeze(-1).expand(-1, -1, C)
    kept = x.gather(1, index)
    if fewest == most:
        return x.scatter(1, index, block(kept))
    real = torch.arange(most, device=x.device) < counts[:, None]
    out = block(kept, real[:, None, None, :])
    return x.scatter(1, index, torch.where(real.unsqueeze(-1), out, kept))
