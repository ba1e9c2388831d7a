"""Sparse training of a gated block: the backward pass covers the kept tokens only, gradients unchanged.

A gated block in training (SViT, TPC) takes a hard keep decision d in {0, 1} per token that carries a
straight-through gradient, runs the block with the pruned tokens masked out as attention keys, and outputs
``d * y + (1 - d) * r`` (y = block(x), r = what a pruned token holds: x for SViT, the stabilised x for TPC).
The masked implementation runs forward *and backward* over every token. But a pruned token (d_i = 0) passes
the loss gradient g_i to y_i only as ``d_i * g_i = 0``, and, masked as a key, it reaches no kept token's
output: the block's parameters, the kept tokens and the pruned token's own input receive nothing through y_i.
Its only use is the gate's straight-through gradient ``dL/dd_i = <y_i - r_i, g_i>``, which needs y_i's
*value*, not its graph. :func:`sparse_block_outputs` therefore computes:

1. the kept tokens (prefix included) of each image, gathered (images with different counts padded to the
   largest, the padding masked out as keys, as at inference), through the block **with** autograd: attention
   among kept tokens is exactly what the key mask gives a kept query in the masked path;
2. the pruned tokens' outputs under ``torch.no_grad``: their queries attend to the kept tokens' keys and
   values of step 1 (detached, not recomputed), then the output projection and the MLP, exactly what a pruned
   query computes in the masked path; a pruned token that pads an image in step 1 takes that row's value.

The forward values equal the masked path's, and so do all gradients (gate, block parameters, inputs), up to
float rounding (``tests/test_sparse_train.py`` checks both in float64). The backward, which costs about twice
the forward, runs over the kept tokens only; the pruned tokens' forward skips their keys and values.

``probe`` < 1 also cuts the forward: only ``ceil(probe * P_b)`` of image b's P_b pruned tokens, drawn
uniformly without replacement, get step 2, and their straight-through term is divided by their inclusion
probability pi_b = ceil(probe * P_b) / P_b (the Horvitz-Thompson estimator): ``y_i = r_i + (y_i - r_i) /
pi_b``; an unprobed pruned token gets ``y_i = r_i``, so its gate gradient is 0. The forward output is
unchanged (d_i = 0 multiplies y_i), the block's and the inputs' gradients are exact, and the gate gradient is
unbiased: E[1{i probed} / pi_b] = 1. Its variance grows by (1 - pi_b) / pi_b times the squared
straight-through terms of the pruned tokens (slightly less, sampling without replacement), on top of the
Gumbel noise of the decision itself; the kept tokens' terms stay exact.

Supported blocks: :class:`tokenprune.models.vit.Block` with global attention and no relative positions (what
the reducers drive); dropout and LayerScale as the block has them; stochastic depth with the same per-image
draw for an image's kept and pruned tokens, as one block call would.

Torch only (and the shared :mod:`.toolkit`); the reducers import it, never the reverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from .toolkit import with_prefix

TRAIN_COMPUTE = ("masked", "sparse")
"""How a gated block trains: ``'masked'`` (every token through the block, the pruned ones masked out as keys)
or ``'sparse'`` (the kept tokens with autograd, the pruned ones' outputs without; the same gradients)."""


def check_train_compute(train_compute: str, probe: float) -> None:
    """Raise ValueError for a ``train_compute`` not in :data:`TRAIN_COMPUTE` or a ``probe`` outside (0, 1] or
    set without ``train_compute='sparse'``.

    Args:
        train_compute: ``'masked'`` or ``'sparse'``.
        probe: Fraction of each image's pruned tokens whose output the sparse path computes.
    """
    if train_compute not in TRAIN_COMPUTE:
        raise ValueError(f"train_compute must be one of {TRAIN_COMPUTE}, got {train_compute!r}")
    if isinstance(probe, bool) or not isinstance(probe, (int, float)) or not 0.0 < probe <= 1.0:
        raise ValueError(f"probe must be a number in (0, 1], got {probe!r}")
    if probe < 1.0 and train_compute != "sparse":
        raise ValueError(f"probe={probe} samples the pruned tokens of the sparse path: set train_compute='sparse'")


def check_sparse_block(block: nn.Module) -> None:
    """Raise ValueError unless :func:`sparse_block_outputs` can run ``block``: a global-attention
    :class:`tokenprune.models.vit.Block` layout (``norm1``, ``attn.qkv`` / ``attn.proj``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) without windows or relative positions.

    Args:
        block: The block a gated reducer is about to run.
    """
    name = type(block).__name__
    parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    missing = [p for p in parts if not hasattr(block, p)]
    if hasattr(block, "attn"):
        attn_parts = ("qkv", "proj", "proj_drop", "num_heads", "attn_drop")
        missing += [f"attn.{p}" for p in attn_parts if not hasattr(block.attn, p)]
    if missing:
        raise ValueError(
            f"train_compute='sparse' runs tokenprune's ViT Block only; {name} lacks {missing}: use "
            "train_compute='masked'"
        )
    if getattr(block, "window_size", 0) or getattr(block.attn, "use_rel_pos", False):
        raise ValueError(
            "train_compute='sparse' needs global attention without relative positions; this block has "
            f"window_size={getattr(block, 'window_size', 0)}, use_rel_pos={getattr(block.attn, 'use_rel_pos', False)}"
            ": use train_compute='masked'"
        )
    for p in ("drop_path1", "drop_path2"):
        if not isinstance(getattr(block, p), (nn.Identity, DropPath)):
            raise ValueError(f"train_compute='sparse' knows DropPath or Identity as {p}, got {type(getattr(block, p))}")


def path_scale(module: nn.Module, batch: int, like: Tensor) -> Tensor | None:
    """One draw of stochastic depth for the images of a block call: (B, 1, 1) factors applied as ``module``
    (timm's DropPath) would, or None where it does nothing (Identity, eval mode, rate 0).

    Args:
        module: The block's ``drop_path1`` or ``drop_path2``.
        batch: Images B.
        like: A tensor of the dtype and device of the tokens.
    """
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return None
    keep = 1.0 - module.drop_prob
    scale = like.new_empty(batch, 1, 1).bernoulli_(keep)
    if keep > 0.0 and module.scale_by_keep:
        scale.div_(keep)
    return scale


def _scaled(t: Tensor, scale: Tensor | None) -> Tensor:
    return t if scale is None else t * scale


def _block_after_attention(block: nn.Module, x: Tensor, a: Tensor, scales: tuple) -> Tensor:
    """The rest of a Block after attention: heads (B, heads, M, hd) -> projection, residual, MLP, residual."""
    B, M, C = x.shape
    attn = block.attn
    a = attn.proj_drop(attn.proj(a.transpose(1, 2).reshape(B, M, C)))
    x = x + _scaled(block.ls1(a), scales[0])
    return x + _scaled(block.ls2(block.mlp(block.norm2(x))), scales[1])


def _kept_forward(block: nn.Module, x: Tensor, key_mask: Tensor | None, scales: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """``block(x, key_mask)`` written out, also returning the keys and values (B, heads, M, hd)."""
    B, M, C = x.shape
    attn = block.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(block.norm1(x)).reshape(B, M, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    drop = attn.attn_drop if attn.training else 0.0
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop)
    return _block_after_attention(block, x, a, scales), k, v


@torch.no_grad()
def _query_forward(block: nn.Module, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scales: tuple) -> Tensor:
    """The block's output for query tokens x (B, Q, C) attending to given keys and values, without autograd."""
    B, Q, C = x.shape
    attn = block.attn
    heads = attn.num_heads
    bias = None if attn.qkv.bias is None else attn.qkv.bias[:C]
    q = F.linear(block.norm1(x), attn.qkv.weight[:C], bias).reshape(B, Q, heads, C // heads).transpose(1, 2)
    drop = attn.attn_drop if attn.training else 0.0
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop)
    return _block_after_attention(block, x, a, scales)


def probe_counts(pruned: Tensor, probe: float) -> Tensor:
    """(B,) pruned tokens per image -> (B,) how many of them :func:`sparse_block_outputs` probes,
    ``ceil(probe * P_b)`` (robust to float noise: 0.7 * 10 gives 7).

    Args:
        pruned: (B,) integer counts P_b.
        probe: Fraction in (0, 1].
    """
    if probe >= 1.0:
        return pruned
    return torch.ceil(torch.round(pruned.double() * probe, decimals=6)).to(pruned.dtype)


def sparse_block_outputs(
    block: nn.Module,
    x: Tensor,
    keep: Tensor,
    probe: float = 1.0,
    generator: torch.Generator | None = None,
    rest: Tensor | None = None,
) -> Tensor:
    """The block's output y (B, N, C) for ``d * y + (1 - d) * rest`` with the gradients of the masked path
    (``y = block(x, keep as key mask)``), the backward over the kept tokens only (module docstring).

    Args:
        block: A :class:`tokenprune.models.vit.Block` (see :func:`check_sparse_block`).
        x: Tokens (B, N, C).
        keep: (B, N) bool, True for the kept tokens (prefix included), at least one per image.
        probe: Fraction in (0, 1] of each image's pruned tokens whose output is computed (1: all, exact).
        generator: Source of the probe's draw (None: torch's global generator); unused when ``probe`` is 1.
        rest: (B, N, C) what a pruned token holds in the caller's output (None: x); the unprobed tokens' y.

    Returns:
        (B, N, C): at kept tokens the block's output with autograd; at pruned ones its value without (probed
        ones: ``rest + (y - rest) / pi``; unprobed: ``rest``), detached.
    """
    check_sparse_block(block)
    B, N, C = x.shape
    if keep.shape != (B, N) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, N) = {(B, N)} bool mask, got {tuple(keep.shape)} {keep.dtype}")
    if not 0.0 < probe <= 1.0:
        raise ValueError(f"probe must be in (0, 1], got {probe}")
    counts = keep.sum(dim=1)
    pruned = N - counts
    probed = probe_counts(pruned, probe)
    # one device sync: the fewest and most kept tokens per image, and the end of the probed positions in the
    # kept-first order
    fewest, most, last = torch.stack([counts.min(), counts.max(), (counts + probed).max()]).tolist()
    if fewest < 1:
        raise ValueError("every image needs a kept token: attention over no keys is undefined")
    if fewest == N:
        return block(x)
    rest = (x if rest is None else rest).detach()
    # kept tokens first, in their original order; then the pruned ones, in random order when probing, so that
    # the first ceil(probe * P_b) of them are a uniform draw without replacement
    sort_key = (
        (~keep).to(torch.uint8)
        if probe >= 1.0
        else (~keep) * (1.0 + torch.rand(B, N, generator=generator, device=x.device))
    )
    order = torch.argsort(sort_key, dim=1, stable=True)
    scales = (path_scale(block.drop_path1, B, x), path_scale(block.drop_path2, B, x))

    # 1. the kept tokens (and the pruned ones padding an image to the largest count) with autograd
    index = order[:, :most].unsqueeze(-1).expand(-1, -1, C)
    real = torch.arange(most, device=x.device) < counts[:, None]
    key_mask = None if fewest == most else real[:, None, None, :]
    y_kept, k, v = _kept_forward(block, x.gather(1, index), key_mask, scales)
    parts = [y_kept]
    # 2. the probed pruned tokens past the padding, without autograd, attending to the kept keys and values
    if last > most:
        q_index = order[:, most:last].unsqueeze(-1).expand(-1, -1, C)
        parts.append(_query_forward(block, x.detach().gather(1, q_index), k.detach(), v.detach(), key_mask, scales))
    full_index = order.unsqueeze(-1).expand(-1, -1, C)
    rest_sorted = rest.gather(1, full_index) if probe < 1.0 else None
    if last < N:  # the unprobed pruned tokens at the end of every image's order
        parts.append(rest_sorted[:, last:])
    y_sorted = torch.cat(parts, dim=1)  # (B, N, C) in the kept-first order

    position = torch.arange(N, device=x.device)
    pruned_value = y_sorted.detach()
    if probe < 1.0:
        inv_pi = (pruned.double() / probed.clamp(min=1).double()).to(x.dtype)[:, None, None]
        is_probed = (position < (counts + probed)[:, None]).unsqueeze(-1)
        pruned_value = torch.where(is_probed, rest_sorted + (pruned_value - rest_sorted) * inv_pi, rest_sorted)
    y_sorted = torch.where((position < counts[:, None]).unsqueeze(-1), y_sorted, pruned_value)
    return torch.empty_like(x).scatter(1, full_index, y_sorted)


def run_gated_sparse(
    block: nn.Module,
    x: Tensor,
    d: Tensor,
    num_prefix: int,
    probe: float = 1.0,
    generator: torch.Generator | None = None,
    rest: Tensor | None = None,
) -> Tensor:
    """A gated block in sparse training: ``d * y + (1 - d) * rest`` over the patch tokens (prefix tokens
    always run), with y from :func:`sparse_block_outputs`: the values and gradients of the masked path
    ``y = block(x, pruned tokens masked out as keys)`` (all of them with ``probe`` 1; the gate's unbiased
    estimate below 1).

    Args:
        block: A :class:`tokenprune.models.vit.Block`.
        x: Tokens (B, N, C), ``num_prefix`` prefix tokens first.
        d: (B, N - num_prefix) keep decision in {0, 1} of the patch tokens, with straight-through gradients.
        num_prefix: Prefix tokens in front of the patch tokens (always kept).
        probe: Fraction in (0, 1] of each image's pruned tokens whose output feeds the gate's gradient.
        generator: Source of the probe's draw (None: torch's global generator).
        rest: (B, N, C) what a pruned token holds (None: x, SViT's rule).

    Returns:
        (B, N, C) tokens after the gated block.
    """
    rest = x if rest is None else rest
    y = sparse_block_outputs(block, x, with_prefix(d.detach() > 0.5, num_prefix, True), probe, generator, rest)
    d_full = with_prefix(d, num_prefix, 1.0).unsqueeze(-1)
    return d_full * y + (1.0 - d_full) * rest
