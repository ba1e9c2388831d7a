"""Measured speed of token reduction, torch + timm only: the pieces ``tools/analysis_tools/benchmark.py``,
``get_flops.py``, ``svit_gate_cost.py`` and ``gpu_benchmark.py`` share.

- Models: ``--reducer`` specs (:class:`ModelSpec`: dense, a registered reducer by name with JSON settings, or
  ``all``: every reducer that runs the backbone, :data:`ALL_SETTINGS`), one :class:`tokenprune.models.ViT` whose
  reducers are swapped in and out: a DeiT shape (:data:`ARCHS`, global attention) or ViTDet's windowed ViT
  (:data:`WINDOWED_ARCHS`, built by :func:`tokenprune.models.vit.vitdet_base`).
- Timing: :class:`Timer` (CUDA events on a GPU, ``perf_counter`` on a CPU), :func:`time_round_robin` (every
  model once per repeat, the first one rotating, so load from other processes hits all alike),
  :func:`speed_summary` (latency quartiles, images/s, three speed-ups) and :func:`flop_summary` (MACs from the
  realised token counts, the FLOP-bound speed-up).
- The backbone mode end to end (:func:`run_backbone`), its table, and the command-line pieces every tool uses
  (:func:`add_backbone_model_args`, :func:`add_common_args`, :func:`run_cli`).

The detector mode, which needs MMDetection, is :mod:`tokenprune.mmdet_plugin.benchmarking`.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TokenPruneError
from .models import ViT, load_timm_vit
from .models.convert import unwrap_state_dict
from .models.convert_vitdet import load_vitdet_vit, read_weights
from .models.flops import BackboneMacs, backbone_macs
from .models.reducers import REDUCERS, TokenReducer, build_reducer
from .models.vit import VITDET_B, vitdet_base

# embed_dim, heads; 12 blocks each. ARCHS: DeiT's global attention in every block (class token optional);
# WINDOWED_ARCHS: ViTDet's backbone at these widths (vitdet_base: 14 x 14 windows, global blocks 2, 5, 8, 11,
# decomposed relative positions, absolute positions from the 224 grid, no class token); vitdet-t for tests
ARCHS = {"deit-t": (192, 3), "deit-s": (384, 6), "deit-b": (768, 12)}
WINDOWED_ARCHS = {"vitdet-t": (192, 3), "vitdet-s": (384, 6), "vitdet-b": (768, 12)}
BACKBONE_ARCHS = {**ARCHS, **WINDOWED_ARCHS}
# the settings ``--reducer all`` gives a reducer where they differ from its defaults: the learned-gate reducers
# at their fixed budget (the keep schedule, whatever thresholds a checkpoint holds; uncalibrated thresholds fall
# back to it anyway), and on a backbone without a class token the CLS-free scores of the attention-scored ones
ALL_SETTINGS = {"SViT": {"inference": "fixed"}, "TPC": {"inference": "fixed"}}
CLS_FREE_SETTINGS = {"EViT": {"score": "mean_attention"}, "PPT": {"importance": "mean"}, "BAT": {"importance": "mean"}}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DENSE_NAMES = ("none", "dense")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# ---------------------------------------------------------------------------------------------------------
# reducers given on the command line


@dataclass
class ModelSpec:
    """One model of a backbone benchmark: the dense ViT (``reducer`` None) or a reducer with settings."""

    label: str
    reducer: str | None = None
    kwargs: dict = field(default_factory=dict)
    from_all: bool = False  # given as ``all``: skipped, with the reason, if it cannot run this backbone


def parse_reducer_spec(spec: str) -> ModelSpec:
    """``none`` / ``dense``, ``NAME`` (defaults) or ``NAME:{JSON settings}``, optionally prefixed by
    ``LABEL=`` (the name in the output); NAME as in REDUCERS, any case."""
    match = re.match(r"^([\w.+-]+)=(.*)$", spec, re.DOTALL)
    label, body = (match.group(1), match.group(2)) if match else (None, spec)
    name, _, settings = body.partition(":")
    name = name.strip()
    if name.lower() in DENSE_NAMES:
        if settings or label not in (None, "dense"):
            raise ValueError(f"the dense model takes no settings and is labelled 'dense': {spec!r}")
        return ModelSpec("dense")
    by_lower = {key.lower(): key for key in REDUCERS}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown reducer {name!r} in --reducer {spec!r}; available: none, {', '.join(REDUCERS)}")
    try:
        kwargs = json.loads(settings) if settings else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"the settings of --reducer {spec!r} are not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f'the settings of --reducer {spec!r} must be a JSON object, e.g. NAME:{{"key": 1}}')
    key = by_lower[name.lower()]
    if label is None:
        label = key + (json.dumps(kwargs, separators=(",", ":")) if kwargs else "")
    return ModelSpec(label, key, kwargs)


def parse_model_specs(specs: Sequence[str]) -> list[ModelSpec]:
    """The models to time, dense first (added if not given); ``all`` stands for every registered reducer,
    labelled by its name, with its defaults updated by :data:`ALL_SETTINGS` (see :func:`settle_all_specs` for
    the backbone-dependent ones); a reducer also given by name is taken as given."""
    out: list[ModelSpec] = []
    for spec in specs:
        if spec.strip().lower() == "all":
            out.extend(ModelSpec(name, name, dict(ALL_SETTINGS.get(name, {})), from_all=True) for name in REDUCERS)
        else:
            out.append(parse_reducer_spec(spec))
    dense = [s for s in out if s.reducer is None]
    if len(dense) > 1:
        raise ValueError("the dense model is given twice in --reducer")
    given = {s.label for s in out if not s.from_all}
    out = [ModelSpec("dense")] + [s for s in out if s.reducer is not None and not (s.from_all and s.label in given)]
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a model is given twice in --reducer: {labels}")
    return out


def settle_all_specs(specs: Sequence[ModelSpec], backbone: ViT) -> list[ModelSpec]:
    """The specs with those from ``all`` fitted to ``backbone``: without a class token the attention-scored
    reducers score without it (:data:`CLS_FREE_SETTINGS`).

    Args:
        specs: The parsed ``--reducer`` specs (:func:`parse_model_specs`).
        backbone: The backbone they will run.
    """
    if backbone.num_prefix_tokens:
        return list(specs)
    return [
        ModelSpec(s.label, s.reducer, {**s.kwargs, **CLS_FREE_SETTINGS.get(s.reducer, {})}, s.from_all)
        if s.from_all
        else s
        for s in specs
    ]


def make_reducer(spec: ModelSpec, embed_dim: int) -> TokenReducer | None:
    if spec.reducer is None:
        return None
    return build_reducer({"type": spec.reducer, **spec.kwargs}, embed_dim)


# ---------------------------------------------------------------------------------------------------------
# timing


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """median, quartiles q1 / q3, min, max and mean of ``values``."""
    v = sorted(values)
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {
        "median": statistics.median(v),
        "q1": q1,
        "q3": q3,
        "min": v[0],
        "max": v[-1],
        "mean": statistics.fmean(v),
    }


class Timer:
    """Seconds of one call of ``fn``: CUDA events after a synchronize on a GPU, ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


@dataclass
class Candidate:
    """A timed model: ``prepare()`` (untimed, e.g. attach its reducer) then ``run()`` (timed)."""

    label: str
    prepare: Callable[[], None]
    run: Callable[[], None]


def time_round_robin(candidates: Sequence[Candidate], runs: int, warmup: int, timer: Timer) -> dict[str, list]:
    """``warmup`` + ``runs`` repeats, each running every candidate once, the starting one rotating.
    Returns each label's seconds of the ``runs`` timed repeats, in repeat order."""
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    for i in range(warmup + runs):
        for j in range(len(candidates)):
            c = candidates[(i + j) % len(candidates)]
            c.prepare()
            seconds = timer(c.run)
            if i >= warmup:
                times[c.label].append(seconds)
    return times


def speed_summary(times: dict[str, list[float]], reference: str, batches: int, batch: int) -> dict[str, dict]:
    """Per label: latency per batch (ms), images/s and speed-up against ``reference``: the ratio of the
    medians (``speedup``), the spread of the per-repeat ratios (``speedup_paired``), and the ratio of the
    fastest runs (``speedup_best``, robust to load from other processes, which only ever adds time)."""
    out = {}
    ref = times[reference]
    for label, seconds in times.items():
        per_batch = [s / batches * 1e3 for s in seconds]
        paired = percentiles([r / s for r, s in zip(ref, seconds)])
        out[label] = {
            "latency_ms": percentiles(per_batch),
            "images_per_s": batch * batches / statistics.median(seconds),
            "speedup": statistics.median(ref) / statistics.median(seconds),
            "speedup_best": min(ref) / min(seconds),
            "speedup_paired": {k: paired[k] for k in ("median", "q1", "q3", "min", "max")},
        }
    return out


def flop_summary(
    macs: dict[str, BackboneMacs],
    reference: str,
    padded: dict[str, BackboneMacs] | None = None,
    rest: dict[str, float] | None = None,
    backbone_other: dict[str, float] | None = None,
) -> dict[str, dict]:
    """Per label: backbone MACs per image (total, per block), tokens and keep rates per block, and the
    FLOP-bound speed-up (reference MACs / these MACs); with ``padded`` (the counts a padded batch executes)
    also ``flop_bound_padded``; with ``rest`` (MACs per image of the detector's other parts) the detector's;
    ``backbone_other`` (MACs per image of backbone layers outside the ViT blocks, e.g. ViT-Adapter's) is
    added to the backbone's."""
    out = {}
    other = backbone_other or {}
    ref_total = macs[reference].total.mean().item() + other.get(reference, 0.0)
    for label, m in macs.items():
        s = m.summary()
        extra = other.get(label, 0.0)
        s["total"] += extra
        entry = {
            "backbone_macs": s["total"],
            "backbone_macs_min": s["total_min"] + extra,
            "backbone_macs_max": s["total_max"] + extra,
            "patch_embed_macs": s["patch_embed"],
            "reducer_macs": s["reducer"],
            "block_macs": s["blocks"],
            "tokens": s["tokens"],
            "num_tokens": s["num_tokens"],
            "keep_rate": s["keep_rate"],
            "flop_bound": ref_total / s["total"],
        }
        if backbone_other is not None:
            entry["backbone_other_macs"] = extra
        if padded is not None:
            entry["flop_bound_padded"] = ref_total / (padded[label].total.mean().item() + extra)
        if rest is not None:
            entry["rest_macs"] = rest[label]
            entry["detector_macs"] = s["total"] + rest[label]
            entry["detector_flop_bound"] = (ref_total + rest[reference]) / entry["detector_macs"]
        out[label] = entry
    return out


# ---------------------------------------------------------------------------------------------------------
# environment


def setup_device(args: argparse.Namespace) -> torch.device:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if getattr(args, "runs", 1) < 1 or getattr(args, "warmup", 0) < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {args.batch}")
    return device


def autocast(device: torch.device, amp: str | None):
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, amp: str | None) -> dict:
    import timm

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "amp": amp,
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


def finish_environment(env: dict) -> None:
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())


# ---------------------------------------------------------------------------------------------------------
# backbone mode (torch + timm only)


def build_backbone(args: argparse.Namespace) -> ViT:
    """The shared backbone of ``--arch`` with random weights (seeded): a DeiT shape, or ViTDet's windowed ViT
    (:func:`tokenprune.models.vit.vitdet_base` at the arch's width; with ``--depth`` below 12 the global blocks
    of the 12 that remain).

    Args:
        args: The command line: ``arch``, ``depth``, ``img_size``, ``cls_token``, ``seed``.
    """
    if args.arch not in BACKBONE_ARCHS:
        raise ValueError(f"unknown --arch {args.arch!r}; choose from {', '.join(BACKBONE_ARCHS)}")
    embed_dim, heads = BACKBONE_ARCHS[args.arch]
    torch.manual_seed(args.seed)
    if args.arch in ARCHS:
        return ViT(
            img_size=args.img_size, embed_dim=embed_dim, depth=args.depth, num_heads=heads, cls_token=args.cls_token
        )
    if args.cls_token:
        raise ValueError(f"--cls-token: {args.arch} is ViTDet's windowed backbone, which has no class token")
    global_blocks = tuple(i for i in VITDET_B["global_block_indexes"] if i < args.depth)
    return vitdet_base(
        img_size=args.img_size,
        embed_dim=embed_dim,
        depth=args.depth,
        num_heads=heads,
        global_block_indexes=global_blocks,
    )


def build_reducers(
    specs: Sequence[ModelSpec], backbone: ViT, seed: int, probe: Tensor
) -> tuple[dict[str, TokenReducer | None], dict[str, str]]:
    """Label -> reducer (None for dense), each checked by one inference forward of ``probe`` on ``backbone``.
    A reducer that cannot run this backbone (refused by :meth:`ViT.set_reducer`, e.g. one that cannot drive
    windowed blocks, or failing on the probe) stops the tool with its message, unless it came from ``all``:
    then it is skipped, and the returned label -> reason says why.

    Args:
        specs: The models, dense included.
        backbone: The shared backbone, on the CPU.
        seed: Reducer ``k`` is initialised after ``torch.manual_seed(seed + 1 + k)``.
        probe: Images (1, 3, H, W) of the benchmark's size.
    """
    out, skipped = {}, {}
    for k, spec in enumerate(specs):
        torch.manual_seed(seed + 1 + k)
        try:
            reducer = make_reducer(spec, backbone.embed_dim)
            if reducer is not None:
                backbone.set_reducer(reducer.eval())
                with torch.inference_mode():
                    backbone.eval()(probe)
        except (ValueError, TokenPruneError) as e:
            if not spec.from_all:
                raise ValueError(f"{spec.label}: {e}") from e
            skipped[spec.label] = str(e)
            print(f"skipped {spec.label} (from 'all'): {e}")
            continue
        finally:
            backbone.set_reducer(None)
        out[spec.label] = reducer
    return out, skipped


def load_backbone_checkpoint(backbone: ViT, reducers: dict[str, TokenReducer | None], path: str) -> list[str]:
    """Weights for the shared backbone (a DeiT shape: timm/DeiT file or a detector checkpoint's ``backbone.*``;
    a windowed one: MAE pre-training, detectron2 ``.pkl`` / ``.pth`` or MMDetection ViTDet, through
    :func:`tokenprune.models.convert_vitdet.load_vitdet_vit`) and, for each reducer whose parameters and
    buffers the file holds (``reducer.*``), those. Returns report lines."""
    if not osp.isfile(path):
        raise ValueError(f"--checkpoint not found: {path}")
    windowed = bool(backbone.window_block_indexes)
    try:
        raw = read_weights(path) if windowed else torch.load(path, map_location="cpu", weights_only=True)
    except TokenPruneError:
        raise  # e.g. a .pkl that pickles other objects than arrays
    except Exception as e:  # the weights-only unpickler raises several types
        raise ValueError(
            f"--checkpoint {path} could not be read with torch.load(weights_only=True): {e}. An MMEngine "
            "checkpoint needs mmengine installed (importing tokenprune allow-lists its contents); elsewhere, "
            "save its state_dict alone with torch.save first"
        ) from e
    if windowed:
        loaded = load_vitdet_vit(backbone, raw)
        sd = {k[len("backbone.") :] if k.startswith("backbone.") else k: v for k, v in raw.items()}
    else:
        sd = unwrap_state_dict(raw)
        loaded = load_timm_vit(backbone, sd)
    report = [f"backbone weights from {path}: {loaded}".splitlines()[0]]
    for label, reducer in reducers.items():
        if reducer is None:
            continue
        own = reducer.state_dict()
        theirs = {k: sd.get(f"reducer.{k}") for k in own}
        if own and all(v is not None and v.shape == own[k].shape for k, v in theirs.items()):
            reducer.load_state_dict(theirs)
            report.append(f"{label}: {len(own)} reducer tensors from the checkpoint")
        else:
            report.append(f"{label}: the checkpoint holds no weights of this reducer, initial ones kept")
    return report


def find_images(paths: Sequence[str]) -> list[str]:
    files = []
    for p in paths:
        if osp.isdir(p):
            files.extend(sorted(osp.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_SUFFIXES)))
        elif osp.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"--images: no such file or folder: {p}")
    if not files:
        raise ValueError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {list(paths)}")
    return files


def load_image(path: str, size: tuple[int, int]) -> Tensor:
    """An RGB image file -> (3, H, W) ImageNet-normalised, resized to fit ``size`` keeping its aspect ratio and
    zero-padded (the mean colour) at the right and bottom."""
    from torchvision.io import ImageReadMode, read_image

    img = read_image(path, mode=ImageReadMode.RGB).float() / 255.0
    scale = min(size[0] / img.shape[1], size[1] / img.shape[2])
    hw = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[2] * scale)))
    img = F.interpolate(img[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    img = (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return F.pad(img, (0, size[1] - hw[1], 0, size[0] - hw[0]))


def backbone_batches(args: argparse.Namespace, batch: int, device: torch.device) -> list[Tensor]:
    """The input batches of one run: one batch of random pixels, or the ``--images`` in batches."""
    size = tuple(args.size)
    if not args.images:
        g = torch.Generator().manual_seed(args.seed)
        return [torch.randn(batch, 3, *size, generator=g).to(device)]
    files = find_images(args.images)[: args.num_images]
    if len(files) < batch:
        raise ValueError(f"--images gives {len(files)} images, fewer than the batch size {batch}")
    images = torch.stack([load_image(f, size) for f in files[: len(files) // batch * batch]])
    return [b.to(device) for b in images.split(batch)]


def count_backbone(backbone: ViT, batches: Sequence[Tensor], ctx) -> tuple[BackboneMacs, BackboneMacs, dict]:
    """One forward of every batch with token recording: MACs per image from the realised tokens, the same
    with every image costing its batch's largest count (what a padded batch executes), and the reducer's
    scalar stats (mean over batches)."""
    parts, padded, stats = [], [], {}
    backbone.record_tokens = True
    try:
        with torch.inference_mode(), ctx():
            for x in batches:
                backbone(x)
                parts.append(backbone_macs(backbone, tuple(x.shape[-2:])))
                padded.append(backbone_macs(backbone, tuple(x.shape[-2:]), padded=True))
                if backbone.reducer is None:
                    continue
                for k, v in backbone.last_record.stats.items():
                    if not isinstance(v, Tensor) or v.dim() == 0:
                        stats.setdefault(k, []).append(float(v))
    finally:
        backbone.record_tokens = False
    return BackboneMacs.cat(parts), BackboneMacs.cat(padded), {k: statistics.fmean(v) for k, v in stats.items()}


@dataclass
class BackboneModels:
    """What a backbone-mode tool runs: the shared backbone and the reducers of ``--reducer``, in eval mode on the
    device.

    Attributes:
        backbone: The ViT every model runs (its reducer swapped in and out).
        reducers: Label -> reducer, None for dense (first).
        specs: The specs of the models in ``reducers``, in order.
        skipped: Label -> why, for the reducers of ``all`` that cannot run this backbone.
        notes: Lines for the output: the checkpoint report.
    """

    backbone: ViT
    reducers: dict[str, TokenReducer | None]
    specs: list[ModelSpec]
    skipped: dict[str, str]
    notes: list[str]

    def models_json(self) -> list[dict]:
        """The models run, for the JSON output."""
        return [{"label": s.label, "reducer": s.reducer, "settings": s.kwargs} for s in self.specs]

    def skipped_json(self) -> list[dict]:
        """The reducers of ``all`` left out, with the reason, for the JSON output."""
        return [{"label": label, "reason": reason} for label, reason in self.skipped.items()]


def setup_backbone_models(args: argparse.Namespace, device: torch.device) -> BackboneModels:
    """The shared backbone of ``--arch`` and the reducers of ``--reducer`` (those of ``all`` that cannot run it
    skipped, with the reason), in eval mode on ``device``, with the checkpoint loaded if given.

    Args:
        args: The command line of :func:`add_backbone_model_args` (``size`` is normalised to [H, W] in place).
        device: Where the models run.
    """
    if len(args.size) not in (1, 2):
        raise ValueError(f"--size takes H W (or one S for S x S), got {args.size}")
    args.size = [args.size[0], args.size[-1]]
    specs = parse_model_specs(args.reducer)
    backbone = build_backbone(args)
    specs = settle_all_specs(specs, backbone)
    probe = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))
    reducers, skipped = build_reducers(specs, backbone, args.seed, probe)
    specs = [s for s in specs if s.label in reducers]
    notes = []
    if args.checkpoint:
        notes = load_backbone_checkpoint(backbone, reducers, args.checkpoint)
        print("\n".join(notes))
    backbone.to(device).eval()
    for r in reducers.values():
        if r is not None:
            r.to(device).eval()
    settings = [f"{s.label} = {s.reducer}{json.dumps(s.kwargs) if s.kwargs else ''}" for s in specs if s.from_all]
    if settings:
        print("from 'all': " + ", ".join(settings))
    return BackboneModels(backbone, reducers, specs, skipped, notes)


def backbone_settings(args: argparse.Namespace, backbone: ViT) -> dict:
    return {
        "arch": args.arch,
        "embed_dim": backbone.embed_dim,
        "depth": backbone.depth,
        "num_heads": backbone.num_heads,
        "cls_token": args.cls_token,
        "window_size": backbone.window_size,
        "windowed_blocks": list(backbone.window_block_indexes),
        "use_rel_pos": backbone.use_rel_pos,
        "size": args.size,
        "images": find_images(args.images)[: args.num_images] if args.images else None,
        "batch": args.batch,
        "seed": args.seed,
        "checkpoint": args.checkpoint,
    }


def run_backbone(args: argparse.Namespace) -> dict:
    device = setup_device(args)
    setup = setup_backbone_models(args, device)
    backbone, reducers = setup.backbone, setup.reducers
    ctx = lambda: autocast(device, args.amp)  # noqa: E731
    env = environment(device, args.amp)
    timer = Timer(device)
    results = []
    for batch in args.batch:
        batches = backbone_batches(args, batch, device)

        def candidate(label: str, reducer: TokenReducer | None, batches=batches) -> Candidate:
            def run():
                with torch.inference_mode(), ctx():
                    for x in batches:
                        backbone(x)

            return Candidate(label, lambda: backbone.set_reducer(reducer), run)

        candidates = [candidate(label, r) for label, r in reducers.items()]
        times = time_round_robin(candidates, args.runs, args.warmup, timer)
        speed = speed_summary(times, "dense", len(batches), batch)
        macs, padded, stats = {}, {}, {}
        for label, reducer in reducers.items():
            backbone.set_reducer(reducer)
            macs[label], padded[label], stats[label] = count_backbone(backbone, batches, ctx)
        flops = flop_summary(macs, "dense", padded)
        models = {}
        for label in reducers:
            entry = {**speed[label], **flops[label], "stats": stats[label]}
            entry["measured_over_bound"] = entry["speedup"] / entry["flop_bound"]
            models[label] = entry
        hw = list(batches[0].shape[-2:])
        results.append({"batch": batch, "num_batches": len(batches), "input_hw": hw, "models": models})
        print_backbone_table(results[-1], args, setup.skipped)
    backbone.set_reducer(None)
    finish_environment(env)
    return {
        "tool": "benchmark",
        "mode": "backbone",
        "environment": env,
        "settings": {**backbone_settings(args, backbone), "runs": args.runs, "warmup": args.warmup},
        "models": setup.models_json(),
        "skipped": setup.skipped_json(),
        "results": results,
        "notes": setup.notes,
    }


# ---------------------------------------------------------------------------------------------------------
# printing


def print_speed_rows(title: str, rows: dict[str, dict]) -> None:
    """One line per model; ``rows`` hold latency_ms, images_per_s, speedup, speedup_paired, speedup_best,
    macs, flop_bound and measured_over_bound (of the median speed-up)."""
    width = max(12, *(len(label) for label in rows))
    print(title)
    print(
        f"  {'model':<{width}} {'ms/batch median [q1-q3]':>28} {'img/s':>8} {'speed-up [paired q1-q3]':>24} "
        f"{'best':>6} {'GMACs/img':>10} {'FLOP bound':>10} {'meas/bound':>10}"
    )
    for label, r in rows.items():
        lat, paired = r["latency_ms"], r["speedup_paired"]
        ms = f"{lat['median']:.1f} [{lat['q1']:.1f}-{lat['q3']:.1f}]"
        speedup = f"{r['speedup']:.2f}x [{paired['q1']:.2f}-{paired['q3']:.2f}]"
        print(
            f"  {label:<{width}} {ms:>28} {r['images_per_s']:8.2f} {speedup:>24} {r['speedup_best']:5.2f}x "
            f"{r['macs'] / 1e9:10.2f} "
            f"{r['flop_bound']:9.2f}x {r['measured_over_bound']:10.2f}"
        )


def print_keep_rates(models: dict) -> None:
    width = max(12, *(len(label) for label in models))
    print("  keep rate per block (tokens run / all tokens, mean over images):")
    for label, m in models.items():
        print(f"  {label:<{width}} " + " ".join(f"{r:.2f}" for r in m["keep_rate"]))


def print_skipped(skipped: dict[str, str]) -> None:
    """The reducers of ``all`` left out (their reasons are printed when they are built, and are in the JSON).

    Args:
        skipped: Label -> reason.
    """
    if skipped:
        print(f"  skipped (cannot run this backbone; why: above and in the JSON): {', '.join(skipped)}")


def print_backbone_table(result: dict, args: argparse.Namespace, skipped: dict[str, str] | None = None) -> None:
    """The speed, MACs and keep rates of one batch size.

    Args:
        result: One entry of the run's ``results``.
        args: The command line (``runs``, ``warmup``).
        skipped: The reducers of ``all`` left out, label -> reason.
    """
    h, w = result["input_hw"]
    print(
        f"\nbatch {result['batch']} x {result['num_batches']} batch(es), input {h}x{w}, {torch.get_num_threads()} "
        f"threads, {args.runs} runs after {args.warmup} warm-ups"
    )
    rows = {label: {**m, "macs": m["backbone_macs"]} for label, m in result["models"].items()}
    print_speed_rows("  backbone:", rows)
    print_keep_rates(result["models"])
    print_skipped(skipped or {})


# ---------------------------------------------------------------------------------------------------------
# command line pieces every tool shares


def add_backbone_model_args(parser: argparse.ArgumentParser) -> None:
    """The backbone and its inputs (shared with get_flops.py)."""
    parser.add_argument(
        "--arch",
        default="deit-s",
        help=f"backbone: {', '.join(ARCHS)} (global attention) or {', '.join(WINDOWED_ARCHS)} (ViTDet's windowed "
        "ViT: 14 x 14 windows, global blocks 2, 5, 8, 11, relative positions, no class token); default deit-s",
    )
    parser.add_argument("--depth", type=int, default=12, help="blocks (default 12; fewer only for quick tests)")
    parser.add_argument("--img-size", type=int, default=224, help="pre-training size of the position embeddings")
    parser.add_argument("--cls-token", action="store_true", help="run a class token through the blocks")
    parser.add_argument("--size", type=int, nargs="+", default=[512, 512], help="input H W (default 512 512)")
    parser.add_argument(
        "--reducer",
        nargs="+",
        default=["none", "all"],
        help="models: none (dense, always included), NAME, NAME:'{\"key\": value}' (JSON settings), each "
        "optionally LABEL=..., or all (every reducer that can run the backbone, with its defaults but SViT and TPC "
        "at their fixed budget and, without a class token, EViT, PPT and BAT with CLS-free scores; the others are "
        f"listed as skipped, with the reason). Registered: {', '.join(REDUCERS)}. Default: none all",
    )
    parser.add_argument("--checkpoint", help="a timm/DeiT file or a detector checkpoint (backbone.*, reducer.*)")
    parser.add_argument("--images", nargs="+", help="real images (files or folders) instead of random pixels")
    parser.add_argument("--num-images", type=int, default=16, help="with --images: at most this many (default 16)")


def add_detector_model_args(parser: argparse.ArgumentParser) -> None:
    """The detectors and their inputs (shared with get_flops.py)."""
    parser.add_argument("configs", nargs="+", help="config files: the dense model first, then the pruned ones")
    parser.add_argument("--checkpoints", nargs="+", help="one per config, or 'none' (random weights)")
    parser.add_argument("--size", type=int, nargs="+", help="input H W of random pixels")
    parser.add_argument("--dataset", action="store_true", help="the first config's test images instead")
    parser.add_argument("--num-images", type=int, default=8, help="with --dataset: images per run (default 8)")
    parser.add_argument("--cfg-options", nargs="+", default=None, help="key=value overrides for every config")
    parser.add_argument(
        "--head-work",
        default="auto",
        choices=["auto", "fixed", "configured"],
        help="fixed: every model's RPN and RoI heads process the same number of proposals and detections "
        "(NMS off, score threshold 0), so whole-detector times compare backbones doing the same head work; "
        "configured: the configs' test_cfg (trained checkpoints); auto (default): fixed unless every model "
        "has a checkpoint",
    )


def add_common_args(parser: argparse.ArgumentParser, timing: bool = True) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (benchmark: 1 4)")
    if timing:
        parser.add_argument("--runs", type=int, default=10, help="timed repeats (default 10)")
        parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, reported either way)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--amp", choices=["fp16", "bf16"], help="autocast to this dtype (GPU; bf16 also on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    parser.add_argument("--json-out", help="write the results to this JSON file")


def parse_cfg_options(options: Sequence[str] | None) -> dict | None:
    if not options:
        return None
    from mmengine.config import DictAction

    ns = argparse.Namespace()
    DictAction(option_strings=[], dest="cfg")(None, ns, list(options))
    return ns.cfg


def run_cli(run: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """``run(args)``; a bad argument or config ends the program with its message and exit code 2
    (``TOKENPRUNE_TRACEBACK=1`` shows the traceback); the result goes to ``--json-out``."""
    try:
        if getattr(args, "cfg_options", None) is not None:
            args.cfg_options = parse_cfg_options(args.cfg_options)
        out = run(args)
    except (ValueError, TokenPruneError) as e:
        if os.environ.get("TOKENPRUNE_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json_out:
        os.makedirs(osp.dirname(osp.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nresults written to {args.json_out}")
    return out
