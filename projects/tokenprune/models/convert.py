"""Load DeiT / timm ViT weights into :class:`tokenprune.models.vit.ViT`.

Handles the layouts these checkpoints come in (``{'model': ...}`` from DeiT's releases, ``{'state_dict': ...}``
from mmengine, ``module.`` / ``backbone.`` prefixes), drops the classifier (``head``, ``head_dist``,
``fc_norm``), keeps or drops the class token as the backbone is configured, drops DeiT's distillation token,
and resamples the position embeddings to the backbone's grid. Torch-only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import WeightsMismatchError
from .vit import ViT, resize_pos_embed
from .weights import read_weights

CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


@dataclass
class LoadReport:
    """What a conversion placed, dropped on purpose, and could not place.

    ``resized``: tensors of the file resampled to the model's shape (e.g. relative-position tables for another
    window); ``initialised``: model tensors this kind of file never holds, left at their initial values by
    design (e.g. ViTDet's relative-position tables, which start at zero from MAE pre-training)."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; dropped on purpose: {self.dropped or 'none'}"]
        if self.resized:
            lines.append(f"resized to the model: {self.resized}")
        if self.initialised:
            lines.append(f"not in this kind of file, by design (left at their initial values): {self.initialised}")
        if self.missing:
            lines.append(f"missing in the file (left at their initial values): {self.missing}")
        if self.unexpected:
            lines.append(f"unexpected in the file (ignored): {self.unexpected}")
        return "\n".join(lines)


def unwrap_state_dict(source: str | os.PathLike | dict) -> dict[str, Tensor]:
    """The tensor dict of a weights file or loaded checkpoint (:func:`tokenprune.models.weights.read_weights`),
    with ``module.`` and ``backbone.`` prefixes removed."""
    return {k.removeprefix("backbone."): v for k, v in read_weights(source).items()}


def convert_timm_vit(state_dict: dict[str, Tensor], model: ViT) -> tuple[dict[str, Tensor], list[str]]:
    """Map a timm/DeiT ViT state dict onto ``model``'s keys. Returns the new dict and the keys dropped."""
    sd = dict(state_dict)
    dropped = [k for k in sd if k.startswith(CLASSIFIER_PREFIXES)]
    for k in dropped:
        del sd[k]
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise WeightsMismatchError(
            "the weights file has no 'patch_embed.proj.weight' / 'pos_embed': it is not a timm or DeiT "
            f"ViT (first keys: {list(state_dict)[:5]})"
        )
    file_prefix = 1 + ("dist_token" in sd) if "cls_token" in sd else 0
    pos = sd["pos_embed"]
    grid_pos = pos[:, file_prefix:]
    side = math.isqrt(grid_pos.shape[1])
    if side * side != grid_pos.shape[1]:
        raise WeightsMismatchError(f"pos_embed has {grid_pos.shape[1]} grid positions, not a square grid")
    grid_pos = resize_pos_embed(grid_pos, model.pos_embed_hw, (side, side))
    if "dist_token" in sd:
        dropped.append("dist_token")
        del sd["dist_token"]
    if model.cls_token is not None:
        if file_prefix == 0:
            raise WeightsMismatchError(
                "the backbone is configured with cls_token=True but the weights file has no cls_token; "
                "set cls_token=False"
            )
        sd["pos_embed"] = torch.cat([pos[:, :1], grid_pos], dim=1)
    else:
        if "cls_token" in sd:
            dropped.append("cls_token")
            del sd["cls_token"]
        sd["pos_embed"] = grid_pos
    return sd, dropped


def fitting_tensors(model: ViT, sd: dict[str, Tensor], strict_shapes: bool = True) -> dict[str, Tensor]:
    """The tensors of a converted state dict that fit ``model`` (its keys, its shapes). With ``strict_shapes``
    a tensor of another shape means a file of another model size: :class:`WeightsMismatchError` naming the
    backbone's size. Shared by every weight loader (timm/DeiT, ViTDet, official SViT / ViT-Adapter)."""
    own = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong and strict_shapes:
        raise WeightsMismatchError(
            f"the weights file is for a different model size ({len(wrong)} tensors differ, e.g. {wrong[:3]}); "
            f"this backbone has embed_dim={model.embed_dim}, depth={model.depth}, num_heads={model.num_heads}: "
            "choose the backbone config that matches the file"
        )
    return {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}


def load_timm_vit(model: ViT, source: str | os.PathLike | dict, strict_shapes: bool = True) -> LoadReport:
    """Load a timm/DeiT checkpoint (a path or an already loaded dict) into ``model`` and report the keys.

    A path is read by :func:`tokenprune.models.weights.read_weights` (``torch.load(weights_only=True)``: tensors
    and plain containers only).
    Raises :class:`WeightsMismatchError` when a tensor's shape differs from the model's (a different model
    size) or when nothing of the file fits the model.
    """
    sd, dropped = convert_timm_vit(unwrap_state_dict(source), model)
    own = model.state_dict()
    fitting = fitting_tensors(model, sd, strict_shapes)
    if not fitting:
        raise WeightsMismatchError(f"no tensor of the weights file fits the model (file keys: {list(sd)[:5]}...)")
    result = model.load_state_dict(fitting, strict=False)
    return LoadReport(
        loaded=sorted(fitting),
        dropped=sorted(dropped),
        missing=sorted(result.missing_keys),
        unexpected=sorted(k for k in sd if k not in own),
    )
