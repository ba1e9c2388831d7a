"""Load ViTDet backbone weights into :class:`tokenprune.models.vit.ViT` (e.g. :func:`~.vit.vitdet_base`).

Three layouts, told apart by their keys; the backbone's own names are the same in all three (timm's, plus
``attn.rel_pos_h`` / ``attn.rel_pos_w``):

- **MAE pre-training** (``mae_pretrain_vit_base.pth``, ``{'model': ...}``): ``patch_embed.proj.*``,
  ``pos_embed`` (1, 1 + 14*14, C) with the class row, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}.*``, plus ``cls_token``, ``norm.*`` / ``fc_norm.*``, ``head.*`` (and, in a full MAE checkpoint,
  ``mask_token`` and ``decoder_*``), which a detection backbone drops. It has no relative-position tables:
  they start at zero, as ViTDet's fine-tuning from MAE does (reported as ``initialised``).
- **detectron2 ViTDet** (``model_final_*.pkl`` of the model zoo, or a ``.pth`` written by detectron2): the
  backbone under ``backbone.net.``; the neck (``backbone.simfp_*``) and the heads (``proposal_generator.*``,
  ``roi_heads.*``) are reported as dropped. detectron2 writes its ``.pkl`` files with pickle: a dict with a
  ``'model'`` dict of numpy arrays, plus e.g. ``'__author__'`` and ``'matching_heuristics'``. They are read
  by :func:`tokenprune.models.weights.read_arrays_pickle`, a restricted unpickler that resolves only numpy's
  array reconstruction, numpy dtypes and ``collections.OrderedDict``; any other pickled object (which could run
  code) is refused before anything is called, with :class:`tokenprune.models.weights.UnsafeWeightsError`.
- **MMDetection ViTDet** (``projects/ViTDet``; mmengine's ``{'state_dict': ...}``): the backbone under
  ``backbone.``; ``neck.*``, ``rpn_head.*``, ``roi_head.*`` are reported as dropped.

In every layout ``pos_embed``'s class row (ViTDet's ``pretrain_use_cls_token``) is dropped unless the model
keeps a class token, and the grid is resampled bicubically to the model's ``pos_embed_hw`` when it differs;
relative-position tables of another length (another window or ``rel_pos_input_size``) are resampled linearly
as detectron2's ``get_rel_pos`` does, and listed in the report's ``resized``. A file of another model size
(width, depth, or head width through the tables) is refused with :class:`WeightsMismatchError`.

Torch-only (numpy, which torchvision already needs, only to read detectron2's ``.pkl`` files).
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import WeightsMismatchError
from .convert import LoadReport, fitting_tensors
from .vit import ViT, resize_pos_embed
from .weights import read_weights

DETECTRON2_PREFIX = "backbone.net."
MMDET_PREFIX = "backbone."
REL_POS_KEY = re.compile(r"^blocks\.(\d+)\.attn\.rel_pos_[hw]$")
BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
# what a detection backbone drops from pre-training files: classifier, MAE's final norm, masked-token and decoder
PRETRAINING_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.", "norm.", "decoder_", "decoder.")
PRETRAINING_KEYS = ("cls_token", "dist_token", "mask_token")


def detect_layout(keys) -> tuple[str, str]:
    """(layout name, key prefix of the backbone) of a state dict: detectron2, MMDetection, or pre-training."""
    keys = list(keys)
    if any(k.startswith(DETECTRON2_PREFIX) for k in keys):
        return "detectron2 ViTDet", DETECTRON2_PREFIX
    if any(k.startswith(MMDET_PREFIX + "blocks.") or k.startswith(MMDET_PREFIX + "patch_embed.") for k in keys):
        return "MMDetection ViTDet", MMDET_PREFIX
    return "MAE / timm pre-training", ""


def resize_rel_pos(table: Tensor, length: int) -> Tensor:
    """A (L, head_dim) relative-position table resampled linearly to ``length`` rows, as detectron2's
    ``get_rel_pos`` does at run time."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t().to(table.dtype)


def split_pos_embed(pos: Tensor) -> tuple[Tensor | None, Tensor, int]:
    """(class row or None, grid rows, grid side) of a (1, [1 +] side^2, C) position embedding."""
    n = pos.shape[1]
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side * side == n - prefix:
            return (pos[:, :1] if prefix else None), pos[:, prefix:], side
    raise WeightsMismatchError(f"pos_embed has {n} positions: neither a square grid nor a class row plus one")


def convert_vitdet_state_dict(state_dict: dict[str, Tensor], model: ViT) -> tuple[dict[str, Tensor], LoadReport]:
    """Map an MAE, detectron2 or MMDetection ViTDet state dict onto ``model``'s keys.

    Returns the dict to load and a report of every other key: ``dropped`` (pre-training parts: class token,
    final norm, classifier, MAE decoder; the class row of ``pos_embed``; the detector's neck and heads),
    ``resized``, ``initialised`` (relative-position tables, absent from a pre-training file) and
    ``unexpected`` (backbone keys the model has no place for, e.g. relative-position tables for a model built
    without ``use_rel_pos``); ``loaded`` and ``missing`` are filled by :func:`load_vitdet_vit`.

    Raises:
        WeightsMismatchError: No ViT in the file, or another number of blocks than ``model.depth``.
    """
    layout, prefix = detect_layout(state_dict)
    own = model.state_dict()
    report = LoadReport()
    sd: dict[str, Tensor] = {}
    file_depth = 0
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            report.dropped.append(key)  # not the backbone: the detector's neck and heads
            continue
        name = key[len(prefix) :]
        if m := BLOCK_INDEX.match(name):
            file_depth = max(file_depth, int(m.group(1)) + 1)
        if name in own or name == "pos_embed":
            sd[name] = value
        elif name in PRETRAINING_KEYS or name.startswith(PRETRAINING_PREFIXES):
            report.dropped.append(key)  # class token, final norm, classifier, MAE decoder
        else:
            report.unexpected.append(key)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise WeightsMismatchError(
            f"the weights file has no patch_embed.proj.weight / pos_embed under {prefix or 'the top level'!r}: it is "
            f"not an MAE, detectron2 or MMDetection ViTDet ViT (first keys: {list(state_dict)[:5]})"
        )
    if file_depth != model.depth:
        raise WeightsMismatchError(
            f"the weights file ({layout}) has {file_depth} blocks, this backbone has depth={model.depth}: it is for "
            "a different model size; choose the backbone config that matches the file"
        )

    cls_row, grid, side = split_pos_embed(sd.pop("pos_embed"))
    grid = resize_pos_embed(grid, model.pos_embed_hw, (side, side))
    if model.cls_token is not None:
        if cls_row is None:
            raise WeightsMismatchError("the backbone keeps a class token but the file's pos_embed has no class row")
        sd["pos_embed"] = torch.cat([cls_row, grid], dim=1)
    else:
        sd["pos_embed"] = grid
        if cls_row is not None:
            report.dropped.append(f"{prefix}pos_embed[:, 0] (class-token row)")

    for name in [k for k in sd if REL_POS_KEY.match(k) and k in own]:
        table, want = sd[name], own[name]
        if table.dim() == 2 and table.shape[1] == want.shape[1] and table.shape[0] != want.shape[0]:
            sd[name] = resize_rel_pos(table, want.shape[0])
            report.resized.append(f"{prefix}{name}: {table.shape[0]} -> {want.shape[0]} rows")
    if not any(REL_POS_KEY.match(k) for k in sd):
        report.initialised = sorted(k for k in own if REL_POS_KEY.match(k))
    return sd, report


def load_vitdet_vit(model: ViT, source: str | os.PathLike | dict, strict_shapes: bool = True) -> LoadReport:
    """Load MAE, detectron2 (``.pkl`` or ``.pth``) or MMDetection ViTDet weights into ``model`` and report the keys.

    A path is read by :func:`tokenprune.models.weights.read_weights`: a ``.pkl`` by a restricted unpickler (numpy
    arrays only), any other with ``torch.load(weights_only=True)``.

    Raises:
        WeightsMismatchError: The file is for another model size (a tensor's shape or the number of blocks
            differs) or holds no ViT.
        UnsafeWeightsError: A pickle holds other objects than arrays and containers.
    """
    sd, report = convert_vitdet_state_dict(read_weights(source), model)
    fitting = fitting_tensors(model, sd, strict_shapes)
    result = model.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting)
    report.missing = sorted(k for k in result.missing_keys if k not in report.initialised)
    report.unexpected = sorted(report.unexpected)
    report.dropped = sorted(report.dropped)
    return report
