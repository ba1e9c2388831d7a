"""Plain Vision Transformer backbone for dense prediction (DeiT-compatible).

A DeiT / timm ``VisionTransformer`` turned into a detection backbone, as in ViTDet (Li et al., "Exploring
Plain Vision Transformer Backbones for Object Detection", ECCV 2022): patch size 16, absolute position
embeddings interpolated to the input's token grid, global attention in every block, and a single stride-16
feature map as output. Parameter names follow timm, so a timm/DeiT state dict loads after
:func:`tokenprune.models.convert.convert_timm_vit` drops its classifier.

Attention always runs through :func:`torch.nn.functional.scaled_dot_product_attention`, so dense and pruned
models are timed with the same kernel.

This file imports torch and timm only; MMDetection registration lives in ``tokenprune.mmdet_plugin``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from torch import Tensor, nn

from .reducers.base import TokenReducer, dense_token_counts


class Attention(nn.Module):
    """Multi-head self-attention on scaled_dot_product_attention.

    Args:
        dim: Channels C of the tokens.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Whether the qkv projection has a bias.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C). attn_mask: None, or broadcastable to (B, heads, N, N), bool (True = may attend)
        or additive float. Returns (B, N, C)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's parameter names).

    Args:
        dim: Channels C.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: Whether the qkv projection has a bias.
        init_values: LayerScale initial value; None disables LayerScale.
        drop_path: Stochastic depth rate of this block.
        proj_drop: Dropout after the attention and MLP projections.
        attn_drop: Dropout on the attention weights.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def resize_pos_embed(pos_embed: Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int]) -> Tensor:
    """Bicubically resample a (1, h*w, C) grid of position embeddings to (1, H*W, C)."""
    if tuple(new_hw) == tuple(old_hw):
        return pos_embed
    C = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_hw[0], old_hw[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_hw, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], C)


class ViT(nn.Module):
    """ViT backbone returning a stride-``patch_size`` feature map.

    Inputs of any size are padded on the right and bottom to a multiple of ``patch_size``.

    Args:
        img_size: Pre-training image size; sets the grid the position embeddings are stored at.
        patch_size: Patch size (16 for DeiT).
        in_chans: Input channels.
        embed_dim: Token channels C (192 DeiT-T, 384 DeiT-S, 768 DeiT-B).
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of C.
        qkv_bias: Whether the qkv projections have biases.
        init_values: LayerScale initial value; None disables it (DeiT).
        cls_token: Keep a class token through the blocks (dropped at the output), as DeiT was trained.
            False drops it: the model sees patch tokens only.
        final_norm: Apply the final LayerNorm (timm's ``norm``) to the output tokens.
        drop_path_rate: Stochastic depth, increasing linearly to this rate over the blocks.
        drop_rate: Dropout after the position embedding and in the blocks' projections.
        attn_drop_rate: Dropout on attention weights.
        reducer: Token-reduction method driving the blocks (see :class:`TokenReducer`); None runs every block
            densely. After each forward its losses and stats are in ``last_aux_losses`` and ``last_stats``.

    Setting ``record_tokens = True`` (analysis tools do) also keeps, after each forward, ``last_token_counts``
    ((depth, B) tokens each block ran, see :meth:`TokenReducer.token_counts`), ``last_extra_macs`` (the
    reducer's own multiply-accumulates per image) and ``last_token_maps`` (:meth:`TokenReducer.token_maps`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        cls_token: bool = False,
        final_norm: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        reducer: TokenReducer | None = None,
    ) -> None:
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.pos_embed_hw = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.num_prefix_tokens = 1 if cls_token else 0

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        num_pos = self.pos_embed_hw[0] * self.pos_embed_hw[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i], drop_rate, attn_drop_rate)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.reset_parameters()
        self.last_aux_losses: dict[str, Tensor] = {}
        self.last_stats: dict[str, float | Tensor] = {}
        self.record_tokens = False
        self.last_token_counts: Tensor | None = None
        self.last_extra_macs: Tensor | float = 0.0
        self.last_token_maps: dict[int, Tensor] = {}
        # set after reset_parameters so the reducer keeps its own initialisation
        self.set_reducer(reducer)

    def set_reducer(self, reducer: TokenReducer | None) -> None:
        """Attach (or, with None, remove) the token-reduction method; raises ValueError if it does not fit."""
        if reducer is not None:
            reducer.check_backbone(self.depth, self.embed_dim)
        self.reducer = reducer

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) for linear layers and embeddings."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def grid_size(self, img_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an input of size (H, W), after padding to the patch size."""
        p = self.patch_size
        return math.ceil(img_hw[0] / p), math.ceil(img_hw[1] / p)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> tokens (B, prefix + h*w, C) with position embeddings, and the grid (h, w)."""
        H, W = x.shape[-2:]
        h, w = self.grid_size((H, W))
        if (h * self.patch_size, w * self.patch_size) != (H, W):
            x = F.pad(x, (0, w * self.patch_size - W, 0, h * self.patch_size - H))
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        prefix_pos = self.pos_embed[:, : self.num_prefix_tokens]
        x = x + resize_pos_embed(self.pos_embed[:, self.num_prefix_tokens :], (h, w), self.pos_embed_hw)
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + prefix_pos).expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x), (h, w)

    def forward_features(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B, 3, H, W) -> normalised tokens (B, prefix + h*w, C) and the grid (h, w)."""
        x, hw = self.embed(x)
        if self.reducer is None:
            for blk in self.blocks:
                x = blk(x)
            if self.record_tokens:
                self.last_token_counts = dense_token_counts(self.depth, x.shape[0], x.shape[1], x.device)
                self.last_extra_macs, self.last_token_maps = 0.0, {}
            return self.norm(x), hw
        x, state = self.reducer.begin(x, hw, self.num_prefix_tokens)
        for i, blk in enumerate(self.blocks):
            x = self.reducer.run_block(i, blk, x, state)
        x = self.reducer.finish(x, state)
        self.last_aux_losses = self.reducer.aux_losses(state)
        self.last_stats = self.reducer.stats(state)
        if self.record_tokens:
            self.last_token_counts = self.reducer.token_counts(state, self.depth)
            self.last_extra_macs = self.reducer.extra_macs(state)
            self.last_token_maps = self.reducer.token_maps(state)
        return self.norm(x), hw

    def tokens_to_map(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Tokens (B, prefix + h*w, C) -> patch feature map (B, C, h, w), contiguous; prefix tokens are dropped."""
        x = x[:, self.num_prefix_tokens :]
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *hw).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> stride-16 map (B, C, ceil(H/16), ceil(W/16))."""
        return self.tokens_to_map(*self.forward_features(x))


def vit_tiny(**kwargs) -> ViT:
    """DeiT-T shape: 192 channels, 12 blocks, 3 heads."""
    return ViT(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small(**kwargs) -> ViT:
    """DeiT-S shape: 384 channels, 12 blocks, 6 heads."""
    return ViT(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base(**kwargs) -> ViT:
    """DeiT-B shape: 768 channels, 12 blocks, 12 heads."""
    return ViT(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})
