"""DynamicViT: a learned local+global predictor prunes tokens hierarchically.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021
(official code: github.com/raoyongming/DynamicViT). Before each block of ``blocks`` a predictor scores
the patch tokens that are still kept: LayerNorm -> Linear(C, C) -> GELU gives per-token features, whose first
half (local) is concatenated with the policy-weighted mean of the second half over the kept tokens (global),
and an MLP C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax gives (keep, prune) log-probabilities.

Training (as the paper): a hard Gumbel-softmax decision per token, multiplied by the previous stage's (a
dropped token stays dropped: hierarchical); every token still runs through the blocks, and from the first
pruning block on, attention uses the paper's masked softmax: ``exp(logits) * policy`` over the keys, where a
dropped token attends only to itself, normalised with a small epsilon. The policy carries the decision's
straight-through gradient, so the predictors learn through the attention of the kept tokens. The ratio loss
is ``weight * mean_stages mean_images (keep fraction - target)^2`` (weight 2 in the paper).

Inference (as the paper): a fixed budget, the ``floor(target * N)`` highest-scored tokens of the N patch
tokens, the same count for every image; the dropped tokens leave the set, so the blocks really run on fewer
tokens and a batch needs no padding.

What we chose for dense prediction (``keep_pruned``): with True (DynamicViT + keep pruned tokens, the
baseline SViT compares with, and our default) a dropped token keeps its last value in the output map; with
False (the original method, which discards dropped tokens) its position in the output map is zero. In
training a dropped token is frozen at its value when dropped (the paper lets it run on, attending to itself
only; its value never reaches a kept token or the class token, but here it reaches the map), so a training
forward's output equals an inference forward's with the same decisions.

Not implemented: the paper's distillation from the dense teacher (a detector has no class logits to distil,
and SViT's baselines were trained without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gated import KeepMaskReducer, KeepMaskState
from .gates import KEEP, LocalGlobalGate, sample_keep
from .toolkit import attention_half, force_min_keep, keep_count, keep_target_loss, mlp_half, with_prefix

DynamicViTPredictor = LocalGlobalGate  # the predictor (PredictorLG of the official code)


def block_with_policy(block: nn.Module, x: Tensor, policy: Tensor) -> Tensor:
    """Run a :class:`tokenprune.models.vit.Block` with DynamicViT's masked softmax (``softmax_with_policy``,
    :func:`tokenprune.models.reducers.toolkit.attention_probs` with ``policy``).

    Args:
        block: The block.
        x: Tokens (B, N, C).
        policy: (B, N) keep decision in {0, 1} (may carry straight-through gradients): key j gets weight
            ``policy[j]`` in every query's softmax, except that every token always attends to itself.

    Returns:
        The block's output (B, N, C).
    """
    return mlp_half(block, attention_half(block, x, attn_rows="all", policy=policy).x)


@dataclass
class DynamicViTState(KeepMaskState):
    """What one forward of :class:`DynamicViTReducer` remembers: a :class:`KeepMaskState` (``gathered``: the
    dropped tokens leave the set, at inference), and

    Attributes:
        decision: Training: (B, h*w) float {0, 1} keep decision so far, with straight-through gradients; None
            before the first stage.
        positions: Inference: (B, K) patch position of each current patch token.
        full: Inference: (B, h*w, C) the output map's values of the dropped positions; None before the first
            stage.
        predicted: Tokens the predictors scored, per image.
    """

    decision: Tensor | None = None
    positions: Tensor | None = None
    full: Tensor | None = None
    predicted: int = 0


class DynamicViTReducer(KeepMaskReducer):
    """DynamicViT token sparsification (Rao et al., NeurIPS 2021); see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone (even).
        blocks: Blocks before which a predictor prunes, strictly increasing (the paper: 3, 6, 9).
        keep_targets: Fraction of the image's patch tokens kept after each stage, in (0, 1], non-increasing
            (the paper's keep ratios: 0.7, 0.49, 0.343, i.e. rho^s with rho = 0.7).
        ratio_loss_weight: Weight of the ratio loss (the paper: 2).
        keep_pruned: True: dropped tokens keep their last value in the output map (DynamicViT + keep pruned
            tokens); False: their positions are zero (the original method discards them).
        tau: Gumbel-softmax temperature in training.
        min_keep: Patch tokens kept per image at least, at every stage (>= 1).
    """

    renamed_keys = {"prune_blocks": "blocks", "keep_ratios": "keep_targets"}
    state_type = DynamicViTState

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = (3, 6, 9),
        keep_targets: Sequence[float] = (0.7, 0.49, 0.343),
        ratio_loss_weight: float = 2.0,
        keep_pruned: bool = True,
        tau: float = 1.0,
        min_keep: int = 1,
    ) -> None:
        super().__init__(embed_dim, blocks, keep_targets, min_keep, tau)
        targets = self.keep_targets
        if any(a < b for a, b in zip(targets, targets[1:])):
            raise ValueError(f"keep_targets must be non-increasing (a dropped token stays dropped), got {targets}")
        if embed_dim % 4:
            raise ValueError(f"DynamicViT's predictor needs embed_dim divisible by 4, got {embed_dim}")
        if ratio_loss_weight < 0:
            raise ValueError(f"ratio_loss_weight must be >= 0, got {ratio_loss_weight}")
        self.ratio_loss_weight = ratio_loss_weight
        self.keep_pruned = keep_pruned
        self.predictors = nn.ModuleList(DynamicViTPredictor(embed_dim) for _ in self.blocks)

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, keep_targets={self.keep_targets}, keep_pruned={self.keep_pruned}, "
            f"ratio_loss_weight={self.ratio_loss_weight}"
        )

    # the calls of the backbone, beyond the base's

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: DynamicViTState) -> Tensor:
        s = self.gate_index.get(index)
        if state.gathered:
            if s is not None:
                x = self._prune_eval(s, x, state)
            return block(x)
        if s is not None:
            self._decide_train(s, x, state)
        if state.decision is None:
            return block(x)
        policy = with_prefix(state.decision, state.num_prefix, 1.0)
        y = block_with_policy(block, x, policy)
        return torch.where(policy.detach().unsqueeze(-1) > 0.5, y, x)  # dropped tokens stay frozen

    def finish(self, x: Tensor, state: DynamicViTState) -> Tensor:
        P = state.num_prefix
        if state.gathered:
            if state.full is None:
                return x
            index = state.positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            return torch.cat([x[:, :P], state.full.scatter(1, index, x[:, P:])], dim=1)
        if self.keep_pruned or state.decision is None:
            return x
        kept = with_prefix(state.decision.detach() > 0.5, P, True).unsqueeze(-1)
        return torch.where(kept, x, torch.zeros_like(x))

    def aux_losses(self, state: DynamicViTState) -> dict[str, Tensor]:
        if state.gathered or not state.fractions:
            return {}
        blocks = [b for b in self.blocks if b in state.fractions]  # a forward may span some stages only
        fractions = torch.stack([state.fractions[b] for b in blocks])
        targets = fractions.new_tensor([self.keep_targets[self.gate_index[b]] for b in blocks])
        loss = keep_target_loss(fractions, targets, "image")
        return {"loss_dynamicvit_ratio": self.ratio_loss_weight * loss}

    def extra_macs(self, state: DynamicViTState) -> float:
        """The predictors' linear layers over the tokens they scored."""
        return float(state.predicted * self.predictors[0].macs_per_token()) if len(self.predictors) else 0.0

    # pruning stages

    def _decide_train(self, s: int, x: Tensor, state: DynamicViTState) -> None:
        """Hierarchical hard Gumbel decision over all patch tokens; updates ``state.decision``."""
        P = state.num_prefix
        prev = state.decision if state.decision is not None else x.new_ones(x.shape[0], x.shape[1] - P)
        log_p = self.predictors[s](x[:, P:], prev)
        d = self.sample_keep(log_p) * prev
        allowed = log_p[..., KEEP].exp().masked_fill(prev.detach() <= 0.5, -1.0)
        d = force_min_keep(d, allowed, self.min_keep)
        state.predicted += d.shape[1]
        self.record_mask(self.blocks[s], d, state)
        state.decision = d

    def sample_keep(self, log_p: Tensor) -> Tensor:
        """Predictor log-probabilities (B, N, 2) -> hard Gumbel-softmax keep decision (B, N) in {0, 1} with
        straight-through gradients."""
        return sample_keep(log_p, self.tau)

    def _prune_eval(self, s: int, x: Tensor, state: DynamicViTState) -> Tensor:
        """Keep the fixed-budget top-scored current tokens; the others leave the set."""
        P, B, C = state.num_prefix, x.shape[0], x.shape[-1]
        n = state.hw[0] * state.hw[1]
        patch = x[:, P:]
        if state.positions is None:
            state.positions = torch.arange(n, device=x.device).expand(B, n)
            state.full = patch if self.keep_pruned else torch.zeros_like(patch)
        elif self.keep_pruned:
            state.full = state.full.scatter(1, state.positions.unsqueeze(-1).expand(-1, -1, C), patch)
        M = patch.shape[1]
        k = min(M, keep_count(self.keep_targets[s], n, "floor", self.min_keep))  # the official int(rate * N)
        scores = self.predictors[s](patch, patch.new_ones(B, M))[..., KEEP]
        state.predicted += M
        top = scores.topk(k, dim=1).indices.sort(dim=1).values
        state.positions = state.positions.gather(1, top)
        kept = torch.ones_like(state.positions, dtype=torch.bool)  # not the scalar True: torch.jit cannot trace it
        mask = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter(1, state.positions, kept)
        self.record_mask(self.blocks[s], mask, state)
        return torch.cat([x[:, :P], patch.gather(1, top.unsqueeze(-1).expand(-1, -1, C))], dim=1)
