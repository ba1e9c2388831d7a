"""What the token-reduction methods share: budgets, masks, running a block on some tokens, block halves with
explicit attention, and the threshold calibration step. Method files import it; it imports none of them.

- Budgets and masks: :func:`keep_count` (the one rounding rule of a keep ratio), :func:`topk_mask`,
  :func:`with_prefix`, :func:`force_min_keep`.
- Running a block on part of the tokens: :func:`run_on_kept` gathers the kept tokens of each image (inference
  of SViT, TPC), :func:`run_masked` masks the others out as keys (their training).
- Block halves: :func:`attention_half` runs ``x + attn(norm1(x))`` of a :class:`tokenprune.models.vit.Block`
  and returns its keys, values and, when asked, the attention probabilities; :func:`mlp_half` runs the rest,
  so ``mlp_half(block, attention_half(block, x, m).x) == block(x, m)``. Attention is the fused kernel
  (``scaled_dot_product_attention``) unless the probabilities are asked for, in which case it is the one
  explicit path, :func:`attention_probs` (softmax, or DynamicViT's policy softmax with ``policy``).
- Calibration: :func:`update_threshold`, one EMA step of a per-block threshold towards the score at which a
  batch keeps its target (the learned-gate reducers' inference thresholds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUNDINGS = ("ceil", "floor")


def keep_count(ratio: float, n: int | Tensor, rounding: str = "ceil", min_keep: int = 0) -> int:
    """Tokens kept of ``n`` at keep ratio ``ratio``: ``ceil(ratio * n)`` (or ``floor``), at least ``min_keep`` and
    at most ``n``, robust to float noise such as 0.7 * 10 = 7.000000000000001.

    Two roundings, because the official codes differ and their budgets are reproduced exactly: ``'ceil'`` is
    EViT's (``math.ceil(keep_rate * N)``) and ours for every other method; ``'floor'`` is DynamicViT's
    (``int(keep_rate * N)``).

    Args:
        ratio: Keep ratio in [0, 1].
        n: Token count; may be a 0-dim tensor (a size read while ``torch.jit`` traces the model, as
            MMDetection's get_flops.py does), made a Python int first so ``round`` never sees a tensor.
        rounding: ``'ceil'`` or ``'floor'``.
        min_keep: Lower bound (clipped to ``n``).
    """
    n = int(n)
    scaled = round(ratio * n, 6)
    if rounding == "ceil":
        k = math.ceil(scaled)
    elif rounding == "floor":
        k = math.floor(scaled)
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return min(n, max(min(min_keep, n), k))


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


def force_min_keep(d: Tensor, scores: Tensor, min_keep: int) -> Tensor:
    """Keep the top-``min_keep`` of ``scores`` (B, N) in the images whose decision d (B, N) in {0, 1} keeps
    fewer; d's straight-through gradients still pass."""
    short = d.detach().sum(dim=1, keepdim=True) < min_keep
    force = topk_mask(scores, min_keep) & short
    return d + (1.0 - d).detach() * force


# ------------------------------------------------------------------------------- a block on part of the tokens


def run_masked(
    block: nn.Module, x: Tensor, decision: Tensor, num_prefix: int, hw: tuple[int, int] | None = None
) -> Tensor:
    """Run ``block`` on all tokens, the patch tokens whose decision is 0 masked out as attention keys.

    Args:
        block: Callable ``block(x, attn_mask, hw)``, a :class:`tokenprune.models.vit.Block`.
        x: Tokens (B, N, C), ``num_prefix`` prefix tokens first (they always attend and are attended to).
        decision: (B, N - num_prefix) patch-token decision in {0, 1} (gradients are not followed here).
        num_prefix: Prefix tokens.
        hw: The patch grid, for a block that needs it (inside a windowed block the mask over keys applies
            window by window).

    Returns:
        The block's output (B, N, C) for every token.
    """
    return block(x, with_prefix(decision.detach() > 0.5, num_prefix, True)[:, None, None, :], hw)


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


# ------------------------------------------------------------------------------------------------- block halves


@dataclass
class HalfBlock:
    """A block run up to the end of its attention residual.

    Attributes:
        x: Tokens after ``x + attn(norm1(x))``, before the MLP, (B, M, C).
        k: Keys (B, heads, M, C / heads).
        v: Values (B, heads, M, C / heads).
        attn: Attention probabilities (B, heads, M, M) (rows: queries), or only the first row's
            (B, heads, 1, M), when asked for; else None.
    """

    x: Tensor
    k: Tensor
    v: Tensor
    attn: Tensor | None = None


def attention_probs(
    q: Tensor, k: Tensor, attn_mask: Tensor | None = None, policy: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Attention probabilities (B, heads, Mq, M) of queries q (B, heads, Mq, d) over keys k (B, heads, M, d).

    Args:
        q: Queries.
        k: Keys.
        attn_mask: With the softmax: scaled_dot_product_attention's mask, None, bool (True = may attend) or
            additive float, broadcastable to (B, heads, Mq, M) (rows of the mask beyond Mq are not read).
        policy: Instead of the softmax, DynamicViT's ``softmax_with_policy`` (Mq = M): (B, M) keep decision
            in {0, 1} (may carry straight-through gradients); key j gets weight ``policy[j]`` in every query's
            softmax, except that every token always attends to itself, and the result is
            ``(e + eps / M) / (sum(e) + eps)``, in float32.
        eps: The policy softmax's stabiliser.
    """
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if policy is not None:
        M = k.shape[-2]
        keys = policy[:, None, None, :]
        eye = torch.eye(M, dtype=keys.dtype, device=q.device)
        weights = keys + (1.0 - keys) * eye
        e = (logits - logits.amax(dim=-1, keepdim=True)).float().exp() * weights.float()
        return ((e + eps / M) / (e.sum(dim=-1, keepdim=True) + eps)).to(q.dtype)
    if attn_mask is not None:
        if attn_mask.dim() >= 2 and attn_mask.shape[-2] > q.shape[-2]:
            attn_mask = attn_mask[..., : q.shape[-2], :]
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return logits.softmax(dim=-1)


def attention_half(
    block: nn.Module,
    x: Tensor,
    attn_mask: Tensor | None = None,
    attn_rows: str | None = None,
    policy: Tensor | None = None,
) -> HalfBlock:
    """The attention half of a :class:`tokenprune.models.vit.Block` on tokens x (B, M, C).

    Args:
        block: The block.
        x: Tokens (B, M, C).
        attn_mask: As scaled_dot_product_attention's: None, bool (True = may attend) or additive float,
            broadcastable to (B, heads, M, M).
        attn_rows: Which attention probabilities to return: None (none; the fused kernel runs), ``'first'``
            (the first query's, (B, heads, 1, M), e.g. a class token's: the fused kernel runs and that row is
            computed beside it) or ``'all'`` ((B, heads, M, M): attention is computed explicitly, with the same
            MACs as the fused kernel but the M x M probabilities in memory).
        policy: DynamicViT's policy softmax instead of the masked one (see :func:`attention_probs`); needs
            ``attn_rows='all'`` and no ``attn_mask``.
    """
    if attn_rows not in (None, "first", "all"):
        raise ValueError(f"attn_rows must be None, 'first' or 'all', got {attn_rows!r}")
    if policy is not None and (attn_rows != "all" or attn_mask is not None):
        raise ValueError("a policy softmax needs attn_rows='all' and no attn_mask")
    mod = block.attn
    B, M, C = x.shape
    h = mod.num_heads
    q, k, v = mod.qkv(block.norm1(x)).reshape(B, M, 3, h, C // h).permute(2, 0, 3, 1, 4)
    drop = mod.attn_drop if block.training else 0.0
    attn = None
    if attn_rows == "all":
        attn = attention_probs(q, k, attn_mask, policy)
        o = (F.dropout(attn, drop) if drop > 0 else attn) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        if attn_rows == "first":
            attn = attention_probs(q[:, :, :1], k, attn_mask)
    o = mod.proj_drop(mod.proj(o.transpose(1, 2).reshape(B, M, C)))
    return HalfBlock(x=x + block.drop_path1(block.ls1(o)), k=k, v=v, attn=attn)


def mlp_half(block: nn.Module, x: Tensor) -> Tensor:
    """The MLP half of a block: x + mlp(norm2(x)), (B, M, C) -> (B, M, C); per token, so it also runs on any
    set of tokens, e.g. (1, T, C) gathered from several images."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# -------------------------------------------------------------------------------------------------- calibration


@torch.no_grad()
def update_threshold(
    thresholds: Tensor, steps: Tensor, g: int, scores: Tensor, target: float, momentum: float, floor: float | None
) -> None:
    """Move ``thresholds[g]`` (EMA, in place) towards the value at which this batch's scores keep ``target`` of
    their tokens, and count the update in ``steps[g]``.

    The first 1 / ``momentum`` updates average the batches equally, so a short calibration does not lean on its
    first batch.

    Args:
        thresholds: (G,) per-block thresholds, updated in place.
        steps: (G,) long, updates so far per block, incremented in place.
        g: The block's index into ``thresholds``.
        scores: The batch's scores (any shape), higher = keep.
        target: Fraction of the scores to keep.
        momentum: EMA momentum in [0, 1] (0: every batch weighs the same).
        floor: Lower bound of the batch's threshold (None: no bound).
    """
    flat = scores.detach().flatten().float()
    k = max(1, min(flat.numel(), round(target * flat.numel())))
    batch_threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    if floor is not None:
        batch_threshold = batch_threshold.clamp(min=floor)
    m = (1.0 / (steps[g] + 1)).clamp(min=momentum)
    thresholds[g] += m * (batch_threshold - thresholds[g])
    steps[g] += 1


# ----------------------------------------------------------------------------------------------------- losses


def keep_target_loss(fractions: Tensor, targets: Tensor, mode: str = "batch") -> Tensor:
    """The keep-target loss of the learned-gate methods, unweighted: mean over blocks of (keep fraction -
    target)^2 (SViT's ratio loss, TPC's budget loss, DynamicViT's ratio loss with ``'image'``).

    Args:
        fractions: (G, B) kept fraction of each image's patch tokens at each of G blocks.
        targets: (G,) keep target per block.
        mode: ``'batch'`` compares the batch-mean fraction with the target (SViT's paper), ``'image'`` each
            image's (DynamicViT's).
    """
    if mode == "batch":
        return ((fractions.mean(dim=1) - targets) ** 2).mean()
    return ((fractions - targets[:, None]) ** 2).mean()
