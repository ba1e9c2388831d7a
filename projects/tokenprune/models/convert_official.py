"""Checkpoints of the official ViT-Adapter and SViT code -> tokenprune's key layout.

Two public code bases released the models of SViT's table (Liu et al., WACV 2024), both on MMDetection 2:

- ViT-Adapter (Chen et al., ICLR 2023, ``czczup/ViT-Adapter``), also used by SViT for its dense models: the
  ViT blocks have timm's names (``blocks.i.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``,
  ``norm2``), with LayerScale ``blocks.i.gamma1`` / ``gamma2`` unless built with ``layer_scale=False``;
  ``pos_embed`` keeps DeiT's class-token slot, (1, 1 + 14*14, C).
- SViT (``uzh-rpg/svit``): each block is a PyTorch ``nn.TransformerEncoderLayer`` under
  ``blocks.i.TransformerEncoderLayer.`` (``self_attn.in_proj_weight`` / ``in_proj_bias`` hold q, k, v stacked
  as timm's ``qkv`` does, ``self_attn.out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``), and the
  gates are ``selective_modules.g.{norm, mlp.fc1, mlp.fc2}`` for gated blocks 3 + g.

The adapter's own modules (``level_embed``, ``spm.*``, ``interactions.*``, ``up``, ``norm1``..``norm4``) have
the same names in both and in :class:`tokenprune.models.vit_adapter.ViTAdapter`. Keys of a whole detector
checkpoint outside ``backbone.`` (neck, RPN and RoI heads) keep their names: MMDetection 3's Mask R-CNN with
``FPN`` and a one-conv RPN head uses the same ones.

Torch-only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import WeightsMismatchError
from .convert import fitting_tensors
from .vit import ViT, resize_pos_embed
from .weights import read_weights

BACKBONE = "backbone."

# (official pattern, ours), applied to backbone keys (without the "backbone." prefix)
RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^blocks\.(\d+)\.TransformerEncoderLayer\.self_attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (r"^blocks\.(\d+)\.TransformerEncoderLayer\.self_attn\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^blocks\.(\d+)\.TransformerEncoderLayer\.linear1\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
        (r"^blocks\.(\d+)\.TransformerEncoderLayer\.linear2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
        (r"^blocks\.(\d+)\.TransformerEncoderLayer\.(norm[12])\.(weight|bias)$", r"blocks.\1.\2.\3"),
        (r"^selective_modules\.(\d+)\.norm\.(weight|bias)$", r"reducer.gates.\1.norm.\2"),
        (r"^selective_modules\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"reducer.gates.\1.\2.\3"),
    )
)
# keys already in our layout
SAME = re.compile(
    r"^(patch_embed\.proj\.(weight|bias)"
    r"|blocks\.\d+\.(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma"
    r"|level_embed|spm\..+|interactions\..+|up\.(weight|bias)"
    r"|norm[1-4]\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|reducer\..+)$"
)
LAYER_SCALE = re.compile(r"^blocks\.(\d+)\.gamma([12])$")
# the projection each LayerScale multiplies: gamma1 the attention output, gamma2 the MLP output
LS_TARGET = {"1": "attn.proj", "2": "mlp.fc2"}
DROPPED = {
    "cls_token": "the adapter has no class token",
    "dist_token": "DeiT's distillation token is not used",
}
RECALIBRATE = "tools/analysis_tools/recalibrate.py"
NO_THRESHOLDS = (
    "SViT's calibrated inference thresholds are ours (uncalibrated: inference='threshold' falls back to the "
    f"fixed budget until calibrated with {RECALIBRATE})"
)
# what our models hold that the official checkpoints cannot: left at their initial values, which is right
NOT_IN_OFFICIAL = {"reducer.thresholds": NO_THRESHOLDS, "reducer.calibration_steps": NO_THRESHOLDS}
GATE_KEY = re.compile(r"^(backbone\.)?reducer\.gates\.")


def uncalibrated_svit_advice(converted: str = "CONVERTED.pth", config: str = "CONFIG") -> str:
    """What to do with a converted SViT model, which has gates but no calibrated thresholds."""
    calibrated = converted.removesuffix(".pth") + "_calibrated.pth"
    return (
        "SViT gates converted, but official checkpoints hold no calibrated inference thresholds: under "
        "inference='threshold' (our configs' default) every gated block falls back to the fixed budget "
        "(ceil(target x N) tokens per image). Calibrate them on training images, then test the result:\n"
        f"  python {RECALIBRATE} {config} {converted} {calibrated}\n"
        f"  python tools/test.py {config} {calibrated}\n"
        "or evaluate the converted file under the official rules: --cfg-options "
        "model.backbone.reducer.inference=sample (a hard Gumbel draw per token: the rule of the published numbers) "
        "or inference=official (p_keep > 0.5); see docs/adapter.md"
    )


@dataclass
class ConversionReport:
    """What :func:`convert_official_state_dict` did with every key."""

    renamed: dict[str, str] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    passed_through: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    converted_path: str | None = None  # where the converted checkpoint was written, for the advice

    @property
    def needs_calibration(self) -> bool:
        """Whether the result has SViT gates (renamed from the official names, or already ours) but no calibrated
        thresholds (the official code has none)."""
        gates = any(GATE_KEY.match(k) for k in [*self.renamed.values(), *self.unchanged])
        return gates and not any(k.endswith("reducer.calibration_steps") for k in self.unchanged)

    def __str__(self) -> str:
        lines = [
            f"renamed {len(self.renamed)} keys, kept {len(self.unchanged)} backbone keys as they are, passed "
            f"{len(self.passed_through)} non-backbone keys (neck, heads) through"
        ]
        if self.folded:
            lines.append(f"LayerScale folded into the projections it scales: {self.folded}")
        if self.dropped:
            lines.append("dropped on purpose: " + "; ".join(f"{k} ({why})" for k, why in self.dropped.items()))
        lines.append(f"could not place (left out): {self.unplaced or 'none'}")
        if self.added:
            lines.append(
                f"added, uncalibrated (zeros, as a model starts; the file then holds every tensor of the model): "
                f"{self.added}"
            )
        if self.needs_calibration:
            lines.append(uncalibrated_svit_advice(self.converted_path or "CONVERTED.pth"))
        return "\n".join(lines)


def add_uncalibrated_thresholds(state_dict: dict[str, Tensor], report: ConversionReport) -> None:
    """Give a converted SViT state dict the threshold buffers the official code does not have, at the values a
    model starts with (``reducer.thresholds`` zeros, ``reducer.calibration_steps`` 0: never calibrated), so the
    file holds every tensor of our model (``tools/test.py`` refuses a checkpoint that lacks some) and
    ``inference='threshold'`` announces its fallback to the fixed rule until the thresholds are calibrated.
    Listed in ``report.added``; nothing happens without SViT gates or when the buffers are there."""
    gates = {m[2] for k in state_dict if (m := re.match(r"^((?:backbone\.)?)reducer\.gates\.(\d+)\.", k))}
    if not gates:
        return
    prefix = BACKBONE if any(k.startswith(BACKBONE + "reducer.gates.") for k in state_dict) else ""
    count = max(int(g) for g in gates) + 1
    for name, dtype in (("reducer.thresholds", torch.float32), ("reducer.calibration_steps", torch.long)):
        if prefix + name not in state_dict:
            state_dict[prefix + name] = torch.zeros(count, dtype=dtype)
            report.added.append(prefix + name)


def pos_embed_grid(pos: Tensor) -> tuple[Tensor, int]:
    """(1, [1 +] s*s, C) -> the grid part (1, s*s, C) and s: a leading class-token slot is removed."""
    n = pos.shape[1]
    for prefix in (0, 1, 2):  # none, class token, DeiT's class + distillation tokens
        side = math.isqrt(n - prefix)
        if side * side == n - prefix:
            return pos[:, prefix:], side
    raise WeightsMismatchError(f"pos_embed has {n} positions: not a square grid with 0-2 prefix tokens")


def convert_official_state_dict(
    state_dict: dict[str, Tensor], layer_scale: str = "fold"
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename an official ViT-Adapter / SViT state dict to our layout.

    A whole detector's keys (some start with ``backbone.``) keep their prefix and non-backbone keys pass
    through; otherwise every key is taken as a backbone key. ``pos_embed`` loses its class-token slot (its grid
    is not resampled here). Keys that fit nothing are left out and listed in the report.

    Args:
        state_dict: The official tensors (see :func:`tokenprune.models.weights.read_weights`).
        layer_scale: What to do with ``blocks.i.gamma1`` / ``gamma2``: ``'fold'`` multiplies them into
            ``attn.proj`` / ``mlp.fc2`` (exact; for our models without LayerScale, ``init_values=None``),
            ``'keep'`` renames them to ``blocks.i.ls1.gamma`` / ``ls2.gamma`` (for ``init_values`` set).
    """
    if layer_scale not in ("fold", "keep"):
        raise ValueError(f"layer_scale must be 'fold' or 'keep', got {layer_scale!r}")
    detector = any(k.startswith(BACKBONE) for k in state_dict)
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    scales: dict[tuple[str, str], tuple[str, Tensor]] = {}
    for key, value in state_dict.items():
        if detector and not key.startswith(BACKBONE):
            out[key] = value
            report.passed_through.append(key)
            continue
        prefix = BACKBONE if detector else ""
        k = key[len(prefix) :]
        if k in DROPPED:
            report.dropped[key] = DROPPED[k]
        elif k == "pos_embed":
            out[key] = pos_embed_grid(value)[0]
            report.unchanged.append(key)
        elif m := LAYER_SCALE.match(k):
            if layer_scale == "keep":
                out[f"{prefix}blocks.{m[1]}.ls{m[2]}.gamma"] = value
                report.renamed[key] = f"{prefix}blocks.{m[1]}.ls{m[2]}.gamma"
            else:
                scales[(prefix, f"blocks.{m[1]}.{LS_TARGET[m[2]]}")] = (key, value)
        elif SAME.match(k):
            out[key] = value
            report.unchanged.append(key)
        else:
            for pattern, repl in RENAMES:
                if pattern.match(k):
                    new = prefix + pattern.sub(repl, k)
                    out[new] = value
                    report.renamed[key] = new
                    break
            else:
                report.unplaced.append(key)
    for (prefix, proj), (key, gamma) in scales.items():
        w, b = f"{prefix}{proj}.weight", f"{prefix}{proj}.bias"
        if w not in out or b not in out or out[w].shape[0] != gamma.shape[0]:
            report.unplaced.append(key)
            continue
        out[w] = out[w] * gamma[:, None]
        out[b] = out[b] * gamma
        report.folded.append(key)
    return out, report


@dataclass
class OfficialLoadReport:
    """What :func:`load_official` placed into a backbone."""

    conversion: ConversionReport
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [str(self.conversion), f"loaded {len(self.loaded)} tensors into the backbone"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} non-backbone keys (neck, heads): load them with load_from")
        if self.defaults:
            lines.append(f"not in official checkpoints, left at their initial values: {self.defaults}")
        if self.missing:
            lines.append(f"missing in the file (left at their initial values): {self.missing}")
        if self.unexpected:
            lines.append(f"not in this backbone (ignored): {self.unexpected}")
        return "\n".join(lines)


def is_official_layout(state_dict: dict[str, Tensor]) -> bool:
    """True for a ViT-Adapter / SViT / tokenprune-adapter checkpoint, False for a plain timm / DeiT ViT."""
    for key in state_dict:
        k = key.removeprefix(BACKBONE)
        if k.startswith(("spm.", "interactions.", "level_embed", "selective_modules.")):
            return True
        if ".TransformerEncoderLayer." in k or LAYER_SCALE.match(k):
            return True
    return False


def load_official(model: ViT, source: str | os.PathLike | dict, strict_shapes: bool = True) -> OfficialLoadReport:
    """Load an official ViT-Adapter / SViT checkpoint (path or loaded dict) into a backbone.

    Only the backbone's tensors are taken (a detector checkpoint's others are counted as ignored); LayerScale
    is folded or kept to match the model, and ``pos_embed`` resampled to the model's grid. A path is read by
    :func:`tokenprune.models.weights.read_weights` (``torch.load(weights_only=True)``); a file holding more than
    tensors and plain containers is refused (convert it with ``tools/model_converters/official_to_tokenprune.py
    --trust-checkpoint`` if you trust it).
    Raises :class:`WeightsMismatchError` when shapes differ (another model size) or nothing fits.
    """
    sd = read_weights(source)
    ignored = []
    if any(k.startswith(BACKBONE) for k in sd):
        ignored = sorted(k for k in sd if not k.startswith(BACKBONE))
        sd = {k[len(BACKBONE) :]: v for k, v in sd.items() if k.startswith(BACKBONE)}
    own = model.state_dict()
    has_ls = any(k.endswith("ls1.gamma") for k in own)
    sd, conversion = convert_official_state_dict(sd, layer_scale="keep" if has_ls else "fold")
    if "pos_embed" in sd:
        grid, side = pos_embed_grid(sd["pos_embed"])
        sd["pos_embed"] = resize_pos_embed(grid, model.pos_embed_hw, (side, side))
    fitting = fitting_tensors(model, sd, strict_shapes)
    if not fitting:
        raise WeightsMismatchError(f"no tensor of the checkpoint fits the model (keys: {list(sd)[:5]}...)")
    result = model.load_state_dict(fitting, strict=False)
    return OfficialLoadReport(
        conversion=conversion,
        loaded=sorted(fitting),
        ignored=ignored,
        defaults=sorted(k for k in result.missing_keys if k in NOT_IN_OFFICIAL),
        missing=sorted(k for k in result.missing_keys if k not in NOT_IN_OFFICIAL),
        unexpected=sorted(k for k in sd if k not in own),
    )
