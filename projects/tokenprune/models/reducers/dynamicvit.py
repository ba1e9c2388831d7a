"""DynamicViT: a learned local+global predictor prunes tokens hierarchically.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021
(official code: github.com/raoyongming/DynamicViT). Before each block of ``prune_blocks`` a predictor scores
the patch tokens that are still kept: LayerNorm -> Linear(C, C) -> GELU gives per-token features, whose first
half (local) is concatenated with the policy-weighted mean of the second half over the kept tokens (global),
and an MLP C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax gives (keep, prune) log-probabilities.

Training (as the paper): a hard Gumbel-softmax decision per token, multiplied by the previous stage's (a
dropped token stays dropped: hierarchical); every token still runs through the blocks, and from the first
pruning block on, attention uses the paper's masked softmax: ``exp(logits) * policy`` over the keys, where a
dropped token attends only to itself, normalised with a small epsilon. The policy carries the decision's
straight-through gradient, so the predictors learn through the attention of the kept tokens. The ratio loss
is ``weight * mean_stages mean_images (keep fraction - ratio)^2`` (weight 2 in the paper).

Inference (as the paper): a fixed budget, the ``floor(ratio * N)`` highest-scored tokens of the N patch
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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenReducer, dense_token_counts, keep_masks_to_token_maps
from .gates import KEEP, LocalGlobalGate
from .svit import topk_mask, with_prefix


def fixed_keep_count(ratio: float, n: int | Tensor, min_keep: int = 1) -> int:
    """DynamicViT's inference budget: floor(ratio * n) tokens (at least ``min_keep``), robust to float noise.

    ``n`` may be a 0-dim tensor (a size read while ``torch.jit`` traces the model): it is made an int first, so
    ``round`` never sees a tensor."""
    return max(min_keep, math.floor(round(ratio * int(n), 6)))


def dynamicvit_ratio_loss(fractions: Tensor, ratios: Tensor) -> Tensor:
    """DynamicViT's ratio loss, unweighted: mean over stages and images of (keep fraction - ratio)^2.

    Args:
        fractions: (S, B) kept fraction of each image's patch tokens after each of S stages.
        ratios: (S,) target keep ratio per stage.
    """
    return ((fractions - ratios[:, None]) ** 2).mean()


def force_min_keep(d: Tensor, scores: Tensor, min_keep: int) -> Tensor:
    """Keep the top-``min_keep`` of ``scores`` (B, N) in the images whose decision d (B, N) in {0, 1} keeps
    fewer; d's straight-through gradients still pass."""
    short = d.detach().sum(dim=1, keepdim=True) < min_keep
    force = topk_mask(scores, min_keep) & short
    return d + (1.0 - d).detach() * force


DynamicViTPredictor = LocalGlobalGate  # the predictor (PredictorLG of the official code)


def block_with_policy(block: nn.Module, x: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """Run a :class:`tokenprune.models.vit.Block` with DynamicViT's masked softmax (``softmax_with_policy``).

    Args:
        block: The block.
        x: Tokens (B, N, C).
        policy: (B, N) keep decision in {0, 1} (may carry straight-through gradients): key j gets weight
            ``policy[j]`` in every query's softmax, except that every token always attends to itself.
        eps: The paper's stabiliser: ``(e + eps / N) / (sum(e) + eps)``.

    Returns:
        The block's output (B, N, C).
    """
    attn_mod = block.attn
    B, N, C = x.shape
    h = attn_mod.num_heads
    q, k, v = attn_mod.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    keys = policy[:, None, None, :]
    eye = torch.eye(N, dtype=keys.dtype, device=x.device)
    weights = keys + (1.0 - keys) * eye
    e = (logits - logits.amax(dim=-1, keepdim=True)).float().exp() * weights.float()
    attn = ((e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)).to(x.dtype)
    if block.training and attn_mod.attn_drop > 0:
        attn = F.dropout(attn, attn_mod.attn_drop)
    a = attn_mod.proj_drop(attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass
class DynamicViTState:
    """What one forward of :class:`DynamicViTReducer` remembers.

    Attributes:
        num_prefix: Prefix tokens in front of the patch tokens.
        hw: Patch grid (h, w).
        batch: Images B.
        device: Device of the tokens.
        gathered: Whether dropped tokens leave the set (inference) rather than being masked (training).
        decision: Training: (B, h*w) float {0, 1} keep decision so far, with straight-through gradients; None
            before the first stage.
        positions: Inference: (B, K) patch position of each current patch token.
        full: Inference: (B, h*w, C) the output map's values of the dropped positions; None before the first
            stage.
        fractions: Pruning block index -> (B,) kept fraction of the patch tokens (gradients in training).
        masks: Pruning block index -> (B, h*w) bool, kept positions, detached.
        predicted: Tokens the predictors scored, per image.
    """

    num_prefix: int
    hw: tuple[int, int]
    batch: int
    device: torch.device
    gathered: bool
    decision: Tensor | None = None
    positions: Tensor | None = None
    full: Tensor | None = None
    fractions: dict[int, Tensor] = field(default_factory=dict)
    masks: dict[int, Tensor] = field(default_factory=dict)
    predicted: int = 0


class DynamicViTReducer(TokenReducer):
    """DynamicViT token sparsification (Rao et al., NeurIPS 2021); see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone (even).
        prune_blocks: Blocks before which a predictor prunes, strictly increasing (the paper: 3, 6, 9).
        keep_ratios: Fraction of the image's patch tokens kept after each stage, in (0, 1], non-increasing
            (the paper: 0.7, 0.49, 0.343, i.e. rho^s with rho = 0.7).
        ratio_loss_weight: Weight of the ratio loss (the paper: 2).
        keep_pruned: True: dropped tokens keep their last value in the output map (DynamicViT + keep pruned
            tokens); False: their positions are zero (the original method discards them).
        tau: Gumbel-softmax temperature in training.
        min_keep: Patch tokens kept per image at least, at every stage (>= 1).
    """

    def __init__(
        self,
        embed_dim: int,
        prune_blocks: Sequence[int] = (3, 6, 9),
        keep_ratios: Sequence[float] = (0.7, 0.49, 0.343),
        ratio_loss_weight: float = 2.0,
        keep_pruned: bool = True,
        tau: float = 1.0,
        min_keep: int = 1,
    ) -> None:
        super().__init__()
        prune_blocks, keep_ratios = tuple(int(b) for b in prune_blocks), tuple(float(r) for r in keep_ratios)
        if len(keep_ratios) != len(prune_blocks):
            raise ValueError(
                f"keep_ratios needs one value per pruning block: {len(keep_ratios)} ratios {keep_ratios} for "
                f"{len(prune_blocks)} blocks {prune_blocks}"
            )
        if any(b < 0 for b in prune_blocks) or any(a >= b for a, b in zip(prune_blocks, prune_blocks[1:])):
            raise ValueError(f"prune_blocks must be non-negative and strictly increasing, got {prune_blocks}")
        if not all(0.0 < r <= 1.0 for r in keep_ratios):
            raise ValueError(f"keep_ratios must each be in (0, 1], got {keep_ratios}")
        if any(a < b for a, b in zip(keep_ratios, keep_ratios[1:])):
            raise ValueError(f"keep_ratios must be non-increasing (a dropped token stays dropped), got {keep_ratios}")
        if embed_dim % 4:
            raise ValueError(f"DynamicViT's predictor needs embed_dim divisible by 4, got {embed_dim}")
        if ratio_loss_weight < 0:
            raise ValueError(f"ratio_loss_weight must be >= 0, got {ratio_loss_weight}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if min_keep < 1:
            raise ValueError(f"min_keep must be >= 1 (attention needs a key), got {min_keep}")
        self.embed_dim = embed_dim
        self.prune_blocks = prune_blocks
        self.keep_ratios = keep_ratios
        self.ratio_loss_weight = ratio_loss_weight
        self.keep_pruned = keep_pruned
        self.tau = tau
        self.min_keep = min_keep
        self.stage_of = {block: s for s, block in enumerate(prune_blocks)}
        self.predictors = nn.ModuleList(DynamicViTPredictor(embed_dim) for _ in prune_blocks)

    def check_backbone(self, depth: int, embed_dim: int) -> None:
        self.check_width_and_blocks(depth, embed_dim, "prune_blocks", self.prune_blocks)

    def extra_repr(self) -> str:
        return (
            f"prune_blocks={self.prune_blocks}, keep_ratios={self.keep_ratios}, keep_pruned={self.keep_pruned}, "
            f"ratio_loss_weight={self.ratio_loss_weight}"
        )

    # the three calls of the backbone

    def begin(self, x: Tensor, hw: tuple[int, int], num_prefix: int) -> tuple[Tensor, DynamicViTState]:
        state = DynamicViTState(
            num_prefix=num_prefix, hw=tuple(hw), batch=x.shape[0], device=x.device, gathered=not self.training
        )
        return x, state

    def run_block(self, index: int, block: nn.Module, x: Tensor, state: DynamicViTState) -> Tensor:
        s = self.stage_of.get(index)
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
        blocks = [b for b in self.prune_blocks if b in state.fractions]  # a forward may span some stages only
        fractions = torch.stack([state.fractions[b] for b in blocks])
        ratios = fractions.new_tensor([self.keep_ratios[self.stage_of[b]] for b in blocks])
        loss = dynamicvit_ratio_loss(fractions, ratios)
        return {"loss_dynamicvit_ratio": self.ratio_loss_weight * loss}

    def stats(self, state: DynamicViTState) -> dict[str, float | Tensor]:
        """``keep_rate.block{i}`` (0-dim, mean over images), ``keep_rate_per_image.block{i}`` (B,), and
        ``keep_rate.mean`` over the pruning blocks; detached tensors."""
        out: dict[str, float | Tensor] = {}
        for block, fractions in state.fractions.items():
            out[f"keep_rate.block{block}"] = fractions.detach().mean()
            out[f"keep_rate_per_image.block{block}"] = fractions.detach()
        if state.fractions:
            out["keep_rate.mean"] = torch.stack([f.detach().mean() for f in state.fractions.values()]).mean()
        return out

    def token_counts(self, state: DynamicViTState, depth: int) -> Tensor:
        """All tokens in training (masking runs every token) and before the first stage; prefix + kept from
        each stage on at inference."""
        n = state.num_prefix + state.hw[0] * state.hw[1]
        counts = dense_token_counts(depth, state.batch, n, device=state.device)
        if state.gathered:
            for block, mask in sorted(state.masks.items()):
                counts[block:] = state.num_prefix + mask.sum(dim=1).float()
        return counts

    def extra_macs(self, state: DynamicViTState) -> float:
        """The predictors' linear layers over the tokens they scored."""
        return float(state.predicted * self.predictors[0].macs_per_token()) if len(self.predictors) else 0.0

    def token_maps(self, state: DynamicViTState) -> dict[int, Tensor]:
        """Kept positions carry their own index, dropped ones ``PRUNED``."""
        return keep_masks_to_token_maps(state.masks)

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
        self._record(s, d, d.detach() > 0.5, state)
        state.decision = d

    def sample_keep(self, log_p: Tensor) -> Tensor:
        """Predictor log-probabilities (B, N, 2) -> hard Gumbel-softmax keep decision (B, N) in {0, 1} with
        straight-through gradients."""
        return F.gumbel_softmax(log_p, tau=self.tau, hard=True, dim=-1)[..., KEEP]

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
        k = min(M, fixed_keep_count(self.keep_ratios[s], n, self.min_keep))
        scores = self.predictors[s](patch, patch.new_ones(B, M))[..., KEEP]
        state.predicted += M
        top = scores.topk(k, dim=1).indices.sort(dim=1).values
        state.positions = state.positions.gather(1, top)
        kept = torch.ones_like(state.positions, dtype=torch.bool)  # not the scalar True: torch.jit cannot trace it
        mask = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter(1, state.positions, kept)
        self._record(s, mask.float(), mask, state)
        return torch.cat([x[:, :P], patch.gather(1, top.unsqueeze(-1).expand(-1, -1, C))], dim=1)

    def _record(self, s: int, d: Tensor, mask: Tensor, state: DynamicViTState) -> None:
        block = self.prune_blocks[s]
        state.fractions[block] = d.mean(dim=1)
        state.masks[block] = mask
