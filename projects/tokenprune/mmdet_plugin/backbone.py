"""MMDetection wrappers of the torch-only backbone and neck."""

from __future__ import annotations

from collections.abc import Callable

from mmdet.registry import MODELS
from mmengine.logging import print_log
from torch import Tensor

from ..errors import ConfigError
from ..models import SimpleFPN, ViT, load_timm_vit, load_vitdet_vit
from ..models.reducers import build_reducer
from ..models.simple_fpn import LayerNorm2d


def init_backbone(
    backbone: ViT, base_init: Callable[..., None], reducer: dict | None, init_cfg: dict | None, kwargs: dict
) -> None:
    """The constructor our MMDetection backbones share: check ``init_cfg``, build the torch model with
    ``base_init(**kwargs)``, attach the reducer built from its config; a bad setting raises one ConfigError."""
    name = type(backbone).__name__
    if init_cfg is not None and (init_cfg.get("type") != "Pretrained" or "checkpoint" not in init_cfg):
        raise ConfigError(f"{name} init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), got {init_cfg}")
    try:
        base_init(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {name} arguments: {e}") from e
    built = build_reducer(reducer, backbone.embed_dim)
    try:
        backbone.set_reducer(built)
    except ValueError as e:
        raise ConfigError(f"the reducer does not fit this backbone: {e}") from e
    backbone.init_cfg = init_cfg


@MODELS.register_module()
class TokenPruneViT(ViT):
    """:class:`tokenprune.models.ViT` as an MMDetection backbone: returns a 1-tuple (stride-16 map,).

    Args:
        reducer: None (dense), or a token reducer's config, e.g. ``dict(type='SViT', keep_targets=[...])``
            (see ``tokenprune.models.reducers.REDUCERS``).
        init_cfg: None (random init), or ``dict(type='Pretrained', checkpoint=PATH)`` with a local timm/DeiT
            ViT state dict; the classifier is dropped, position embeddings resampled, keys reported. A ViTDet
            backbone (window attention or relative positions) or a ``.pkl`` file is loaded with
            :func:`tokenprune.models.load_vitdet_vit`: MAE pre-training, detectron2 or MMDetection ViTDet weights.
        **kwargs: The other arguments of :class:`tokenprune.models.ViT` (e.g. ViTDet's ``window_size``,
            ``global_block_indexes``, ``use_rel_pos``, ``rel_pos_input_size``, ``norm_eps``).
    """

    def __init__(self, reducer: dict | None = None, init_cfg: dict | None = None, **kwargs) -> None:
        init_backbone(self, super().__init__, reducer, init_cfg, kwargs)

    def init_weights(self) -> None:
        """Called by the runner before training: loads ``init_cfg``'s checkpoint, if any."""
        if self.init_cfg is None:
            return
        checkpoint = self.init_cfg["checkpoint"]
        vitdet = self.window_block_indexes or self.use_rel_pos or str(checkpoint).endswith(".pkl")
        report = (load_vitdet_vit if vitdet else load_timm_vit)(self, checkpoint)
        print_log(f"TokenPruneViT: weights from {checkpoint}: {report}", logger="current")

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (super().forward(x),)


MODELS.register_module(name="ViTDetFPN", module=SimpleFPN)
ViTDetFPN = SimpleFPN
# the channel LayerNorm of ViTDet's LN heads, for ``norm_cfg=dict(type='ViTDetLN2d', eps=1e-6)`` (MMDetection's
# ViTDet project registers its own as 'LN2d'; a different name, so both can be imported)
MODELS.register_module(name="ViTDetLN2d", module=LayerNorm2d)
