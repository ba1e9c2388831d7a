"""Plain Vision Transformer backbone for dense prediction (DeiT-compatible, and ViTDet's windowed ViT).

A DeiT / timm ``VisionTransformer`` turned into a detection backbone, as in ViTDet (Li et al., "Exploring
Plain Vision Transformer Backbones for Object Detection", ECCV 2022): patch size 16, absolute position
embeddings interpolated to the input's token grid, and a single stride-16 feature map as output. By default
every block has global attention; ViTDet's options add, as detectron2's ``modeling/backbone/vit.py`` does:

- window attention in chosen blocks (``window_size``, ``window_block_indexes`` or ``global_block_indexes``):
  the block's normalised tokens are laid out on the (h, w) grid, zero-padded right and bottom to a multiple
  of the window, attended window by window (the zero tokens take part as keys, exactly as in detectron2),
  and cropped again: padding never enters the residual stream, and global blocks see only the h*w tokens;
- decomposed relative position embeddings (``use_rel_pos``; MViTv2's ``rel_pos_h`` / ``rel_pos_w`` tables of
  (2 * size - 1, head_dim), size = the window in windowed blocks and ``rel_pos_input_size`` in global ones,
  linearly interpolated when the needed length differs), added to the attention logits.

Parameter names follow timm (and detectron2 / MMDetection's ViTDet for ``attn.rel_pos_h`` / ``rel_pos_w``),
so a timm/DeiT state dict loads after :func:`tokenprune.models.convert.convert_timm_vit` drops its classifier,
and MAE, detectron2 and MMDetection ViTDet weights through :mod:`tokenprune.models.convert_vitdet`.

Attention always runs through :func:`torch.nn.functional.scaled_dot_product_attention`, so dense and pruned
models are timed with the same kernel; the relative-position bias goes in as an additive float mask.

This file imports torch and timm only; MMDetection registration lives in ``tokenprune.mmdet_plugin``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from torch import Tensor, nn

from .record import ReductionRecord, reduction_record
from .reducers.base import TokenReducer
from .reducers.windowed import grid_refusal


def to_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or a pair -> (h, w)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def check_grid(hw: Sequence[int] | None, num_tokens: int) -> tuple[int, int]:
    """The token grid (h, w) a windowed or relative-position block needs; checks that it holds every token."""
    if hw is None:
        raise ValueError(
            "a block with window attention or relative position embeddings needs the token grid: call "
            "block(x, attn_mask, hw=(h, w))"
        )
    h, w = to_hw(hw)
    if h * w != num_tokens:
        raise ValueError(
            f"the block got {num_tokens} tokens for a {h}x{w} grid: windowed and relative-position blocks need "
            "exactly the h*w patch tokens (no prefix token, no reduced token set)"
        )
    return h, w


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """detectron2's window_partition: (B, H, W, C) -> (B * windows, ws, ws, C), windows in row-major order,
    after zero-padding the right and bottom to multiples of ``window_size``; and the padded size (Hp, Wp)."""
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window_size, -W % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C), (Hp, Wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """detectron2's window_unpartition: (B * windows, ws, ws, C) -> (B, H, W, C), the padding cropped."""
    (Hp, Wp), (H, W) = pad_hw, hw
    B = windows.shape[0] // ((Hp // window_size) * (Wp // window_size))
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W] if (Hp, Wp) != (H, W) else x


def window_key_mask(attn_mask: Tensor, batch: int, hw: tuple[int, int], window_size: int, dtype: torch.dtype) -> Tensor:
    """A mask over keys, (B or 1, 1, 1, h*w) bool (True = may attend) or additive float, -> the same mask for
    every window, (B * windows, 1, 1, ws*ws), additive float; the padding keys get 0 (they take part, as in
    detectron2); a window with no allowed key gets no mask (it would give NaN). Masks that differ per query are
    not supported inside windows."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise ValueError(
            "inside windowed blocks attn_mask must be a mask over keys of shape (B or 1, 1, 1, N), got "
            f"{tuple(attn_mask.shape)}"
        )
    if attn_mask.dtype == torch.bool:
        mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, -math.inf)
    else:
        mask = attn_mask.to(dtype)
    h, w = hw
    windows, _ = window_partition(mask.expand(batch, 1, 1, h * w).reshape(batch, h, w, 1), window_size)
    windows = windows.reshape(-1, 1, 1, window_size * window_size)
    # a window whose keys are all masked out (every token of it pruned) would give NaN: its queries attend to
    # all keys instead (their outputs are the masked tokens', which their caller discards)
    return windows.masked_fill(torch.isneginf(windows).all(dim=-1, keepdim=True), 0.0)


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """detectron2's get_rel_pos: the (q_size, k_size, C) embeddings of every query-key offset along one axis,
    from a (L, C) table linearly interpolated (align_corners False) to 2 * max(q_size, k_size) - 1 rows when L
    differs."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.float().t().unsqueeze(0), size=max_rel_dist, mode="linear")
        rel_pos = resized.squeeze(0).t().to(rel_pos.dtype)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> Tensor:
    """Decomposed relative positions (MViTv2; detectron2's add_decomposed_rel_pos) as an additive bias.

    Args:
        q: Unscaled queries (B, heads, qh*qw, head_dim) on a (qh, qw) grid.
        rel_pos_h: Table (Lh, head_dim) along the height.
        rel_pos_w: Table (Lw, head_dim) along the width.
        q_hw: Query grid (qh, qw).
        k_hw: Key grid (kh, kw).

    Returns:
        (B, heads, qh*qw, kh*kw): q . Rh[qy, ky] + q . Rw[qx, kx] for query (qy, qx) and key (ky, kx).
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    Rh = get_rel_pos(qh, kh, rel_pos_h)
    Rw = get_rel_pos(qw, kw, rel_pos_w)
    B, heads, _, dim = q.shape
    r_q = q.reshape(B, heads, qh, qw, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, heads, qh * qw, kh * kw)


def rel_pos_terms(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, grid_hw: tuple[int, int], coords: Tensor
) -> tuple[Tensor, Tensor]:
    """The two decomposed relative-position terms of queries at given coordinates, against every row and column
    of their grid: what :func:`decomposed_rel_pos` computes for a whole grid, for any subset of its positions.

    Args:
        q: Unscaled queries (B, heads, n, head_dim).
        rel_pos_h: Table (Lh, head_dim) along the height.
        rel_pos_w: Table (Lw, head_dim) along the width.
        grid_hw: The grid (gh, gw) the queries sit on (a window, or a global block's whole token grid); the
            tables are interpolated to it as for a dense (gh, gw) grid.
        coords: (B, n, 2) long, each query's original (row, column) on that grid.

    Returns:
        (B, heads, n, gh) with q . Rh[row, r] for every grid row r, and (B, heads, n, gw) with
        q . Rw[column, c] for every grid column c.
    """
    gh, gw = grid_hw
    Rh = get_rel_pos(gh, gh, rel_pos_h)[coords[..., 0]]  # (B, n, gh, head_dim): the rows of each query's row
    Rw = get_rel_pos(gw, gw, rel_pos_w)[coords[..., 1]]
    return torch.einsum("bhnc,bnkc->bhnk", q, Rh), torch.einsum("bhnc,bnkc->bhnk", q, Rw)


def decomposed_rel_pos_at(rel_h: Tensor, rel_w: Tensor, coords: Tensor) -> Tensor:
    """Decomposed relative positions among tokens at given grid coordinates, as an additive bias.

    Args:
        rel_h: (B, heads, n, gh) height terms of the n queries (:func:`rel_pos_terms`).
        rel_w: (B, heads, n, gw) width terms.
        coords: (B, n, 2) long, the (row, column) of the n tokens, which are both the queries and the keys.

    Returns:
        (B, heads, n, n): rel_h[i, row_j] + rel_w[i, column_j] for query i and key j, i.e. the entries of
        :func:`decomposed_rel_pos` on the whole grid at these tokens' original positions.
    """
    B, heads, n, _ = rel_h.shape
    rows = coords[..., 0][:, None, None, :].expand(B, heads, n, n)
    cols = coords[..., 1][:, None, None, :].expand(B, heads, n, n)
    return rel_h.gather(-1, rows) + rel_w.gather(-1, cols)


def padding_key_logits(
    rel_terms: tuple[Tensor, Tensor] | None, grid_hw: tuple[int, int], content_hw: Tensor, shape: tuple[int, ...]
) -> Tensor:
    """log sum over the zero-padding positions of a window of exp(the relative-position term of a query with a
    key there): the padding keys of a window all have the same key and value (those of a zero token), so
    together they act as one key whose logit is the shared q . k plus this.

    Args:
        rel_terms: The queries' (rel_h, rel_w) from :func:`rel_pos_terms`, or None without relative positions.
        grid_hw: The window (gh, gw).
        content_hw: (B, 2) long, the rows and columns of each window that hold tokens (the others are the
            zero padding at the bottom and right of the token grid).
        shape: (B, heads, n), the queries' shape (used without relative positions).

    Returns:
        (B, heads, n, 1), or broadcastable to it; -inf for a window without padding.
    """
    gh, gw = grid_hw
    hv, wv = content_hw[:, 0], content_hw[:, 1]
    if rel_terms is None:
        count = (gh * gw - hv * wv).to(torch.float32)
        return count.log().reshape(-1, 1, 1, 1).expand(*shape, 1)
    rel_h, rel_w = rel_terms
    below = torch.arange(gh, device=rel_h.device) >= hv[:, None]  # (B, gh): padding rows
    right = torch.arange(gw, device=rel_w.device) >= wv[:, None]
    below, right = below[:, None, None, :], right[:, None, None, :]
    inf = -math.inf
    # padding = the padding rows (every column) and, in the content rows, the padding columns
    lower = rel_h.masked_fill(~below, inf).logsumexp(-1) + rel_w.logsumexp(-1)
    side = rel_h.masked_fill(below, inf).logsumexp(-1) + rel_w.masked_fill(~right, inf).logsumexp(-1)
    return torch.logaddexp(lower, side).unsqueeze(-1)


def add_attn_mask(bias: Tensor, attn_mask: Tensor | None) -> Tensor:
    """An additive bias combined with scaled_dot_product_attention's ``attn_mask`` (bool: False -> -inf)."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, -math.inf)
    return bias + attn_mask


class Attention(nn.Module):
    """Multi-head self-attention on scaled_dot_product_attention, with ViTDet's optional decomposed relative
    position embeddings (detectron2's ``Attention``: softmax((q * scale) k^T + rel(q)) v).

    Args:
        dim: Channels C of the tokens.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Whether the qkv projection has a bias.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
        rel_pos_size: None (no relative positions), or the (h, w) grid the tables ``rel_pos_h`` (2h - 1,
            head_dim) and ``rel_pos_w`` (2w - 1, head_dim) are built for; zero-initialised as in ViTDet.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_rel_pos = rel_pos_size is not None
        if rel_pos_size is not None:
            h, w = to_hw(rel_pos_size)
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * h - 1, dim // num_heads))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * w - 1, dim // num_heads))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """x: (B, N, C). attn_mask: None, or broadcastable to (B, heads, N, N), bool (True = may attend)
        or additive float. hw: the (h, w) grid of the N tokens, needed with relative positions. Returns
        (B, N, C)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.use_rel_pos:
            grid = check_grid(hw, N)
            bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, grid, grid).to(q.dtype)
            attn_mask = add_attn_mask(bias, attn_mask)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def forward_at(
        self,
        x: Tensor,
        coords: Tensor,
        grid_hw: tuple[int, int],
        key_mask: Tensor | None = None,
        content_hw: Tensor | None = None,
        key_bias: Tensor | None = None,
    ) -> Tensor:
        """Attention among a subset of a grid's tokens, with the relative positions of their original places.

        What :meth:`forward` computes for the whole (gh, gw) grid with every token outside the subset masked
        out as a key (the zero padding of a windowed block excepted), computed on the subset only: token
        reduction gathers the kept tokens of each window (or of a global block's grid) and runs this.

        Args:
            x: Normalised tokens (B, n, C): B windows (or images) of n tokens each, in any order.
            coords: (B, n, 2) long, each token's (row, column) on its (gh, gw) grid.
            grid_hw: The grid (gh, gw): the window, or a global block's token grid.
            key_mask: None, or (B, n) bool, False at rows that are padding of the batch, not tokens: they are
                no keys, and their outputs are meaningless.
            content_hw: None (no padding), or (B, 2) long, the rows and columns of each window that hold
                tokens: the window's remaining positions are the zero padding of a windowed block, which takes
                part as keys, as in :meth:`Block.window_attention`.
            key_bias: None, or (B, n) float added to the logits of every query with each token as key, e.g.
                ToMe's proportional attention (log of the positions a merged token stands for); the padding
                keys get none.

        Returns:
            (B, n, C), after the output projection.
        """
        B, N, C = x.shape
        heads, dim = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, heads, dim).permute(2, 0, 3, 1, 4)
        terms = bias = None
        if self.use_rel_pos:
            terms = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, grid_hw, coords)
            bias = decomposed_rel_pos_at(*terms, coords).to(q.dtype)
        if key_bias is not None:
            per_key = key_bias.to(q.dtype)[:, None, None, :]
            bias = per_key if bias is None else bias + per_key
        if key_mask is not None:
            bias = add_attn_mask(x.new_zeros(B, 1, 1, N) if bias is None else bias, key_mask[:, None, None, :])
        if content_hw is not None:
            # the padding keys: a zero token's key and value (the qkv bias), folded into one key with their
            # summed weight; the extra key is zero so that its whole logit sits in the bias
            zero = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * C)
            k_pad, v_pad = zero[C : 2 * C].reshape(heads, 1, dim), zero[2 * C :].reshape(heads, 1, dim)
            logit = padding_key_logits(terms, grid_hw, content_hw, (B, heads, N)).to(q.dtype)
            logit = logit + (q @ k_pad.transpose(-2, -1)) * dim**-0.5
            if bias is None:
                bias = x.new_zeros(B, heads, N, N)
            bias = torch.cat([bias.expand(B, heads, N, N), logit], dim=-1)
            k = torch.cat([k, k.new_zeros(B, heads, 1, dim)], dim=2)
            v = torch.cat([v, v_pad.expand(B, heads, 1, dim)], dim=2)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's parameter names), with
    ViTDet's window attention and relative positions as options.

    A windowed block attends within ``window_size`` x ``window_size`` windows of the token grid: the normalised
    tokens are zero-padded right and bottom to a multiple of the window, the attention (with its output
    projection) runs per window, and the padding is cropped before the residual addition, as detectron2's
    ``Block`` does.

    Args:
        dim: Channels C.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: Whether the qkv projection has a bias.
        init_values: LayerScale initial value; None disables LayerScale.
        drop_path: Stochastic depth rate of this block.
        proj_drop: Dropout after the attention and MLP projections.
        attn_drop: Dropout on the attention weights.
        window_size: Window side in tokens; 0 (default) for global attention.
        use_rel_pos: Add decomposed relative position embeddings to the attention logits.
        rel_pos_input_size: The grid (h, w) the tables of a global block are built for (a windowed block's are
            built for its window); required with ``use_rel_pos`` and ``window_size=0``.
        norm_eps: Epsilon of the two LayerNorms.
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
        window_size: int = 0,
        use_rel_pos: bool = False,
        rel_pos_input_size: int | tuple[int, int] | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        rel_pos_size = None
        if use_rel_pos:
            if window_size:
                rel_pos_size = (window_size, window_size)
            elif rel_pos_input_size is None:
                raise ValueError("a global block with use_rel_pos=True needs rel_pos_input_size")
            else:
                rel_pos_size = to_hw(rel_pos_input_size)
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, rel_pos_size=rel_pos_size)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def needs_grid(self) -> bool:
        """Whether the block needs the token grid ``hw`` (window attention or relative positions)."""
        return self.window_size > 0 or self.attn.use_rel_pos

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """x: (B, N, C) -> (B, N, C). attn_mask as in :meth:`Attention.forward` (in a windowed block: a mask
        over keys only, (B or 1, 1, 1, N)). hw: the token grid (h, w), N = h*w, needed when
        :attr:`needs_grid`."""
        if self.window_size:
            y = self.window_attention(self.norm1(x), attn_mask, hw)
        else:
            y = self.attn(self.norm1(x), attn_mask, hw)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def window_attention(self, x: Tensor, attn_mask: Tensor | None, hw: tuple[int, int] | None) -> Tensor:
        """Attention (with its output projection) within windows: normalised tokens (B, h*w, C) -> (B, h*w, C)."""
        B, N, C = x.shape
        grid = check_grid(hw, N)
        ws = self.window_size
        windows, pad_hw = window_partition(x.reshape(B, *grid, C), ws)
        mask = None if attn_mask is None else window_key_mask(attn_mask, B, grid, ws, x.dtype)
        out = self.attn(windows.reshape(-1, ws * ws, C), mask, (ws, ws))
        return window_unpartition(out.reshape(-1, ws, ws, C), ws, pad_hw, grid).reshape(B, N, C)


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

    Inputs of any size are padded on the right and bottom to a multiple of ``patch_size``. With the default
    options every block has global attention and the model is DeiT's; ``window_size``, the windowed (or global)
    block indexes and ``use_rel_pos`` make it ViTDet's backbone (see :func:`vitdet_base`).

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
            densely. What it did in each forward is kept in ``last_record`` (see below).
            On a backbone with windowed or relative-position blocks only SViT, TPC and ToMe (see
            ``reducers/windowed.py`` and :meth:`set_reducer`).
        window_size: Window side in tokens of the windowed blocks (ViTDet: 14); 0 (default): no windows.
        window_block_indexes: The blocks with window attention (detectron2's argument); the others are global.
        global_block_indexes: Or the blocks with global attention (ViTDet-B: 2, 5, 8, 11); the others are
            windowed. Give one of the two with ``window_size`` > 0, neither without.
        use_rel_pos: Decomposed relative position embeddings in every block (ViTDet: True); needs
            ``cls_token=False``.
        rel_pos_input_size: The token grid the global blocks' relative-position tables are built for (ViTDet:
            the 1024-pixel input's 64); None: ``img_size // patch_size``. Other grids interpolate the tables.
        norm_eps: Epsilon of the blocks' LayerNorms (1e-6: timm, DeiT, MAE, detectron2's ViTDet; MMDetection's
            ViTDet config builds them with mmcv's default 1e-5).

    After each forward ``last_record`` holds a :class:`tokenprune.models.record.ReductionRecord` built by
    :func:`tokenprune.models.record.reduction_record`: the reducer's losses and stats (empty when dense) and,
    with ``record_tokens = True`` (analysis tools set it; off by default since it costs time), the (depth, B)
    tokens each block ran (:meth:`TokenReducer.token_counts`; all tokens when dense), the reducer's own
    multiply-accumulates per image and its token maps (:meth:`TokenReducer.token_maps`).
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
        window_size: int = 0,
        window_block_indexes: Sequence[int] | None = None,
        global_block_indexes: Sequence[int] | None = None,
        use_rel_pos: bool = False,
        rel_pos_input_size: int | tuple[int, int] | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.pos_embed_hw = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.num_prefix_tokens = 1 if cls_token else 0
        self.window_size = window_size
        self.window_block_indexes = windowed_blocks(depth, window_size, window_block_indexes, global_block_indexes)
        self.use_rel_pos = use_rel_pos
        self.rel_pos_input_size = self.pos_embed_hw if rel_pos_input_size is None else to_hw(rel_pos_input_size)
        if cls_token and (self.window_block_indexes or use_rel_pos):
            raise ValueError(
                "window attention and relative position embeddings work on the token grid and need "
                "cls_token=False (ViTDet drops the class token)"
            )

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        num_pos = self.pos_embed_hw[0] * self.pos_embed_hw[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                init_values,
                dpr[i],
                drop_rate,
                attn_drop_rate,
                window_size=window_size if i in self.window_block_indexes else 0,
                use_rel_pos=use_rel_pos,
                rel_pos_input_size=self.rel_pos_input_size,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.reset_parameters()
        self.record_tokens = False
        self.last_record = ReductionRecord()
        # set after reset_parameters so the reducer keeps its own initialisation
        self.set_reducer(reducer)

    def set_reducer(self, reducer: TokenReducer | None) -> None:
        """Attach (or, with None, remove) the token-reduction method; raises ValueError if it does not fit.

        On a backbone with windowed or relative-position blocks only a reducer with ``runs_on_grid`` fits (SViT,
        TPC, ToMe); the others are refused with the reason and what to use
        (:func:`tokenprune.models.reducers.windowed.grid_refusal`). The reducer is told whether the blocks need
        the grid (:meth:`TokenReducer.use_grid`): ToMe then merges inside each window instead of shrinking the
        token set.
        """
        grid_blocks = bool(self.window_block_indexes) or self.use_rel_pos
        if reducer is not None and grid_blocks and not getattr(reducer, "runs_on_grid", False):
            # most reducers drive the blocks as block(x, attn_mask) on a token set they shrink or merge; windowed
            # and relative-position blocks need every token at its place on the (h, w) grid
            if self.window_block_indexes:
                what = (
                    f"window attention (window_size={self.window_size}, windowed blocks "
                    f"{list(self.window_block_indexes)})"
                )
            else:
                what = "relative position embeddings (use_rel_pos=True)"
            raise ValueError(grid_refusal(reducer, what))
        if reducer is not None:
            reducer.check_backbone(self.depth, self.embed_dim)
            reducer.use_grid(grid_blocks)
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
            elif isinstance(m, Attention) and m.use_rel_pos:  # ViTDet's rel_pos_zero_init
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)

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
        """Images (B, 3, H, W) -> normalised tokens (B, prefix + h*w, C) and the grid (h, w); the forward's
        :class:`ReductionRecord` goes to ``last_record``."""
        x, hw = self.embed(x)
        runs = []
        if self.reducer is None:
            for blk in self.blocks:
                x = blk(x, None, hw)
        else:
            x, state = self.reducer.begin(x, hw, self.num_prefix_tokens)
            for i, blk in enumerate(self.blocks):
                x = self.reducer.run_block(i, blk, x, state)
            x = self.reducer.finish(x, state)
            runs.append((range(self.depth), state))
        B, N = x.shape[:2]
        self.last_record = reduction_record(self.reducer, runs, self.depth, B, N, x.device, self.record_tokens)
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


VITDET_B = {
    "img_size": 224,  # the MAE pre-training grid (14 x 14) the absolute position embeddings are stored at
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "cls_token": False,
    "final_norm": False,
    "drop_path_rate": 0.1,
    "window_size": 14,
    "global_block_indexes": (2, 5, 8, 11),
    "use_rel_pos": True,
    "rel_pos_input_size": 64,  # 1024 // 16: the global blocks' tables, as ViTDet builds them
    "norm_eps": 1e-6,
}


def vitdet_base(**kwargs) -> ViT:
    """ViTDet's ViT-B (detectron2's ``mask_rcnn_vitdet_b_100ep``): 768 channels, 12 blocks, 12 heads, 14 x 14
    windows in all blocks but the global 2, 5, 8, 11, decomposed relative positions (global tables for the
    64 x 64 grid of a 1024-pixel input), absolute positions from the 224 pre-training grid, no class token, no
    final norm, drop-path 0.1, LayerNorm eps 1e-6."""
    return ViT(**{**VITDET_B, **kwargs})


def windowed_blocks(
    depth: int, window_size: int, window_block_indexes: Sequence[int] | None, global_block_indexes: Sequence[int] | None
) -> tuple[int, ...]:
    """The sorted indexes of the windowed blocks from ViT's arguments; raises ValueError when they do not fit."""
    if window_block_indexes is not None and global_block_indexes is not None:
        raise ValueError("give window_block_indexes or global_block_indexes, not both")
    given = window_block_indexes if window_block_indexes is not None else global_block_indexes
    if window_size == 0:
        if given:
            raise ValueError(f"block indexes {list(given)} were given but window_size=0 (no window attention)")
        return ()
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0, got {window_size}")
    if given is None:
        raise ValueError(
            f"window_size={window_size} needs the windowed blocks (window_block_indexes) or the global ones "
            "(global_block_indexes, e.g. (2, 5, 8, 11) as ViTDet-B)"
        )
    indexes = [int(i) for i in given]
    bad = [i for i in indexes if not 0 <= i < depth]
    if bad or len(set(indexes)) != len(indexes):
        raise ValueError(f"block indexes {indexes} must be distinct and within 0..{depth - 1}")
    if window_block_indexes is not None:
        return tuple(sorted(indexes))
    return tuple(i for i in range(depth) if i not in indexes)
