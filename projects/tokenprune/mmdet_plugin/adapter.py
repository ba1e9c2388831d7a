"""MMDetection wrapper of the ViT-Adapter backbone (:class:`tokenprune.models.vit_adapter.ViTAdapter`)."""

from __future__ import annotations

from mmdet.registry import MODELS
from mmengine.logging import print_log

from ..models import load_timm_vit
from ..models.convert_official import is_official_layout, load_official
from ..models.vit_adapter import ViTAdapter
from ..models.weights import read_weights
from .backbone import init_backbone

VIT_KEYS = ("blocks.", "patch_embed.", "pos_embed")


@MODELS.register_module()
class TokenPruneViTAdapter(ViTAdapter):
    """ViT-Adapter as an MMDetection backbone: returns four maps (strides 4, 8, 16, 32) for ``FPN``.

    Args:
        reducer: None (dense), or a token reducer's config, e.g. ``dict(type='SViT', ...)``; it drives the ViT
            blocks only (see ``ViTAdapter``'s ``reducer_scope``).
        init_cfg: None (random init), or ``dict(type='Pretrained', checkpoint=PATH)`` with a local file: a
            timm / DeiT ViT state dict (ImageNet weights; the adapter starts from its initialisation), or a
            checkpoint of the official ViT-Adapter / SViT code or of this backbone (converted on the fly).
        **kwargs: The other arguments of :class:`tokenprune.models.vit_adapter.ViTAdapter`.
    """

    def __init__(self, reducer: dict | None = None, init_cfg: dict | None = None, **kwargs) -> None:
        init_backbone(self, super().__init__, reducer, init_cfg, kwargs)

    def init_weights(self) -> None:
        """Called by the runner before training: loads ``init_cfg``'s checkpoint, if any."""
        if self.init_cfg is None:
            return
        path = self.init_cfg["checkpoint"]
        ckpt = read_weights(path)
        if is_official_layout(ckpt):
            message = str(load_official(self, ckpt))
        else:
            report = load_timm_vit(self, ckpt)
            others = [k for k in report.missing if not k.startswith(VIT_KEYS)]
            report.missing = [k for k in report.missing if k.startswith(VIT_KEYS)]
            message = f"{report}\n{len(others)} tensors outside the ViT (adapter, reducer) keep their initialisation"
        print_log(f"TokenPruneViTAdapter: weights from {path}:\n{message}", logger="current")
