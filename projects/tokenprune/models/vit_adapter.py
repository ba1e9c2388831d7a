"""ViT-Adapter backbone: the plain ViT of :mod:`tokenprune.models.vit` with a convolutional spatial prior and
deformable cross-attention between the two, returning four feature maps (strides 4, 8, 16, 32) for an FPN.

Chen et al., "Vision Transformer Adapter for Dense Predictions", ICLR 2023: the backbone of SViT's COCO results
(Liu et al., WACV 2024), there with DeiT-T/S and global attention in all 12 blocks.

- Spatial prior module (SPM): a ResNet-like conv stem giving c1..c4 at strides 4, 8, 16, 32, each projected
  to the ViT's C channels. c2..c4 are flattened, get a learned level embedding, and are concatenated into the
  adapter's tokens c, (B, n8 + n16 + n32, C).
- Four interactions over the ViT's blocks (default [0-2], [3-5], [6-8], [9-11]), each: the **injector**
  (deformable cross-attention, queries = ViT tokens, values = c, output scaled by a learned ``gamma``
  initialised to 0), the stage's ViT blocks, the **extractor** (deformable cross-attention, queries = c,
  values = ViT tokens, then a ConvFFN with a depth-wise 3x3 conv); the last interaction has two extra
  extractors.
- Output: c2..c4 reshaped to maps, c1 + ConvTranspose(c2), plus the ViT map resized to every stride, each
  through its own BatchNorm (SyncBatchNorm with ``norm='SyncBN'``, as the official code).

Parameter names follow the official ViT-Adapter code (``spm.*``, ``level_embed``, ``interactions.*``, ``up``,
``norm1``..``norm4``) and timm for the ViT, so :mod:`tokenprune.models.convert_official` only renames what
differs (SViT's PyTorch ``TransformerEncoderLayer`` blocks and gates).

Token reduction applies to the ViT blocks only; injectors and extractors always see the complete token map.
See :class:`ViTAdapter` (``reducer_scope``) for how a reducer's forward spans the stages.

Multi-scale deformable attention runs mmcv's CUDA kernel when mmcv is installed and the input is on a GPU,
otherwise the equivalent PyTorch code below (the same computation as mmcv's CPU fallback,
``multi_scale_deformable_attn_pytorch``). This file imports torch and timm only; mmcv is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from .record import reduction_record
from .reducers.base import TokenReducer
from .vit import ViT

DEFAULT_INTERACTION_INDEXES = ((0, 2), (3, 5), (6, 8), (9, 11))
PAD_DIVISOR = 32  # the coarsest level, c4, has stride 32
REDUCER_SCOPES = ("auto", "backbone", "stage")

Shapes = Sequence[tuple[int, int]]


@lru_cache(maxsize=1)
def _mmcv_kernel():
    """mmcv's CUDA multi-scale deformable attention (an autograd Function), or None without mmcv ops."""
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except Exception:  # mmcv absent, or built without ops
        return None
    return MultiScaleDeformableAttnFunction


def ms_deform_attn_core(value: Tensor, shapes: Shapes, locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention sampling in PyTorch (Zhu et al., "Deformable DETR", ICLR 2021).

    Args:
        value: (B, sum(h*w), heads, C_h) the values of all levels, level after level, row-major.
        shapes: (h, w) of each of the L levels.
        locations: (B, Q, heads, L, P, 2) sampling points as (x, y) in [0, 1] of each level.
        weights: (B, Q, heads, L, P) attention weights (softmax over L*P).

    Returns:
        (B, Q, heads * C_h): per query, the weighted sum of bilinearly sampled values (zero outside the map).
    """
    B, _, heads, ch = value.shape
    _, Q, _, L, P, _ = locations.shape
    grids = 2 * locations - 1
    sampled = []
    for level, values in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        level_map = values.flatten(2).transpose(1, 2).reshape(B * heads, ch, *shapes[level])
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B * heads, Q, P, 2)
        sampled.append(F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(B * heads, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(B, heads * ch, Q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable cross-attention (Deformable DETR's ``MSDeformAttn``, as ViT-Adapter uses it).

    Each query predicts, per head and level, ``num_points`` offsets around its reference point and their
    attention weights, and averages the values sampled there. Parameter names and initialisation are those
    of the official code and of mmcv's ``MultiScaleDeformableAttention``.

    Args:
        dim: Channels C of queries and values.
        num_heads: Attention heads; must divide the value channels.
        num_levels: Levels L of the values.
        num_points: Sampling points P per head and level.
        value_ratio: Value channels as a multiple of ``dim`` (ViT-Adapter's ``deform_ratio``).
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, value_ratio: float = 1.0) -> None:
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"deformable attention: {value_dim} value channels are not divisible by {num_heads} heads")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on rays in ``num_heads`` directions (point p at distance p + 1), weights uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: Shapes) -> Tensor:
        """query (B, Q, C), reference_points (1 or B, Q, 1, 2) as (x, y) in [0, 1], value (B, sum(h*w), C)
        with the levels' (h, w) in ``shapes`` -> (B, Q, C), without residual."""
        B, Q, _ = query.shape
        heads, L, P = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value).view(B, value.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(B, Q, heads, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, heads, L * P).softmax(-1).view(B, Q, heads, L, P)
        shape_t = torch.tensor(shapes, dtype=torch.long, device=query.device)
        normaliser = shape_t.flip(-1).to(offsets.dtype)  # (w, h) per level
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        kernel = _mmcv_kernel() if v.is_cuda else None
        if kernel is not None:
            starts = torch.cat([shape_t.new_zeros(1), shape_t.prod(1).cumsum(0)[:-1]])
            # the CUDA kernel reads raw memory: hand it contiguous tensors
            out = kernel.apply(v.contiguous(), shape_t, starts, locations.contiguous(), weights.contiguous(), 64)
        else:
            out = ms_deform_attn_core(v, shapes, locations, weights)
        return self.output_proj(out)


def reference_points(shapes: Shapes, device: torch.device) -> Tensor:
    """Pixel centres of the levels' grids, normalised to [0, 1] as (x, y): (1, sum(h*w), 1, 2)."""
    points = []
    for h, w in shapes:
        y, x = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)[None, :, None]


class DWConv(nn.Module):
    """Depth-wise 3x3 conv applied to each level of a flattened multi-level token sequence.

    Args:
        dim: Channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        """x (B, sum(h*w), C) -> (B, sum(h*w), C)."""
        B, _, C = x.shape
        levels = x.split([h * w for h, w in shapes], dim=1)
        out = [self.dwconv(lv.transpose(1, 2).reshape(B, C, h, w)).flatten(2) for lv, (h, w) in zip(levels, shapes)]
        return torch.cat(out, dim=2).transpose(1, 2)


class ConvFFN(nn.Module):
    """fc1 -> depth-wise conv -> GELU -> fc2, the extractor's feed-forward network.

    Args:
        dim: Channels in and out.
        hidden: Hidden channels.
        drop: Dropout after the activation and after fc2.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, shapes: Shapes) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x), shapes)))))


class Injector(nn.Module):
    """Spatial prior -> ViT: ``x + gamma * MSDeformAttn(norm(x), norm(c))``, gamma initialised to
    ``init_values`` (0: the pre-trained ViT starts unchanged).

    Args:
        dim: Channels C.
        num_heads: Deformable attention heads.
        n_points: Sampling points per head and level.
        n_levels: Levels of the spatial prior (3).
        deform_ratio: Value channels as a multiple of C.
        init_values: Initial value of gamma.
    """

    def __init__(
        self, dim: int, num_heads: int, n_points: int, n_levels: int, deform_ratio: float, init_values: float
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, num_heads, n_levels, n_points, deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor, ref: Tensor, c: Tensor, shapes: Shapes) -> Tensor:
        """ViT tokens x (B, h*w, C), their reference points, adapter tokens c -> new x (B, h*w, C)."""
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), shapes)


class Extractor(nn.Module):
    """ViT -> spatial prior: ``c + MSDeformAttn(norm(c), norm(x))``, then ``c + ConvFFN(norm(c))``.

    Args:
        dim: Channels C.
        num_heads: Deformable attention heads.
        n_points: Sampling points per head.
        deform_ratio: Value channels as a multiple of C.
        with_cffn: Whether to add the ConvFFN.
        cffn_ratio: ConvFFN hidden width as a multiple of C.
        drop: Dropout in the ConvFFN.
        drop_path: Stochastic depth on the ConvFFN branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        with_cffn: bool,
        cffn_ratio: float,
        drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, num_heads, 1, n_points, deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: Tensor, ref: Tensor, x: Tensor, vit_hw: tuple[int, int], shapes: Shapes) -> Tensor:
        """Adapter tokens c (B, n, C) at the levels ``shapes``, their reference points, ViT tokens x on the
        grid ``vit_hw`` -> new c (B, n, C)."""
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [vit_hw])
        if self.with_cffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), shapes))
        return c


class InteractionBlock(nn.Module):
    """One interaction: the injector before a stage of ViT blocks, the extractor(s) after it. The blocks
    themselves belong to the ViT (``ViTAdapter.blocks``), so a token reducer can drive them.

    Args:
        dim: Channels C.
        num_heads: Deformable attention heads.
        n_points: Sampling points per head and level.
        deform_ratio: Value channels as a multiple of C.
        init_values: Initial value of the injector's gamma.
        with_cffn: Whether the extractors have a ConvFFN.
        cffn_ratio: ConvFFN hidden width as a multiple of C.
        drop: Dropout in the ConvFFN.
        drop_path: Stochastic depth on the ConvFFN branch.
        extra_extractor: Add two more extractors (the official model does in its last interaction).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        init_values: float,
        with_cffn: bool,
        cffn_ratio: float,
        drop: float,
        drop_path: float,
        extra_extractor: bool,
    ) -> None:
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, 3, deform_ratio, init_values)
        ext_args = (dim, num_heads, n_points, deform_ratio, with_cffn, cffn_ratio, drop, drop_path)
        self.extractor = Extractor(*ext_args)
        self.extra_extractors = nn.Sequential(*(Extractor(*ext_args) for _ in range(2))) if extra_extractor else None

    def extract(self, c: Tensor, ref: Tensor, x: Tensor, vit_hw: tuple[int, int], shapes: Shapes) -> Tensor:
        """Run the extractor and any extra extractors on the complete ViT map x (B, h*w, C)."""
        c = self.extractor(c, ref, x, vit_hw, shapes)
        for extractor in self.extra_extractors or ():
            c = extractor(c, ref, x, vit_hw, shapes)
        return c


def batch_norm(norm: str, channels: int) -> nn.Module:
    """'BN' -> BatchNorm2d, 'SyncBN' -> SyncBatchNorm (same state-dict keys)."""
    return nn.SyncBatchNorm(channels) if norm == "SyncBN" else nn.BatchNorm2d(channels)


def conv_bn_relu(norm: str, cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), batch_norm(norm, cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem -> c1..c4 at strides 4, 8, 16, 32, each projected to C channels by a 1x1 conv.

    Args:
        inplanes: Stem width (64 in the official models); c2 has twice, c3 and c4 four times as many.
        embed_dim: Output channels C.
        norm: ``'BN'`` or ``'SyncBN'``.
    """

    def __init__(self, inplanes: int, embed_dim: int, norm: str) -> None:
        super().__init__()
        w = inplanes
        self.stem = nn.Sequential(
            *conv_bn_relu(norm, 3, w, 2), *conv_bn_relu(norm, w, w, 1), *conv_bn_relu(norm, w, w, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )  # fmt: skip
        self.conv2 = nn.Sequential(*conv_bn_relu(norm, w, 2 * w, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(norm, 2 * w, 4 * w, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(norm, 4 * w, 4 * w, 2))
        self.fc1 = nn.Conv2d(w, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * w, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * w, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * w, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W), H and W multiples of 32 -> four maps (B, C, H/s, W/s), s = 4, 8, 16, 32."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)


def check_interaction_indexes(indexes: Sequence[Sequence[int]], depth: int) -> tuple[tuple[int, int], ...]:
    """Stages as (first, last) block, consecutive and covering blocks 0..depth-1; ValueError otherwise."""
    stages = tuple((int(s[0]), int(s[-1])) for s in indexes)
    expected_first = 0
    for first, last in stages:
        if first != expected_first or last < first:
            break
        expected_first = last + 1
    else:
        if stages and expected_first == depth:
            return stages
    raise ValueError(
        f"interaction_indexes {[list(s) for s in indexes]} must split blocks 0..{depth - 1} into consecutive "
        f"[first, last] stages, e.g. {[list(s) for s in DEFAULT_INTERACTION_INDEXES]} for 12 blocks"
    )


class ViTAdapter(ViT):
    """ViT-Adapter (Chen et al., ICLR 2023) around :class:`tokenprune.models.vit.ViT`, with token reduction in
    the ViT blocks.

    Inputs of any size are padded right and bottom to a multiple of 32 (H', W'); the outputs are four maps
    (B, C, H'/s, W'/s) for s = 4, 8, 16, 32. The ViT part has no class token and no final LayerNorm, as in the
    official model, and global attention in every block (SViT's setting).

    How a reducer spans the four stages (``reducer_scope``): the injector and extractor at each stage
    boundary need the complete ViT token map.

    - ``'backbone'``: one ``begin`` before block 0, one ``finish`` after the last block; between stages the
      token tensor must still hold every token (SViT: pruned tokens keep their value in place), checked at
      every boundary. The record (``last_record``) is the reducer's over all its blocks, as in :class:`ViT`.
    - ``'stage'``: ``begin`` / ``finish`` around each stage's blocks, for reducers that shrink or merge the
      token set. Tokens a stage dropped come back (with their last value, refreshed by the injector) at the
      next stage, so budgets relative to the current token count restart from all tokens at each stage.
      The stages' records are merged into one (:func:`tokenprune.models.record.merge_records`): a loss or stat
      several stages report is averaged over them (for per-block means with as many reducing blocks in each
      stage, e.g. DynamicViT at blocks 3, 6, 9, that is the mean over all blocks); token counts and maps are
      taken from each stage for its own blocks; MACs are summed.
    - ``'auto'`` (default): ``'backbone'`` for reducers that declare ``keeps_token_set = True`` (e.g. SViT,
      TPC), ``'stage'`` otherwise. Such a reducer is refused with ``'stage'``.

    After each forward ``last_record`` holds the :class:`tokenprune.models.record.ReductionRecord`, built by
    the same :func:`tokenprune.models.record.reduction_record` as :class:`ViT`'s (token counts, MACs and maps
    only with ``record_tokens = True``; token counts cover the ViT blocks).

    Args:
        img_size: Pre-training image size; sets the position-embedding grid (224 -> 14 x 14).
        patch_size: Must be 16 (the ViT map is the adapter's stride-16 level).
        in_chans: Input channels.
        embed_dim: Channels C (192 DeiT-T, 384 DeiT-S).
        depth: ViT blocks.
        num_heads: ViT attention heads.
        mlp_ratio: ViT MLP width as a multiple of C.
        qkv_bias: Whether the ViT's qkv projections have biases.
        init_values: LayerScale initial value of the ViT blocks; None (DeiT, SViT) disables it.
        drop_path_rate: Stochastic depth, linear over the ViT blocks; the extractors use the full rate.
        drop_rate: Dropout in the ViT and the ConvFFNs.
        attn_drop_rate: Dropout on the ViT's attention weights.
        reducer: Token reducer driving the ViT blocks, or None.
        conv_inplane: Width of the spatial prior module's stem.
        n_points: Sampling points per head and level of the deformable attention.
        deform_num_heads: Heads of the deformable attention (6 in the official T and S models).
        injector_init_values: Initial gamma of the injectors (official ``init_values``, 0).
        interaction_indexes: [first, last] ViT block of each interaction stage.
        with_cffn: Whether the extractors have a ConvFFN.
        cffn_ratio: ConvFFN hidden width as a multiple of C.
        deform_ratio: Value channels of the deformable attention as a multiple of C.
        add_vit_feature: Add the ViT map, resized, to every output level.
        use_extra_extractor: Two extra extractors in the last interaction.
        norm: ``'BN'`` or ``'SyncBN'`` for the spatial prior module and the output norms.
        block_norm_eps: LayerNorm epsilon inside the ViT blocks: 1e-6 (timm, DeiT, ViT-Adapter); 1e-5
            reproduces checkpoints of the official SViT code, whose blocks are PyTorch's encoder layers.
        reducer_scope: ``'auto'``, ``'backbone'`` or ``'stage'`` (see above).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        reducer: TokenReducer | None = None,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        injector_init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] = DEFAULT_INTERACTION_INDEXES,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        norm: str = "BN",
        block_norm_eps: float = 1e-6,
        reducer_scope: str = "auto",
    ) -> None:
        if patch_size != 16:
            raise ValueError(f"ViTAdapter needs patch_size=16 (its ViT map is the stride-16 level), got {patch_size}")
        if norm not in ("BN", "SyncBN"):
            raise ValueError(f"norm must be 'BN' or 'SyncBN', got {norm!r}")
        if reducer_scope not in REDUCER_SCOPES:
            raise ValueError(f"reducer_scope must be one of {REDUCER_SCOPES}, got {reducer_scope!r}")
        stages = check_interaction_indexes(interaction_indexes, depth)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            init_values=init_values,
            cls_token=False,
            final_norm=False,
            drop_path_rate=drop_path_rate,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
        )
        for blk in self.blocks:
            blk.norm1.eps = blk.norm2.eps = block_norm_eps
        self.interaction_indexes = stages
        self.add_vit_feature = add_vit_feature
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim, norm)
        self.interactions = nn.Sequential(
            *(
                InteractionBlock(
                    embed_dim,
                    deform_num_heads,
                    n_points,
                    deform_ratio,
                    injector_init_values,
                    with_cffn,
                    cffn_ratio,
                    drop_rate,
                    drop_path_rate,
                    extra_extractor=use_extra_extractor and i == len(stages) - 1,
                )
                for i in range(len(stages))
            )
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (batch_norm(norm, embed_dim) for _ in range(4))
        self._reset_adapter()
        self.reducer_scope = reducer_scope
        self.set_reducer(reducer)

    # parameters

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "interactions"):  # ViT.__init__ calls this before the adapter exists
            self._reset_adapter()

    def _reset_adapter(self) -> None:
        """The official initialisation: truncated normal linear layers, He-normal (fan-out) convs, unit norms,
        Deformable DETR's init of the deformable attention, standard-normal level embeddings."""
        for part in (self.spm, self.interactions, self.up):
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm)):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"level_embed"}

    def set_reducer(self, reducer: TokenReducer | None) -> None:
        """Attach (or remove) the token reducer of the ViT blocks; raises ValueError if it does not fit."""
        super().set_reducer(reducer)
        self.scope = None if reducer is None else self.resolve_scope(reducer, getattr(self, "reducer_scope", "auto"))

    @staticmethod
    def resolve_scope(reducer: TokenReducer, scope: str) -> str:
        """'auto' -> 'backbone' for reducers that keep the token set complete, else 'stage'; ValueError for
        'stage' with such a reducer (its forward is meant to span all its blocks)."""
        complete = reducer.keeps_token_set
        if scope == "stage" and complete:
            raise ValueError(
                f"{type(reducer).__name__} keeps every token in the map, so it runs over all stages in one forward: "
                "use reducer_scope='auto' or 'backbone' ('stage' is for reducers that shrink the token set)"
            )
        if scope != "auto":
            return scope
        return "backbone" if complete else "stage"

    # forward

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images (B, 3, H, W) -> four maps (B, C, H'/s, W'/s), s = 4, 8, 16, 32, H' and W' = H and W rounded
        up to multiples of 32."""
        H, W = (math.ceil(s / PAD_DIVISOR) * PAD_DIVISOR for s in x.shape[-2:])
        if (H, W) != tuple(x.shape[-2:]):
            x = F.pad(x, (0, W - x.shape[-1], 0, H - x.shape[-2]))
        B, C = x.shape[0], self.embed_dim
        c1, c2, c3, c4 = self.spm(x)
        shapes = [tuple(c.shape[-2:]) for c in (c2, c3, c4)]
        c = torch.cat([m.flatten(2).transpose(1, 2) + self.level_embed[i] for i, m in enumerate((c2, c3, c4))], 1)
        tokens, hw = self.embed(x)
        tokens, c = self.forward_interactions(tokens, hw, c, shapes)

        c2, c3, c4 = (
            m.transpose(1, 2).reshape(B, C, *s) for m, s in zip(c.split([h * w for h, w in shapes], 1), shapes)
        )
        c1 = self.up(c2) + c1
        outs = [c1, c2, c3, c4]
        if self.add_vit_feature:
            vit_map = self.tokens_to_map(tokens, hw)
            outs = [o + F.interpolate(vit_map, size=o.shape[-2:], mode="bilinear", align_corners=False) for o in outs]
        # contiguous NCHW maps (see SimpleFPN.forward: mmcv's RoIAlign misreads channels-last memory)
        return tuple(norm(o).contiguous() for norm, o in zip((self.norm1, self.norm2, self.norm3, self.norm4), outs))

    def forward_interactions(self, x: Tensor, hw: tuple[int, int], c: Tensor, shapes: Shapes) -> tuple[Tensor, Tensor]:
        """The four interactions: ViT tokens x (B, h*w, C) and adapter tokens c (B, n, C) -> both updated.

        Keeps the forward's :class:`tokenprune.models.record.ReductionRecord` in ``last_record``.
        """
        ref_vit = reference_points([hw], x.device)
        ref_c = reference_points(shapes, x.device)
        n_tokens = x.shape[1]
        reducer, scope = self.reducer, self.scope
        runs: list[tuple[range, object]] = []  # (blocks, reducer state) of each begin/finish span
        for s, ((first, last), inter) in enumerate(zip(self.interaction_indexes, self.interactions)):
            x = inter.injector(x, ref_vit, c, shapes)
            blocks = range(first, last + 1)
            if reducer is None:
                for i in blocks:
                    x = self.blocks[i](x)
            else:
                if scope == "stage" or s == 0:
                    x, state = reducer.begin(x, hw, 0)
                    runs.append((blocks if scope == "stage" else range(self.depth), state))
                for i in blocks:
                    x = reducer.run_block(i, self.blocks[i], x, state)
                if scope == "stage" or s == len(self.interaction_indexes) - 1:
                    x = reducer.finish(x, state)
                elif x.shape[1] != n_tokens:
                    raise ValueError(
                        f"reducer {type(reducer).__name__} left {x.shape[1]} of {n_tokens} tokens after block "
                        f"{last}, but the adapter's extractor needs the complete token map at every stage end: "
                        "use reducer_scope='stage' (or 'auto')"
                    )
            c = inter.extract(c, ref_c, x, hw, shapes)
        self.last_record = reduction_record(
            reducer, runs, self.depth, x.shape[0], n_tokens, x.device, self.record_tokens
        )
        return x, c

    def forward_features(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        raise NotImplementedError("ViTAdapter runs its ViT blocks inside the interactions: call forward()")


def vit_adapter_tiny(**kwargs) -> ViTAdapter:
    """ViT-Adapter-T: DeiT-T (192 channels, 12 blocks, 3 heads), 6 deformable heads."""
    return ViTAdapter(**{"embed_dim": 192, "num_heads": 3, "drop_path_rate": 0.1, **kwargs})


def vit_adapter_small(**kwargs) -> ViTAdapter:
    """ViT-Adapter-S: DeiT-S (384 channels, 12 blocks, 6 heads), 6 deformable heads."""
    return ViTAdapter(**{"embed_dim": 384, "num_heads": 6, "drop_path_rate": 0.2, **kwargs})
