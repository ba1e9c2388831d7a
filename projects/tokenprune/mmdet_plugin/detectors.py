"""Detectors whose loss dict also carries the backbone's token-reduction losses and keep rates."""

from __future__ import annotations

from mmdet.models.detectors import MaskRCNN
from mmdet.registry import MODELS
from torch import Tensor

from ..models.record import ReductionRecord


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
