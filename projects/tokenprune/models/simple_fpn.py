"""SimpleFPN: the multi-scale neck of ViTDet (Li et al., ECCV 2022) over a single stride-16 map.

From a (B, C, h, w) map at stride 16 it builds strides 4 (two 2x deconvolutions), 8 (one), 16 (identity) and
32 (2x max pool), projects each with a 1x1 and a 3x3 convolution, each followed by a channel LayerNorm, and,
when ``num_outs`` is 5, adds stride 64 by a stride-2 subsampling of the last level (for RPN anchors at 64).
Torch-only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (detectron2's ``LayerNorm``, MMDetection ViTDet's
    ``LN2d``). A subclass of ``nn.LayerNorm`` (same ``weight`` and ``bias``), so optimizer rules for norm
    layers (mmengine's ``norm_decay_mult``) and mmcv's ``build_norm_layer`` recognise it.

    Args:
        channels: Channels C.
        eps: Added to the variance (1e-6 as in ViTDet).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias) followed by a channel LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels),
    )


class SimpleFPN(nn.Module):
    """ViTDet's simple feature pyramid.

    Args:
        in_channels: Channels C of the backbone's stride-16 map.
        out_channels: Channels of every output level.
        num_outs: 4 (strides 4, 8, 16, 32) or 5 (adds stride 64).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, num_outs: int = 5) -> None:
        super().__init__()
        if num_outs not in (4, 5):
            raise ValueError(f"SimpleFPN num_outs must be 4 or 5, got {num_outs}")
        C = in_channels
        self.num_outs = num_outs
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, 2, stride=2),
            LayerNorm2d(C // 2),
            nn.GELU(),
            nn.ConvTranspose2d(C // 2, C // 4, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(C, C // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)
        level_channels = (C // 4, C // 2, C, C)
        self.lateral_convs = nn.ModuleList(conv_norm(c, out_channels, 1) for c in level_channels)
        self.fpn_convs = nn.ModuleList(conv_norm(out_channels, out_channels, 3) for _ in level_channels)

    def forward(self, inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
        """inputs: the stride-16 map (B, C, h, w), or a sequence whose last item is it.
        Returns ``num_outs`` maps of ``out_channels`` channels, strides 4, 8, 16, 32 (, 64)."""
        x = inputs if isinstance(inputs, Tensor) else inputs[-1]
        levels = (self.up4(x), self.up2(x), x, self.down2(x))
        outs = [fpn(lat(f)) for f, lat, fpn in zip(levels, self.lateral_convs, self.fpn_convs)]
        if self.num_outs == 5:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        # contiguous NCHW: mmcv's RoIAlign reads raw memory as NCHW and silently samples wrong values from a
        # channels-last tensor, which is what convolutions return for the backbone's token-major map
        return tuple(o.contiguous() for o in outs)
