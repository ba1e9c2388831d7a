"""Training speed (``tools/analysis_tools/train_speed.py``): one fine-tune iteration (forward, backward,
optimizer step) of MMDetection detectors built from configs, and of their backbones alone, timed side by side.

Every model is a config with optional ``--cfg-options``-style overrides (``LABEL=CONFIG:{"key": value}``), so
the same SViT config runs with ``train_compute='masked'`` (today's training) and ``'sparse'``
(:mod:`tokenprune.models.reducers.sparse_train`). All models start from the same weights: ``--checkpoint``
(loaded into each where the shapes fit) or the first model's random ones. Each model has its own optimizer,
built from its config's ``optim_wrapper`` (AdamW, gradient clipping), and its weights move as a fine-tune's do.

Per image size, per part (``backbone``: the ViT alone, loss = mean square of its map + the reducer's losses;
``detector``: ``model(..., mode='loss')``, the summed losses, ``optim_wrapper.update_params``), the models run
round-robin (the first one rotating) after warm-ups, on one preprocessed batch (random pixels with random box
and mask targets, or ``--dataset``: the first config's training images resized to the size); the table gives
the median time per iteration, the speed-ups against the first model and against ``--compare`` (default the
second), and the FLOP bound of training (:func:`backbone_train_macs`; for the whole detector plus three times
the first model's counted neck-and-head forward, the same head work for every model, :func:`head_work_note`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os.path as osp
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..benchmarking import Candidate, Timer, autocast, environment, finish_environment, time_round_robin
from ..benchmarking import speed_summary as _speed_summary
from ..models.flops import LayerMacCounter, block_macs, patch_embed_macs
from ..models.reducers.sparse_train import probe_counts

SVIT_SHAPES = "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"
SPARSE = '"model.backbone.reducer.train_compute": "sparse"'
DEFAULT_MODELS = (
    "dense=configs/dense/mask-rcnn_vit-t_simplefpn_finetune_shapes.py",
    f"svit-masked={SVIT_SHAPES}",
    f"svit-sparse={SVIT_SHAPES}:{{{SPARSE}}}",
    f'svit-sparse-p0.5={SVIT_SHAPES}:{{{SPARSE}, "model.backbone.reducer.probe": 0.5}}',
)
PARTS = ("backbone", "detector")


@dataclass
class TrainModel:
    """One model of the run: a config and its overrides, shown as ``label``."""

    label: str
    config: str
    options: dict = field(default_factory=dict)


def parse_model_spec(spec: str) -> TrainModel:
    """``[LABEL=]CONFIG[:{JSON overrides}]`` -> :class:`TrainModel`; the overrides are ``--cfg-options`` keys,
    e.g. ``svit-sparse=configs/svit/x.py:{"model.backbone.reducer.train_compute": "sparse"}``.

    Args:
        spec: The command-line text.
    """
    match = re.match(r"^(?:([\w.+-]+)=)?([^:{]+?)(?::(\{.*\}))?$", spec.strip(), re.DOTALL)
    if match is None:
        raise ValueError(f"model {spec!r}: expected [LABEL=]CONFIG[:{{JSON overrides}}]")
    label, config, options = match.groups()
    try:
        options = json.loads(options) if options else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"the overrides of model {spec!r} are not valid JSON: {e}") from e
    if not isinstance(options, dict):
        raise ValueError(f"the overrides of model {spec!r} must be a JSON object")
    return TrainModel(label or osp.splitext(osp.basename(config))[0], config, options)


def parse_models(specs: Sequence[str] | None) -> list[TrainModel]:
    """The models to time (default :data:`DEFAULT_MODELS`), labels unique."""
    models = [parse_model_spec(s) for s in (specs or DEFAULT_MODELS)]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels}: name them LABEL=CONFIG")
    return models


# ---------------------------------------------------------------------------------------------------------
# the training FLOPs of a ViT backbone


def query_macs(queries: Tensor | float, keys: Tensor | float, block: nn.Module) -> Tensor:
    """MACs of ``queries`` tokens through a block without their own keys and values: the q projection, the
    attention to ``keys`` keys, the output projection and the MLP (sparse training's pruned tokens).

    Args:
        queries: Query tokens, a number or a tensor of any shape.
        keys: Keys they attend to, a number or a tensor broadcastable to ``queries``.
        block: A :class:`tokenprune.models.vit.Block`.
    """
    attn, mlp = block.attn, block.mlp
    dim = attn.qkv.out_features // 3
    linear = dim * attn.qkv.in_features + attn.proj.in_features * attn.proj.out_features
    linear += sum(layer.in_features * layer.out_features for layer in (mlp.fc1, mlp.fc2))
    q = torch.as_tensor(queries, dtype=torch.float64)
    return q * linear + 2.0 * q * torch.as_tensor(keys, dtype=torch.float64) * dim


def backbone_train_macs(
    backbone: nn.Module, img_hw: tuple[int, int], keep_fractions: dict[int, Tensor], batch: int
) -> dict[str, float]:
    """MACs per image of one training iteration of a ViT backbone (forward and backward), from its gated
    blocks' kept fractions.

    Counted: the forward of every layer as :mod:`tokenprune.models.flops` counts it, and a backward of twice
    that (input and weight gradients) for what runs with autograd; the patch embedding's backward once (no
    input gradient); the gates' linear layers over all patch tokens (x3). Dense and masked training run every
    token through every block (x3). Sparse training (the reducer's ``train_compute='sparse'``) runs a gated
    block's kept tokens with autograd (x3) and its probed pruned tokens' forward only
    (:func:`query_macs`, attending to the kept ones). ``padded``: what a batch with different counts per image
    executes (every image at the batch's largest kept count; pruned tokens padding it run with autograd).

    Args:
        backbone: A :class:`tokenprune.models.ViT`.
        img_hw: Input size (H, W).
        keep_fractions: Gated block index -> (B,) kept fraction of each image's patch tokens (empty: dense).
        batch: Images B.

    Returns:
        ``{"macs": as run, "macs_padded": padded}``, means over the images.
    """
    reducer = backbone.reducer
    h, w = backbone.grid_size(img_hw)
    P, hw = backbone.num_prefix_tokens, h * w
    N = torch.full((batch,), float(P + hw), dtype=torch.float64)
    sparse = reducer is not None and getattr(reducer, "train_compute", "masked") == "sparse"
    probe = float(getattr(reducer, "probe", 1.0))
    run = torch.full((batch,), 2.0 * patch_embed_macs(backbone, img_hw), dtype=torch.float64)
    padded = run.clone()
    for i, block in enumerate(backbone.blocks):
        fractions = keep_fractions.get(i)
        if not sparse or fractions is None:
            run += 3 * block_macs(N, block)
            padded += 3 * block_macs(N, block)
            continue
        kept = (fractions.detach().double().cpu() * hw).round()
        probed = probe_counts((hw - kept).long(), probe).double()
        K = P + kept
        run += 3 * block_macs(K, block) + query_macs(probed, K, block)
        most, last = K.max(), (K + probed).max()
        padded += 3 * block_macs(most, block) + query_macs(last - most, most, block)
    gates = getattr(reducer, "gates", None)
    if gates is not None and len(gates) and keep_fractions:
        gate_macs = 3.0 * len(keep_fractions) * hw * gates[0].macs_per_token()
        run += gate_macs
        padded += gate_macs
    return {"macs": run.mean().item(), "macs_padded": padded.mean().item()}


def keep_fractions_of(backbone: nn.Module) -> dict[int, Tensor]:
    """Gated block -> (B,) kept fraction per image of the backbone's last forward, from its reducer's stats
    (``keep_rate_per_image.block{i}``); empty for a dense backbone."""
    stats = backbone.last_record.stats if hasattr(backbone, "last_record") else {}
    prefix = "keep_rate_per_image.block"
    return {int(k[len(prefix) :]): v.detach() for k, v in stats.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------
# models and data


def build_train_models(
    specs: Sequence[TrainModel], checkpoint: str | None, seed: int, device: torch.device
) -> tuple[dict[str, nn.Module], dict[str, object]]:
    """Label -> detector in train mode on ``device`` (same weights where shapes fit), label -> its config."""
    from tokenprune.mmdet_plugin.cli import load_config

    from .benchmarking import build_same_weight_detectors

    if checkpoint is not None and not osp.isfile(checkpoint):
        raise ValueError(f"--checkpoint not found: {checkpoint}")
    cfgs = {}
    for spec in specs:
        cfg = load_config(spec.config, spec.options or None)
        cfg.load_from = None
        cfgs[spec.label] = cfg
    models = build_same_weight_detectors(list(cfgs.values()), [checkpoint] * len(cfgs), seed)
    return {label: m.to(device).train() for label, m in zip(cfgs, models)}, cfgs


def random_train_batch(batch: int, hw: tuple[int, int], num_classes: int, seed: int, objects: int = 4) -> dict:
    """Random pixels with ``objects`` random boxes per image, each with a filled-rectangle mask and a random
    label: an unprocessed training batch (uint8 images, data samples with ``gt_instances``)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images, samples = [], []
    for _ in range(batch):
        images.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        size = torch.rand(objects, 2, generator=g) * 0.3 + 0.1  # 10-40% of the side
        corner = torch.rand(objects, 2, generator=g) * (1 - size)
        boxes = torch.cat([corner, corner + size], dim=1) * torch.tensor([w, h, w, h])
        masks = np.zeros((objects, h, w), dtype=np.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        meta = {"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False}
        sample = DetDataSample(metainfo=meta)
        sample.gt_instances = InstanceData(
            bboxes=boxes.float(),
            labels=torch.randint(0, num_classes, (objects,), generator=g),
            masks=BitmapMasks(masks, h, w),
        )
        samples.append(sample)
    return {"inputs": images, "data_samples": samples}


def dataset_train_batch(cfg, batch: int, hw: tuple[int, int]) -> dict:
    """The first full batch of ``cfg``'s training dataloader, its ``Resize`` steps set to ``hw``, unshuffled."""
    from mmengine.runner import Runner

    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    for step in loader_cfg.dataset.pipeline:
        if step.get("type") == "Resize":
            step["scale"] = (hw[1], hw[0])
    loader_cfg.update(batch_size=batch, num_workers=0, persistent_workers=False)
    loader_cfg["sampler"] = {"type": "DefaultSampler", "shuffle": False}
    loader_cfg.pop("batch_sampler", None)
    for data in Runner.build_dataloader(loader_cfg):
        if len(data["inputs"]) == batch:
            return data
    raise ValueError(f"the training dataloader gave no full batch of {batch} images")


def num_classes_of(cfg) -> int:
    head = cfg.model.get("roi_head", {}).get("bbox_head", {})
    return int(head.get("num_classes", 80)) if isinstance(head, dict) else 80


# ---------------------------------------------------------------------------------------------------------
# one training iteration


def build_optimizer(module: nn.Module, cfg):
    """The config's optim wrapper over ``module``'s parameters, counting iterations as a runner would."""
    from mmengine.logging import MMLogger
    from mmengine.optim import build_optim_wrapper

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # not one line per parameter group
    try:
        wrapper = build_optim_wrapper(module, copy.deepcopy(cfg.optim_wrapper))
    finally:
        logger.setLevel(level)
    wrapper.initialize_count_status(module, 0, 10**9)
    return wrapper


def backbone_step(backbone: nn.Module, wrapper, inputs: Tensor, ctx: Callable) -> Callable[[], None]:
    """One iteration of the backbone alone: loss = mean square of its output maps + the reducer's losses."""

    def run() -> None:
        with ctx():
            out = backbone(inputs)
            maps = out if isinstance(out, (tuple, list)) else (out,)
            loss = sum(m.float().square().mean() for m in maps)
            loss = loss + sum(backbone.last_record.aux_losses.values())
        wrapper.update_params(loss)

    return run


def detector_step(model: nn.Module, wrapper, data: dict, ctx: Callable) -> Callable[[], None]:
    """One iteration of the detector: its training losses (with the reducer's), summed, and the update."""

    def run() -> None:
        with ctx():
            losses = model(data["inputs"], data["data_samples"], mode="loss")
        loss, _ = model.parse_losses(losses)
        wrapper.update_params(loss)

    return run


def count_detector_rest(model: nn.Module, data: dict, ctx: Callable) -> float:
    """MACs per image of a training forward's layers outside the ViT blocks, patch embedding and reducer (the
    neck, the heads), from the shapes they saw; backbone kept fractions are read after it."""
    backbone = model.backbone
    exclude = [backbone.blocks, backbone.patch_embed] + ([backbone.reducer] if backbone.reducer else [])
    counter = LayerMacCounter(model, exclude=exclude)
    with torch.no_grad(), ctx(), counter:
        model(data["inputs"], data["data_samples"], mode="loss")
    return counter.total / data["inputs"].shape[0]


# ---------------------------------------------------------------------------------------------------------
# the run


def run_train_speed(args: argparse.Namespace) -> dict:
    """Time the models of ``args`` (see :func:`add_args`); print the tables; return the JSON dict."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        raise ValueError(f"--runs and --batch must be >= 1 and --warmup >= 0: {args.runs}, {args.batch}, {args.warmup}")
    if any(p not in PARTS for p in args.parts):
        raise ValueError(f"--parts must be among {PARTS}, got {args.parts}")
    specs = parse_models(args.models)
    compare = args.compare or (specs[1].label if len(specs) > 1 else specs[0].label)
    if compare not in [s.label for s in specs]:
        raise ValueError(f"--compare {compare!r} is not a model label: {[s.label for s in specs]}")
    models, cfgs = build_train_models(specs, args.checkpoint, args.seed, device)
    reference = specs[0].label
    ctx = lambda: autocast(device, args.amp)  # noqa: E731
    env = environment(device, args.amp)
    timer = Timer(device)
    results = []
    for size in args.sizes:
        hw = (size, size)
        first = cfgs[reference]
        if args.dataset:
            raw = dataset_train_batch(first, args.batch, hw)
        else:
            raw = random_train_batch(args.batch, hw, num_classes_of(first), args.seed)
        data = {}
        for label, model in models.items():
            with torch.no_grad():
                data[label] = model.data_preprocessor(copy.deepcopy(raw), True)
        input_hw = list(data[reference]["inputs"].shape[-2:])
        entry = {"size": size, "input_hw": input_hw, "batch": args.batch, "parts": {}}
        rest, fractions = {}, {}
        for label, model in models.items():  # one counted forward per model: heads' MACs, kept fractions
            rest[label] = count_detector_rest(model, data[label], ctx)
            fractions[label] = keep_fractions_of(model.backbone)
        for part in args.parts:
            candidates = []
            for label, model in models.items():
                if part == "backbone":
                    step = backbone_step(
                        model.backbone, build_optimizer(model.backbone, cfgs[label]), data[label]["inputs"], ctx
                    )
                else:
                    step = detector_step(model, build_optimizer(model, cfgs[label]), data[label], ctx)
                candidates.append(Candidate(label, lambda: None, step))
            times = time_round_robin(candidates, args.runs, args.warmup, timer)
            speed = _speed_summary(times, reference, 1, args.batch)
            versus = _speed_summary(times, compare, 1, args.batch)
            rows = {}
            for label, model in models.items():
                train = backbone_train_macs(model.backbone, tuple(input_hw), fractions[label], args.batch)
                if part == "detector":  # the reference's head work for all: see head_work_note
                    train = {k: v + 3.0 * rest[reference] for k, v in train.items()}
                rows[label] = {
                    **speed[label],
                    "speedup_vs_compare": versus[label]["speedup"],
                    "speedup_best_vs_compare": versus[label]["speedup_best"],
                    "train_macs": train["macs"],
                    "train_macs_padded": train["macs_padded"],
                    "keep_rate": {str(b): f.mean().item() for b, f in sorted(fractions[label].items())},
                    "head_macs_counted": rest[label],
                }
            ref_macs = rows[reference]["train_macs"]
            for r in rows.values():
                r["flop_bound"] = ref_macs / r["train_macs"]
                r["flop_bound_padded"] = ref_macs / r["train_macs_padded"]
                r["measured_over_bound"] = r["speedup"] / r["flop_bound_padded"]
            entry["parts"][part] = rows
            print_train_table(part, entry, rows, reference, compare, args)
            if part == "detector":
                entry["head_work_note"] = head_work_note(rest)
                if entry["head_work_note"]:
                    print(entry["head_work_note"])
        results.append(entry)
    finish_environment(env)
    return {
        "tool": "train_speed",
        "environment": env,
        "settings": {
            "models": [{"label": s.label, "config": s.config, "options": s.options} for s in specs],
            "reference": reference,
            "compare": compare,
            "sizes": args.sizes,
            "batch": args.batch,
            "parts": args.parts,
            "runs": args.runs,
            "warmup": args.warmup,
            "dataset": args.dataset,
            "checkpoint": args.checkpoint,
            "seed": args.seed,
        },
        "results": results,
    }


def head_work_note(rest: dict[str, float], tolerance: float = 0.05) -> str | None:
    """A note when the models' counted neck-and-head forward MACs per image differ by more than ``tolerance``
    (their RPNs proposed different boxes, so their RoI and mask heads sampled different positives): the
    detector's FLOP bound counts every model with the first one's head work, so it is the backbone's saving
    alone; the measured time includes the difference. None when they agree."""
    low, high = min(rest.values()), max(rest.values())
    if high <= 0 or (high - low) / high <= tolerance:
        return None
    parts = ", ".join(f"{label} {v / 1e9:.2f}" for label, v in rest.items())
    return (
        f"  note: the heads' training work differs between the models (forward GMACs per image: {parts}); the "
        "FLOP bound counts every model with the first one's heads, the times include the difference"
    )


def print_train_table(part: str, entry: dict, rows: dict, reference: str, compare: str, args) -> None:
    h, w = entry["input_hw"]
    print(
        f"\n{part}: one training iteration (forward, backward, optimizer step), batch {entry['batch']}, input "
        f"{h}x{w}, {torch.get_num_threads()} threads, {args.runs} runs after {args.warmup} warm-ups"
    )
    width = max(12, *(len(label) for label in rows))
    print(
        f"  {'model':<{width}} {'ms/iter median [q1-q3]':>26} {'vs ' + reference:>16} {'best':>6} "
        f"{'vs ' + compare:>16} {'best':>6} {'train GMACs/img':>15} {'FLOP bound':>10} {'padded':>7} "
        f"{'meas/bound':>10}"
    )
    for label, r in rows.items():
        lat = r["latency_ms"]
        ms = f"{lat['median']:.1f} [{lat['q1']:.1f}-{lat['q3']:.1f}]"
        print(
            f"  {label:<{width}} {ms:>26} {r['speedup']:15.2f}x {r['speedup_best']:5.2f}x "
            f"{r['speedup_vs_compare']:15.2f}x {r['speedup_best_vs_compare']:5.2f}x {r['train_macs'] / 1e9:15.2f} "
            f"{r['flop_bound']:9.2f}x {r['flop_bound_padded']:6.2f}x {r['measured_over_bound']:10.2f}"
        )
    for label, r in rows.items():
        if r["keep_rate"]:
            rates = " ".join(f"{v:.2f}" for v in r["keep_rate"].values())
            print(f"  {label:<{width}} training keep rate per gated block ({', '.join(r['keep_rate'])}): {rates}")


def add_args(parser: argparse.ArgumentParser) -> None:
    """The command line of ``tools/analysis_tools/train_speed.py``."""
    parser.add_argument(
        "models",
        nargs="*",
        help="[LABEL=]CONFIG[:{JSON cfg-options}], the reference first (speed-ups are against it). Default: "
        + " ".join(f"'{m}'" for m in DEFAULT_MODELS),
    )
    parser.add_argument("--compare", help="the second reference of the speed-ups (default: the second model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square input sizes (256 512)")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration (default 4, the fine-tune's)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="backbone and/or detector (default both)")
    parser.add_argument("--dataset", action="store_true", help="the first config's training images, resized")
    parser.add_argument("--checkpoint", help="weights for every model (where shapes fit), e.g. a trained SViT")
    parser.add_argument("--runs", type=int, default=10, help="timed repeats (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, reported either way)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--amp", choices=["fp16", "bf16"], help="autocast to this dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, inputs and targets")
    parser.add_argument("--json-out", help="write the results to this JSON file")
