"""Whether a checkpoint's tensors fit the model a config builds, checked by ``tools/train.py`` (``load_from``,
``--resume``) and ``tools/test.py`` (CHECKPOINT) before the runner starts.

mmengine loads checkpoints with ``strict=False``: a missing, unexpected or mis-shaped tensor is only logged,
so a checkpoint of another model (a ResNet detector, DeiT-T weights for a DeiT-S model, a dense checkpoint for
an SViT model) silently evaluates or trains with untrained parts. Here the file is read weights-only (its
storage memory-mapped, so a large file costs little), the model is built from the config, and keys and shapes
are compared:

- ``tools/test.py`` and ``--resume``: every tensor must fit.
- ``load_from`` (a fine-tune): the only accepted gap is a token reducer that is new, i.e. the model's
  ``backbone.reducer.*`` parameters and buffers when the file has none (a dense checkpoint fine-tuned into an
  SViT, TPC or DynamicViT model, simple-pyramid ViT or ViT-Adapter alike); it is named in one summary line.
- Anything else ends in one :class:`~tokenprune.errors.WeightsMismatchError` that says what is missing, what
  the file looks like, and what to do. ``--allow-partial-load`` (both tools) loads what fits anyway, with a
  warning that names the rest.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from ..errors import WeightsMismatchError
from .safe_load import load_checkpoint_file

REDUCER_PREFIX = "backbone.reducer."
PURPOSES = ("test", "load_from", "resume")
VIT_SIZES = {192: "DeiT-T", 384: "DeiT-S", 768: "DeiT-B"}  # 12 blocks each
# the tensors that name a token reducer, by the reducer that owns them
REDUCER_PARTS = {"gates": "SViT", "controllers": "TPC", "predictors": "DynamicViT"}

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Fit:
    """How a checkpoint's tensors fit a model: the model's keys the file lacks, the file's keys the model
    lacks, and the keys both have with other shapes (key, shape in the file, shape in the model)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)


def checkpoint_shapes(ckpt) -> Shapes:
    """The tensors mmengine's runner would load from a checkpoint, as key -> shape: ``ckpt['state_dict']``
    (or the checkpoint itself), without ``_metadata``, with the ``module.`` prefix removed as mmengine's
    ``revise_keys`` does. Non-tensor entries are left out."""
    if not isinstance(ckpt, dict):
        return {}
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        return {}
    return {
        re.sub(r"^module\.", "", k): tuple(v.shape)
        for k, v in state.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }


def inner_shapes(ckpt) -> Shapes:
    """For describing a file that holds no state dict where mmengine looks for one: the tensors under
    ``'model'`` or ``'module'`` (DeiT's and timm's release layout), else none."""
    for key in ("model", "module"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            return checkpoint_shapes(ckpt[key])
    return {}


def model_shapes(cfg: Config) -> Shapes:
    """Key -> shape of the state dict of the model ``cfg.model`` builds (built on the CPU and dropped)."""
    from .detectors import build_detector

    model = build_detector(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    gc.collect()
    return shapes


def compare(file: Shapes, model: Shapes) -> Fit:
    """:class:`Fit` of the tensors ``file`` into the model's ``model``."""
    return Fit(
        missing=[k for k in model if k not in file],
        unexpected=[k for k in file if k not in model],
        mis_shaped=[(k, file[k], model[k]) for k in model if k in file and file[k] != model[k]],
    )


def is_new_reducer(fit: Fit, file: Shapes) -> bool:
    """Whether the only gap is a token reducer the file does not have at all (a dense checkpoint loaded into a
    model with a reducer): the gap a fine-tune from a dense model expects."""
    return (
        bool(fit.missing)
        and not fit.unexpected
        and not fit.mis_shaped
        and all(k.startswith(REDUCER_PREFIX) for k in fit.missing)
        and not any(k.startswith(REDUCER_PREFIX) for k in file)
    )


# ---------------------------------------------------------------------------------------------------------
# what a state dict looks like


def summarize_keys(keys: list[str], limit: int = 6) -> str:
    """Keys in a short form: indices of module lists collapsed to ranges, e.g.
    ``backbone.blocks.0-11.* (144), roi_head.bbox_head.fc_cls.weight``."""
    groups: OrderedDict[str, list] = OrderedDict()
    for k in keys:
        parts = k.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            groups.setdefault(k, []).append(None)
        else:
            groups.setdefault(".".join(parts[:index]), []).append(int(parts[index]))
    out = []
    for head, indices in groups.items():
        if indices == [None]:
            out.append(head)
        else:
            numbers = sorted({i for i in indices if i is not None})
            span = f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
            out.append(f"{head}.{span}.* ({len(indices)})")
    more = f", ... ({len(out) - limit} more groups)" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


def _block_count(shapes: Shapes, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})


@dataclass
class Anatomy:
    """What a state dict holds: a detector or a classifier, its backbone's kind, width and depth, its token
    reducer (the names of the reducer's module lists) and its number of classes."""

    detector: bool = False
    prefixed: bool = False  # the backbone's keys start with 'backbone.'
    backbone: str | None = None  # 'ViT', 'ViT-Adapter', 'ResNet', 'Swin', 'another backbone', None
    width: int | None = None
    depth: int | None = None
    reducer_parts: tuple[str, ...] = ()
    num_classes: int | None = None

    @property
    def named(self) -> bool:
        """A ViT of a standard size (DeiT-T, -S, -B: 12 blocks)."""
        return self.width in VIT_SIZES and self.depth == 12

    @property
    def size(self) -> str:
        """``DeiT-S`` for a 12-block ViT of 384 channels (``ViT-Adapter-S`` for the adapter), else
        ``a ViT of 192 channels and 4 blocks``."""
        name = VIT_SIZES.get(self.width or 0)
        if name and self.depth == 12:
            return name.replace("DeiT", "ViT-Adapter") if self.backbone == "ViT-Adapter" else name
        return f"{self.backbone} of {self.width} channels and {self.depth} blocks"

    @property
    def reducer(self) -> str:
        """'dense', or the reducer its tensors name (``SViT`` for gates, ...)."""
        if not self.reducer_parts:
            return "dense"
        names = sorted({REDUCER_PARTS.get(p, "") for p in self.reducer_parts} - {""})
        return "/".join(names) if names else "token-reducer"


def anatomy(shapes: Shapes) -> Anatomy:
    """:class:`Anatomy` of a state dict given as key -> shape."""
    keys = list(shapes)
    a = Anatomy(detector=any(k.startswith(("rpn_head.", "roi_head.", "bbox_head.", "neck.")) for k in keys))
    a.prefixed = any(k.startswith("backbone.") for k in keys)
    prefix = "backbone." if a.prefixed else ""
    has = lambda name: any(k.startswith(prefix + name) for k in keys)  # noqa: E731
    if has("interactions.") or has("spm.") or has("level_embed"):
        a.backbone = "ViT-Adapter"
    elif has("blocks.") and has("patch_embed."):
        a.backbone = "ViT"
    elif has("layer1.") or (has("conv1.") and has("bn1.")):
        a.backbone = "ResNet"
    elif has("stages.") and has("patch_embed."):
        a.backbone = "Swin"
    elif prefix:
        a.backbone = "another backbone"
    if a.backbone in ("ViT", "ViT-Adapter"):
        proj = shapes.get(prefix + "patch_embed.proj.weight")
        a.width = proj[0] if proj else None
        a.depth = _block_count(shapes, prefix + "blocks.")
    a.reducer_parts = tuple(
        sorted({k[len(REDUCER_PREFIX) :].split(".")[0] for k in keys if k.startswith(REDUCER_PREFIX)})
    )
    fc_cls = shapes.get("roi_head.bbox_head.fc_cls.weight")
    if fc_cls:
        a.num_classes = fc_cls[0] - 1
    return a


def _reducer_name(cfg: Config | None) -> str | None:
    reducer = ((cfg.get("model") or {}).get("backbone") or {}).get("reducer") if cfg is not None else None
    return reducer.get("type") if isinstance(reducer, dict) else None


def _untrained_parts(missing: list[str]) -> str:
    """'its gates are untrained' (the reducer's module lists), or the missing buffers by name."""
    rel = [k[len(REDUCER_PREFIX) :] for k in missing if k.startswith(REDUCER_PREFIX)]
    lists = sorted({k.split(".")[0] for k in rel if len(k.split(".")) > 1 and k.split(".")[1].isdigit()})
    if lists:
        return f"its {' and '.join(lists)} are untrained"
    return f"its {', '.join(sorted(rel))} are not in the file"


def _weights_only(f: Anatomy) -> bool:
    """A backbone's or classifier's weights, not a detector's."""
    return not f.detector and f.backbone not in (None, "another backbone")


def _same_backbone(f: Anatomy, m: Anatomy) -> bool:
    return f.backbone == m.backbone and (f.width, f.depth) == (m.width, m.depth)


def _backbone(a: Anatomy) -> str:
    """``DeiT-T backbone (192 channels, 12 blocks)`` or ``ViT backbone of 192 channels and 4 blocks``."""
    if a.named:
        return f"{a.size} backbone ({a.width} channels, {a.depth} blocks)"
    return f"{a.backbone} backbone of {a.width} channels and {a.depth} blocks"


def _kind(a: Anatomy) -> str:
    return a.size if a.backbone in ("ViT", "ViT-Adapter") else a.backbone


def headline(file: Shapes, model: Shapes, fit: Fit, cfg: Config | None = None) -> str:
    """What the file looks like compared with the model, e.g. ``a ResNet checkpoint for a ViT model``,
    ``DeiT-T weights for a DeiT-S model``, ``a dense checkpoint for an SViT model: its gates are untrained``.
    ``file``: the tensors of the file (for a file without a state dict where mmengine looks, those under
    ``'model'`` if any, see :func:`inner_shapes`)."""
    if not file:
        return "a file without model weights (it holds no state dict of tensors)"
    f, m = anatomy(file), anatomy(model)
    model_reducer = _reducer_name(cfg) or m.reducer
    if _weights_only(f) and m.detector:
        what = "backbone weights only" if f.prefixed else "ImageNet classification weights"
        if not _same_backbone(f, m):
            return f"{what} of a {_kind(f)} for a {_kind(m)} model, not a detector checkpoint"
        return f"{what} of a {_kind(f)}, not a detector checkpoint"
    if f.backbone and m.backbone and f.backbone != m.backbone:
        return f"a {f.backbone} checkpoint for a {m.backbone} model"
    if f.backbone in ("ViT", "ViT-Adapter") and not _same_backbone(f, m):
        if f.named and m.named:
            return f"{f.size} weights for a {m.size} model"
        return f"a checkpoint with a {_backbone(f)} for a model with a {_backbone(m)}"
    if is_new_reducer(fit, file):
        return f"a dense checkpoint for an {model_reducer} model: {_untrained_parts(fit.missing)}"
    gaps = fit.missing + fit.unexpected + [k for k, *_ in fit.mis_shaped]
    if all(k.startswith(REDUCER_PREFIX) for k in gaps):
        if not m.reducer_parts:
            return f"an {f.reducer} checkpoint (with a token reducer, {REDUCER_PREFIX}*) for a dense model"
        if f.reducer != m.reducer:
            return f"an {f.reducer} checkpoint for an {model_reducer} model"
        return f"a checkpoint of an {f.reducer} model with other reducer settings (e.g. other gated blocks)"
    if f.num_classes is not None and m.num_classes is not None and f.num_classes != m.num_classes:
        return f"a detector for {f.num_classes} classes for a model with {m.num_classes} classes"
    return "a checkpoint of another model"


def details(fit: Fit, n_model: int) -> str:
    """The numbers: missing, unexpected and mis-shaped tensors, with examples."""
    parts = []
    if fit.missing:
        parts.append(
            f"{len(fit.missing)} of the model's {n_model} tensors are not in the file ({summarize_keys(fit.missing)})"
        )
    if fit.unexpected:
        parts.append(
            f"{len(fit.unexpected)} tensors of the file are not in the model ({summarize_keys(fit.unexpected)})"
        )
    if fit.mis_shaped:
        examples = "; ".join(f"{k}: file {tuple(a)}, model {tuple(b)}" for k, a, b in fit.mis_shaped[:3])
        verb = "has" if len(fit.mis_shaped) == 1 else "have"
        parts.append(f"{len(fit.mis_shaped)} {verb} other shapes (e.g. {examples})")
    return "; ".join(parts)


def _fix(purpose: str, file: Shapes, model: Shapes, fit: Fit, path: str) -> str:
    partial = "To load only the tensors that fit (the others keep their initial values), pass --allow-partial-load"
    f, m = anatomy(file), anatomy(model)
    if _weights_only(f) and m.detector and _same_backbone(f, m):
        return (
            f"To start from them, set model.backbone.init_cfg=dict(type='Pretrained', checkpoint='{path}') "
            "(for training; no load_from)"
        )
    if purpose == "test":
        if is_new_reducer(fit, file):
            return (
                f"Fine-tune it first (tools/train.py CONFIG --cfg-options load_from={path}) and test that "
                f"checkpoint, or test this one with the dense config it was trained with. {partial}"
            )
        return f"Test it with the config it was trained with, or test a checkpoint of this config. {partial}"
    if purpose == "resume":
        return (
            "--resume continues a run of this config: resume with the config that wrote the checkpoint, or "
            f"start a new run of this one (without --resume, with load_from for a fine-tune). {partial}"
        )
    return (
        "Set load_from to a checkpoint of this model or of its dense version (a new token reducer is the one "
        f"accepted gap), or start from ImageNet weights with model.backbone.init_cfg and no load_from. {partial}"
    )


def check_checkpoint_fit(
    cfg: Config, path: str, purpose: str, allow_partial: bool = False, model: Shapes | None = None
) -> Fit:
    """Check that checkpoint ``path`` fits the model of ``cfg`` for ``purpose`` (module docstring); return the
    :class:`Fit`. ``model``: the model's shapes if already known (else built from ``cfg.model``).

    Raises:
        WeightsMismatchError: The checkpoint does not fit and ``allow_partial`` is False.
        UnsafeCheckpointError, IncompleteCheckpointError: From reading the file.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    ckpt = load_checkpoint_file(path, map_location="cpu", mmap=True)
    file, described = checkpoint_shapes(ckpt), None
    if not file:
        described = inner_shapes(ckpt)
    del ckpt
    gc.collect()
    model = model_shapes(cfg) if model is None else model
    fit = compare(file, model)
    if fit.exact:
        return fit
    if purpose == "load_from" and is_new_reducer(fit, file):
        reducer = _reducer_name(cfg) or anatomy(model).reducer
        print_log(
            f"load_from {path}: a dense checkpoint for this {reducer} model, as a fine-tune from a dense model "
            f"expects: the reducer's {len(fit.missing)} new tensors start from their initialisation "
            f"({summarize_keys(fit.missing)}); every other tensor is loaded",
            logger="current",
        )
        return fit
    what = f"it looks like {headline(described or file, model, fit, cfg)}"
    config = getattr(cfg, "filename", None) or "the config"
    if allow_partial:
        print_log(
            f"--allow-partial-load: loading {path} although it does not fit the model of {config} ({what}; "
            f"{details(fit, len(model))}); the model's tensors that are not loaded keep their initial values",
            logger="current",
            level=logging.WARNING,
        )
        return fit
    raise WeightsMismatchError(
        f"checkpoint {path} does not fit the model of {config}: {what}. {details(fit, len(model))}. "
        f"{_fix(purpose, described or file, model, fit, path)}"
    )


def covers_backbone(fit: Fit) -> bool:
    """Whether a loaded checkpoint sets every backbone tensor a pretrained ``init_cfg`` could (all but a new
    reducer's), so that reading the ImageNet weights first would change nothing."""
    gaps = fit.missing + [k for k, *_ in fit.mis_shaped]
    return not any(k.startswith("backbone.") and not k.startswith(REDUCER_PREFIX) for k in gaps)


def local_checkpoint(path: str | None) -> bool:
    """Whether ``path`` is a local file the fit check can read (not a URL)."""
    return bool(path) and "://" not in str(path) and os.path.isfile(str(path))
