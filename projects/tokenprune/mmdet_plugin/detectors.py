"""Detectors whose loss dict also carries the backbone's token-reduction losses and keep rates, and the one way
the tools build a detector from a config (:func:`build_detector`) and load a checkpoint into it
(:func:`load_weights`)."""

from __future__ import annotations

import os

import torch
from mmdet.models.detectors import MaskRCNN
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.record import ReductionRecord


def build_detector(cfg: Config, seed: int | None = None) -> nn.Module:
    """The model of a loaded config (``cfg.model``), built in the config's default scope, on the CPU, in train
    mode, with random (or ``init_cfg``) weights.

    Args:
        cfg: A loaded MMEngine config.
        seed: Seed torch's generator with it first, so every model built with the same seed starts from the same
            random weights; None: leave the generator as it is.
    """
    init_default_scope(cfg.get("default_scope", "mmdet"))
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS.build(cfg.model)


def load_weights(model: nn.Module, checkpoint: str, logger: str = "current") -> dict:
    """Load a checkpoint file into a model with mmengine's ``load_checkpoint`` (on the CPU, through the safe
    loader; tensors the model lacks or misses are logged, not refused) and return its ``meta`` ({} if none).

    Args:
        model: The model, e.g. from :func:`build_detector`.
        checkpoint: Path of the checkpoint; ConfigError ``checkpoint not found: PATH`` if there is no such file.
        logger: mmengine's logger for the key report (``'silent'``: none).
    """
    if not os.path.isfile(checkpoint):
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    return load_checkpoint(model, checkpoint, map_location="cpu", strict=False, logger=logger).get("meta", {})


def backbone_losses_and_stats(backbone) -> dict[str, Tensor]:
    """The reducer's losses of the last forward (e.g. ``loss_svit_ratio``, summed into the total loss) and
    its mean keep rates (logged beside them; their names hold no 'loss', so they are not summed), from the
    backbone's ``last_record`` (nothing for a backbone without one)."""
    record = getattr(backbone, "last_record", None) or ReductionRecord()
    out = dict(record.aux_losses)
    out.update({k: v for k, v in record.stats.items() if isinstance(v, Tensor) and v.dim() == 0})
    return out


class BackboneLossMixin:
    """Adds :func:`backbone_losses_and_stats` to a detector's ``loss``. Put it first among the bases."""

    def loss(self, batch_inputs: Tensor, batch_data_samples: list) -> dict:
        losses = super().loss(batch_inputs, batch_data_samples)
        losses.update(backbone_losses_and_stats(self.backbone))
        return losses


@MODELS.register_module()
class TokenPruneMaskRCNN(BackboneLossMixin, MaskRCNN):
    """Mask R-CNN for a backbone with a token reducer: the reducer's ratio loss enters the loss dict."""
