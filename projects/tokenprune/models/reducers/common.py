"""Pieces several reducers share: running a block while exposing its attention.

Attention-scored methods (EViT, PPT, BAT, DynamicViT's variants) need the attention probabilities of the block
that scores the tokens; ToMe needs its keys. :func:`attention_trace` runs a :class:`tokenprune.models.vit.Block`
exactly as ``block(x, attn_mask)`` does, but with explicit attention, and returns what those methods read.
Explicit attention costs more than scaled_dot_product_attention, so use it only at the blocks that score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class AttentionTrace:
    """A block's output and the attention inside it.

    Attributes:
        out: Block output (B, N, C).
        attn: Attention probabilities (B, heads, N, N), rows = queries, softmax over keys.
        k: Keys (B, heads, N, C / heads).
        v: Values (B, heads, N, C / heads).
    """

    out: Tensor
    attn: Tensor
    k: Tensor
    v: Tensor


def attention_trace(block: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> AttentionTrace:
    """Run ``block`` on tokens x (B, N, C) like ``block(x, attn_mask)`` and return the attention too.

    ``attn_mask`` follows scaled_dot_product_attention: None, bool (True = may attend) or additive float,
    broadcastable to (B, heads, N, N) (e.g. log token sizes for proportional attention).
    """
    attn_mod = block.attn
    B, N, C = x.shape
    h = attn_mod.num_heads
    y = block.norm1(x)
    q, k, v = attn_mod.qkv(y).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    attn = logits.softmax(dim=-1)
    if block.training and attn_mod.attn_drop > 0:
        attn = nn.functional.dropout(attn, attn_mod.attn_drop)
    a = attn_mod.proj_drop(attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
    x = x + block.drop_path1(block.ls1(a))
    out = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return AttentionTrace(out=out, attn=attn, k=k, v=v)
