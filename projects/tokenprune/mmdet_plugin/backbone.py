"""MMDetection wrappers of the torch-only backbone and neck."""

from __future__ import annotations

from collections.abc import Callable

from mmdet.registry import MODELS
from mmengine.logging import print_log
from torch import Tensor

from ..errors import ConfigError
from ..models import SimpleFPN, ViT, load_timm_vit
from ..models.reducers import build_reducer


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
            ViT state dict; the classifier is dropped, position embeddings resampled, keys reported.
        **kwargs: The other arguments of :class:`tokenprune.models.ViT`.
    """

    def __init__(self, reducer: dict | None = None, init_cfg: dict | None = None, **kwargs) -> None:
        init_backbone(self, super().__init__, reducer, init_cfg, kwargs)

    def init_weights(self) -> None:
        """Called by the runner before training: loads ``init_cfg``'s checkpoint, if any."""
        if self.init_cfg is None:
            return
        report = load_timm_vit(self, self.init_cfg["checkpoint"])
        print_log(f"TokenPruneViT: weights from {self.init_cfg['checkpoint']}: {report}", logger="current")

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (super().forward(x),)


MODELS.register_module(name="ViTDetFPN", module=SimpleFPN)
ViTDetFPN = SimpleFPN
