"""Multiply-accumulates of a token-reduced ViT, counted from the tokens each block really ran.

A static counter (fvcore, mmengine's ``get_model_complexity_info``) traces one forward and sees the shapes of
that trace: it reports no saving for a reducer that gathers a data-dependent number of tokens, or it counts
the padding of a batch. Here the backbone's cost is computed from the token counts of its
:class:`tokenprune.models.record.ReductionRecord` (``backbone.last_record.token_counts``: the (depth, B) tokens
each image fed to each block, :meth:`tokenprune.models.reducers.TokenReducer.token_counts`) and the reducer's
own MACs (``last_record.extra_macs``), both kept after a forward with ``backbone.record_tokens = True``.

Convention: everything is in **MACs** (multiply-accumulates), per image. 1 MAC = 2 FLOPs. The "GFLOPs" of
the ViT papers (DeiT-S: 4.6 at 224x224) and of fvcore / MMDetection's ``get_flops`` are MACs under this
name; our DeiT-S count at 224x224 with the class token is 4.60 G.

Counted, for a block whose n tokens (prefix included) attend to as many keys, C channels, MLP width H:

==============  ==========
qkv projection  n * C * 3C
q @ k^T         n * n * C  (all heads together)
attn @ v        n * n * C
out projection  n * C * C
MLP             n * C * H + n * H * C
==============  ==========

i.e. ``12 n C^2 + 2 n^2 C`` for H = 4C; the patch embedding is ``h * w * C * in_chans * p^2`` (h x w patches
of p x p pixels). Not counted: LayerNorms, softmax, GELU, biases, LayerScale, residual additions, the
position-embedding resampling and addition (each O(n C) or less, under 1% of a block at DeiT widths).

:class:`LayerMacCounter` counts the convolutions and linear layers of any other module (a detector's neck
and heads) from the shapes they see in a real forward, through forward hooks.

Torch-only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .reducers.windowed import window_counts


def block_macs(
    tokens: Tensor | float,
    block: nn.Module,
    grid_hw: tuple[int, int] | None = None,
    window_tokens: Tensor | None = None,
) -> Tensor:
    """MACs of one :class:`tokenprune.models.vit.Block` run on ``tokens`` tokens attending to as many keys.

    A windowed block (``block.window_size > 0``, ViTDet) runs densely on the ``grid_hw`` token grid, padded
    to whole windows: its attention part (qkv, the per-window q @ k^T and attn @ v, the projection) runs on
    every padded window, ``windows * ws^2`` tokens each attending to the ``ws^2`` of its window, its MLP on
    the ``tokens`` real ones. Run on the kept tokens of each window (SViT, :mod:`.reducers.windowed`), given
    ``window_tokens`` n_w: the attention part costs ``sum_w n_w`` tokens through qkv and the projection and
    ``2 sum_w n_w^2 C`` for q @ k^T and attn @ v (the one key per window that stands for its zero padding is
    not counted).

    Args:
        tokens: Token count n, a number or a tensor of any shape (e.g. (B,) per image).
        block: The block; its layer sizes are read from ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.
        grid_hw: The token grid (h, w); needed for a windowed block.
        window_tokens: None (dense windows), or the tokens each window of a windowed block ran, of the shape of
            ``tokens`` plus a last dimension over the windows (:func:`window_token_counts`).

    Returns:
        MACs, float tensor of the shape of ``tokens``.
    """
    n = torch.as_tensor(tokens, dtype=torch.float64)
    attn, mlp = block.attn, block.mlp
    dim = attn.qkv.out_features // 3
    attn_linear = sum(layer.in_features * layer.out_features for layer in (attn.qkv, attn.proj))
    mlp_linear = sum(layer.in_features * layer.out_features for layer in (mlp.fc1, mlp.fc2))
    ws = getattr(block, "window_size", 0)
    if not ws:
        return n * (attn_linear + mlp_linear) + 2.0 * n * n * dim
    if grid_hw is None:
        raise ValueError("the MACs of a windowed block need the token grid: pass grid_hw")
    if window_tokens is not None:
        n_w = torch.as_tensor(window_tokens, dtype=torch.float64)
        return n * mlp_linear + n_w.sum(dim=-1) * attn_linear + 2.0 * n_w.square().sum(dim=-1) * dim
    windows = math.ceil(grid_hw[0] / ws) * math.ceil(grid_hw[1] / ws)
    padded = windows * ws * ws
    return n * mlp_linear + torch.full_like(n, padded * attn_linear + 2.0 * windows * (ws * ws) ** 2 * dim)


def window_token_counts(
    backbone: nn.Module,
    counts: Tensor,
    token_maps: dict[int, Tensor],
    img_hw: tuple[int, int],
    padded: bool = False,
) -> dict[int, Tensor]:
    """The tokens each window of the windowed blocks ran, where a reducer ran them on their kept tokens.

    A windowed block whose image ran fewer than all its tokens (``counts``) ran its windows on the kept ones
    (:mod:`tokenprune.models.reducers.windowed`), or on the merged ones (ToMe inside windows): the tokens of its
    token map, counted per window, each once (the positions whose id is their own index: a kept position, or the
    first position of a group merged within its window; ``PRUNED`` positions ran nothing). An image that ran
    every token ran the block densely: ``ws^2`` tokens in each padded window.

    Args:
        backbone: The ViT.
        counts: (depth, B) tokens each image fed to each block.
        token_maps: Block -> (B, h*w) token map of the forward (:meth:`TokenReducer.token_maps`).
        img_hw: Input image size (H, W) of the forward.
        padded: What a padded batch executes: every gathered window as long as the batch's longest.

    Returns:
        Block -> (B, windows) float, for the windowed blocks with a token map where some image ran fewer tokens.
    """
    hw = backbone.grid_size(img_hw)
    num_tokens = backbone.num_prefix_tokens + hw[0] * hw[1]
    out = {}
    for index, block in enumerate(backbone.blocks):
        ws, ids = getattr(block, "window_size", 0), token_maps.get(index)
        ran_all = counts[index].detach().cpu() >= num_tokens - 1e-6
        if not ws or ids is None or bool(ran_all.all()):
            continue
        ids = ids.detach().cpu()
        # one position per token that ran: its own id (kept tokens; the first position of a merged group)
        kept = window_counts(ids == torch.arange(ids.shape[1]), hw, (ws, ws)).double()
        if padded:
            kept = torch.where(kept > 0, kept.max(), kept)
        out[index] = torch.where(ran_all[:, None], torch.full_like(kept, ws * ws), kept)
    return out


def patch_embed_macs(backbone: nn.Module, img_hw: tuple[int, int]) -> int:
    """MACs of the patch-embedding convolution for one image of size ``img_hw`` (padded to the patch size)."""
    h, w = backbone.grid_size(img_hw)
    weight = backbone.patch_embed.proj.weight  # (C, in_chans, p, p)
    return h * w * weight.numel()


@dataclass
class BackboneMacs:
    """Per-image MACs of one backbone forward.

    Attributes:
        patch_embed: (B,) MACs of the patch embedding.
        blocks: (depth, B) MACs of each block.
        reducer: (B,) MACs of the reducer's own computation (gates, scores, matching).
        tokens: (depth, B) tokens each block ran (prefix included).
        num_tokens: (B,) N, the tokens of each image's complete set (prefix + h*w).
    """

    patch_embed: Tensor
    blocks: Tensor
    reducer: Tensor
    tokens: Tensor
    num_tokens: Tensor

    @property
    def total(self) -> Tensor:
        """(B,) MACs per image."""
        return self.patch_embed + self.blocks.sum(dim=0) + self.reducer

    @property
    def keep_rates(self) -> Tensor:
        """(depth, B) tokens each block ran as a fraction of N."""
        return self.tokens / self.num_tokens

    @staticmethod
    def cat(parts: Sequence[BackboneMacs]) -> BackboneMacs:
        """Join the counts of several forwards (e.g. batches of different image sizes) image by image."""
        return BackboneMacs(
            patch_embed=torch.cat([p.patch_embed for p in parts]),
            blocks=torch.cat([p.blocks for p in parts], dim=1),
            reducer=torch.cat([p.reducer for p in parts]),
            tokens=torch.cat([p.tokens for p in parts], dim=1),
            num_tokens=torch.cat([p.num_tokens for p in parts]),
        )

    def summary(self) -> dict:
        """Means over the images, as plain numbers: ``total``, ``patch_embed``, ``reducer``, ``blocks`` (list
        per block), ``tokens`` and ``keep_rate`` (lists per block), ``num_tokens``; and ``total_min`` /
        ``total_max`` over the images."""
        total = self.total
        return {
            "total": total.mean().item(),
            "total_min": total.min().item(),
            "total_max": total.max().item(),
            "patch_embed": self.patch_embed.mean().item(),
            "reducer": self.reducer.mean().item(),
            "blocks": self.blocks.mean(dim=1).tolist(),
            "tokens": self.tokens.mean(dim=1).tolist(),
            "keep_rate": self.keep_rates.mean(dim=1).tolist(),
            "num_tokens": self.num_tokens.mean().item(),
        }


def macs_from_counts(
    backbone: nn.Module,
    counts: Tensor,
    img_hw: tuple[int, int],
    extra: Tensor | float = 0.0,
    window_tokens: dict[int, Tensor] | None = None,
) -> BackboneMacs:
    """MACs of ``backbone`` (a :class:`tokenprune.models.ViT`) for given per-block token counts.

    Args:
        backbone: The ViT.
        counts: (depth, B) tokens each image fed to each block.
        img_hw: Input image size (H, W) of the forward, before padding to the patch size.
        extra: The reducer's own MACs per image, (B,) or a scalar.
        window_tokens: Windowed block -> (B, windows) tokens each window ran, for the blocks a reducer ran on
            kept tokens window by window (:func:`window_token_counts`); the other windowed blocks count dense.
    """
    window_tokens = window_tokens or {}
    counts = counts.detach().double().cpu()
    if counts.dim() != 2 or counts.shape[0] != len(backbone.blocks):
        raise ValueError(f"token counts must be (depth={len(backbone.blocks)}, B), got {tuple(counts.shape)}")
    h, w = backbone.grid_size(img_hw)
    num_tokens = backbone.num_prefix_tokens + h * w
    if counts.max() > num_tokens + 1e-6:
        raise ValueError(
            f"token counts up to {counts.max().item():.0f} exceed the {num_tokens} tokens of a {img_hw[0]}x"
            f"{img_hw[1]} input: pass the image size of the forward the counts come from"
        )
    batch = counts.shape[1]
    blocks = torch.stack(
        [block_macs(counts[i], blk, (h, w), window_tokens.get(i)) for i, blk in enumerate(backbone.blocks)]
    )
    extra = torch.as_tensor(extra, dtype=torch.float64).detach().cpu().expand(batch).clone()
    embed = torch.full((batch,), float(patch_embed_macs(backbone, img_hw)), dtype=torch.float64)
    n = torch.full((batch,), float(num_tokens), dtype=torch.float64)
    return BackboneMacs(patch_embed=embed, blocks=blocks, reducer=extra, tokens=counts, num_tokens=n)


def backbone_macs(backbone: nn.Module, img_hw: tuple[int, int], padded: bool = False) -> BackboneMacs:
    """MACs per image of the backbone's last forward, from its recorded token counts.

    Args:
        backbone: A :class:`tokenprune.models.ViT` whose last forward ran with ``record_tokens = True``.
        img_hw: Input image size (H, W) of that forward.
        padded: Count what a padded batch executes: at each block every image costs the batch's largest
            count (how :func:`tokenprune.models.reducers.toolkit.run_on_kept` runs images of different counts), in
            a windowed block run on kept tokens every gathered window the batch's longest.

    Windowed blocks a reducer ran on kept tokens count the tokens of each window (:func:`window_token_counts`,
    from the record's token maps).
    """
    record = getattr(backbone, "last_record", None)
    counts = None if record is None else record.token_counts
    if counts is None:
        raise ValueError(
            "the backbone has no recorded token counts: set backbone.record_tokens = True before the forward "
            "to count (or use count_backbone_macs)"
        )
    windows = window_token_counts(backbone, counts, record.token_maps, img_hw, padded)
    if padded:
        counts = counts.amax(dim=1, keepdim=True).expand_as(counts)
    return macs_from_counts(backbone, counts, img_hw, record.extra_macs, windows)


def dense_backbone_macs(backbone: nn.Module, img_hw: tuple[int, int], batch: int = 1) -> BackboneMacs:
    """MACs per image of a dense forward (every block runs all N tokens), computed without running it."""
    h, w = backbone.grid_size(img_hw)
    counts = torch.full((len(backbone.blocks), batch), float(backbone.num_prefix_tokens + h * w))
    return macs_from_counts(backbone, counts, img_hw)


@torch.no_grad()
def count_backbone_macs(backbone: nn.Module, images: Tensor, padded: bool = False) -> BackboneMacs:
    """Run ``backbone`` on images (B, 3, H, W) with token recording on and return its MACs per image.

    The backbone runs in its current mode (call ``.eval()`` first to count inference)."""
    previous = backbone.record_tokens
    backbone.record_tokens = True
    try:
        backbone(images)
    finally:
        backbone.record_tokens = previous
    return backbone_macs(backbone, tuple(images.shape[-2:]), padded=padded)


def flop_bound_speedup(dense: BackboneMacs, pruned: BackboneMacs) -> float:
    """Dense MACs / pruned MACs, each the mean over images: the speed-up if time followed MACs."""
    return dense.total.mean().item() / pruned.total.mean().item()


def layer_macs(module: nn.Module, inputs: tuple, output: Tensor) -> float:
    """MACs of one call of a convolution or linear layer from its real input and output; 0 for other modules.

    Conv: output elements x (in_channels / groups) x kernel area. Transposed conv: input elements x
    (out_channels / groups) x kernel area. Linear: output elements x in_features. Biases are not counted.
    """
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return float(inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size))
    if isinstance(module, nn.modules.conv._ConvNd):
        return float(output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size))
    return 0.0


class LayerMacCounter:
    """Counts the MACs of every convolution and linear layer of ``model`` during the forwards run inside a
    ``with`` block, from the shapes they really see (forward hooks), so data-dependent work such as the
    proposals an RoI head processes is counted as it ran. What :func:`layer_macs` does not count (pooling,
    RoIAlign, NMS, normalisation, activations) is left out.

    Args:
        model: The module whose layers are counted.
        exclude: Submodules (e.g. the backbone, counted by tokens instead) whose layers are skipped.

    After the block, ``macs`` maps each counted layer's qualified name to its MACs summed over the calls.
    """

    def __init__(self, model: nn.Module, exclude: Iterable[nn.Module] = ()) -> None:
        self.model = model
        self.exclude = list(exclude)
        self.macs: dict[str, float] = defaultdict(float)
        self._handles: list = []

    def _layers(self) -> list[tuple[str, nn.Module]]:
        skipped = {id(m) for ex in self.exclude for m in ex.modules()}
        kinds = (nn.Linear, nn.modules.conv._ConvNd)
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, kinds) and id(m) not in skipped]

    def __enter__(self) -> LayerMacCounter:
        self.macs.clear()
        for name, layer in self._layers():

            def hook(module, inputs, output, name=name):
                if isinstance(output, Tensor):
                    self.macs[name] += layer_macs(module, inputs, output)

            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def total(self) -> float:
        return float(sum(self.macs.values()))

    def grouped(self, depth: int = 1) -> dict[str, float]:
        """MACs summed by the first ``depth`` components of the layer names (e.g. ``neck``, ``rpn_head``)."""
        out: dict[str, float] = defaultdict(float)
        for name, macs in self.macs.items():
            out[".".join(name.split(".")[:depth])] += macs
        return dict(out)
