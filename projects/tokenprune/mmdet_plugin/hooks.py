"""Hooks for token-reducing backbones: keep rates logged in training and summarised over val/test with the
inference rule each block used, and the calibration of SViT's (and TPC's) inference thresholds at the end of
training (:func:`calibrate_thresholds`, which ``tools/analysis_tools/recalibrate.py`` also uses)."""

from __future__ import annotations

import json
import os.path as osp
from collections import defaultdict

import torch
from mmdet.registry import HOOKS
from mmengine.dataset import pseudo_collate
from mmengine.dist import all_gather_object, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ..analysis import keep_rates
from ..models.flops import dense_backbone_macs, macs_from_counts, window_token_counts
from ..models.record import ReductionRecord

PER_IMAGE = "keep_rate_per_image.block"
RULE = "inference_rule/block"
RECALIBRATE = "tools/analysis_tools/recalibrate.py CONFIG CHECKPOINT OUT.pth"


def unwrap(model):
    return model.module if is_model_wrapper(model) else model


def threshold_reducer(model):
    """The backbone's reducer if it has calibrated inference thresholds (SViT, TPC), else None."""
    reducer = getattr(getattr(unwrap(model), "backbone", None), "reducer", None)
    return reducer if hasattr(reducer, "calibration") else None


@torch.no_grad()
def calibrate_thresholds(model, batches) -> dict[int, float]:
    """Recalibrate the inference thresholds of ``model``'s reducer from scratch on ``batches``.

    The detector runs its backbone in eval mode inside ``reducer.calibration()`` (equal weight per batch, the
    threshold rule applied as at test time) on each batch of ``batches`` (collated data as a dataloader gives
    them, through the detector's data preprocessor); its training mode is restored afterwards.

    Args:
        model: A detector (or a wrapper of one) whose ``backbone.reducer`` has ``calibration()``.
        batches: Iterable of collated batches of training images.

    Returns:
        Block index -> mean keep rate over the calibration batches (the thresholds move while they run).
    """
    model = unwrap(model)
    reducer = threshold_reducer(model)
    if reducer is None:
        raise ValueError("the model's backbone has no reducer with calibrated thresholds (SViT, TPC)")
    training = model.training
    rates: dict[int, list[float]] = defaultdict(list)
    model.eval()
    try:
        with reducer.calibration():
            for data in batches:
                model.backbone(model.data_preprocessor(data, False)["inputs"])
                for block, values in TokenStatsHook._per_image_rates(model.backbone).items():
                    rates[block].append(float(values.float().mean()))
    finally:
        model.train(training)
    return {block: sum(values) / len(values) for block, values in sorted(rates.items())}


def reducer_name(reducer) -> str:
    """``SViTReducer`` -> ``SViT``."""
    return type(reducer).__name__.removesuffix("Reducer")


def describe_rules(rules: dict[int, str]) -> str:
    """Block -> rule as one phrase, e.g. ``threshold at blocks [3, 4, 5], fixed at blocks [6, 7]``."""
    by_rule: dict[str, list[int]] = defaultdict(list)
    for block, rule in sorted(rules.items()):
        by_rule[rule].append(block)
    return ", ".join(f"{rule} at blocks {blocks}" for rule, blocks in by_rule.items())


def describe_fallbacks(reducer, fallbacks: dict[int, str]) -> str:
    """One line: where the configured rule falls back to another, why, and what to do."""
    by_reason: dict[str, list[int]] = defaultdict(list)
    for block, reason in sorted(fallbacks.items()):
        by_reason[reason].append(block)
    rules = reducer.inference_rules()
    used = sorted({rules[b] for b in fallbacks})
    where = "; ".join(f"blocks {blocks}: {reason}" for reason, blocks in by_reason.items())
    line = (
        f"{reducer_name(reducer)} inference={reducer.inference!r} falls back to {' / '.join(map(repr, used))} "
        f"(ceil(target x N) top-scored tokens per image) at {where}"
    )
    if any(reason == "never calibrated" for reason in by_reason):
        line += (
            f". Calibrate the thresholds on training images with {RECALIBRATE}, or choose another rule with "
            "--cfg-options model.backbone.reducer.inference=fixed|official|sample"
        )
    return line


@HOOKS.register_module()
class TokenStatsHook(Hook):
    """Per-block keep rates of a token-reducing backbone, to the log and the visualizer backends.

    Training, every logger interval: ``keep_rate.block{i}`` (mean over the batch) and ``keep_rate.mean``.
    :class:`TokenPruneMaskRCNN` already puts these into its loss dict, from which mmengine's ``LoggerHook``
    logs them (smoothed over its window) and hands them to ``runner.visualizer.add_scalars``; the hook then
    adds nothing, so nothing is logged twice. For a detector whose loss dict lacks them, the hook puts them
    into the message hub under the same names, and ``LoggerHook`` logs them the same way.

    Val/test: collects the per-image keep rate at every reducing block and adds to the epoch's metrics (so
    they are logged, sent to the visualizer backends and returned by ``runner.val()`` / ``runner.test()``):

    - ``keep_rate/block{i}``: mean over images of the realised keep rate at block i,
    - ``keep_rate_std/block{i}``: its spread over images,
    - ``keep_rate/mean``: mean over blocks and images,
    - ``flops/backbone_gmacs``: the backbone's multiply-accumulates per image (G), counted from the tokens
      each block really ran (:mod:`tokenprune.models.flops`), with ``flops/dense_backbone_gmacs`` beside it,
    - ``flops/flop_bound``: their ratio of means, the speed-up the backbone would reach if time followed MACs,
    - ``inference_rule/block{i}``: for reducers with a choice of inference rule (SViT, TPC), the rule block i's
      decision followed (``'threshold'``, ``'fixed'``, ``'official'`` or ``'sample'``), with
      ``inference_rule/sample_seed`` under ``'sample'`` (-1: torch's global generator).

    Before each test run (and the first validation) the hook logs the rule of every deciding block in one line,
    and, where the configured rule falls back to another (``'threshold'`` on a block never calibrated uses the
    fixed budget), one warning line that says where, why and what to do.

    mmengine's ``RuntimeInfoHook`` copies the metrics into the message hub before this hook sees them, so the
    hook also writes these into the message hub itself; otherwise ``LoggerHook`` would not see them.
    The per-image rates are written to ``<work_dir>/token_stats_{val,test}.json``.

    Keep rates are the reducer's ``keep_rate_per_image.block{i}`` stats where it reports them, else computed
    from its token maps (:func:`tokenprune.analysis.keep_rates`: tokens run / positions), so every reducer is
    covered; for the latter the hook switches on the backbone's ``record_tokens``.
    """

    def __init__(self) -> None:
        self._announced_val = False
        self._reset()

    def _reset(self) -> None:
        self.rules: dict[str, str | int] = {}
        self.rates: dict[int, list[float]] = defaultdict(list)
        self.macs: list[tuple[float, float]] = []  # (realised, dense) backbone MACs per image
        self._input_hw: tuple[int, int] | None = None
        self._stop_watching()

    def _stop_watching(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.remove()
        self._handle = None

    @staticmethod
    def _per_image_rates(backbone) -> dict[int, torch.Tensor]:
        """Block -> (B,) keep rate of each image in the backbone's last forward (its ``last_record``)."""
        record = getattr(backbone, "last_record", None) or ReductionRecord()
        rates = {int(k[len(PER_IMAGE) :]): v for k, v in record.stats.items() if k.startswith(PER_IMAGE)}
        if rates:
            return rates
        return keep_rates(record.token_maps)

    @staticmethod
    def _record_tokens(runner) -> None:
        """Token maps are the fallback source of keep rates and token counts that of MACs: make the backbone
        keep them."""
        backbone = getattr(unwrap(runner.model), "backbone", None)
        if getattr(backbone, "reducer", None) is not None and hasattr(backbone, "record_tokens"):
            backbone.record_tokens = True

    def _watch_input_size(self, runner) -> None:
        """Remember the input size of every backbone forward (the MAC count needs it)."""
        backbone = getattr(unwrap(runner.model), "backbone", None)
        if backbone is None or not hasattr(backbone, "record_tokens"):
            return

        def remember(module, args):
            self._input_hw = tuple(args[0].shape[-2:])

        self._handle = backbone.register_forward_pre_hook(remember)

    def _announce_rules(self, runner, mode: str) -> None:
        """Remember the inference rule of every deciding block for the metrics; log them (and any fallback)
        before each test run and before the first validation."""
        reducer = threshold_reducer(runner.model)
        if reducer is None:
            return
        rules = reducer.inference_rules()
        self.rules = {f"{RULE}{block}": rule for block, rule in rules.items()}
        if "sample" in rules.values():
            seed = getattr(reducer, "sample_seed", None)
            self.rules["inference_rule/sample_seed"] = -1 if seed is None else seed
        if mode == "val":
            if self._announced_val:
                return
            self._announced_val = True
        runner.logger.info(f"{reducer_name(reducer)} inference rule ({mode}): {describe_rules(rules)}")
        fallbacks = reducer.inference_fallbacks()
        if fallbacks:
            runner.logger.warning(describe_fallbacks(reducer, fallbacks))

    def _count_macs(self, backbone) -> None:
        record = getattr(backbone, "last_record", None)
        counts = None if record is None else record.token_counts
        if counts is None or self._input_hw is None or not hasattr(backbone, "blocks"):
            return
        try:
            windows = window_token_counts(backbone, counts, record.token_maps, self._input_hw)
            real = macs_from_counts(backbone, counts, self._input_hw, record.extra_macs, windows).total
            dense = dense_backbone_macs(backbone, self._input_hw, counts.shape[1]).total
        except (ValueError, AttributeError):  # a backbone whose blocks the counter does not know
            return
        self.macs.extend(zip(real.tolist(), dense.tolist()))

    def before_train(self, runner) -> None:
        self._record_tokens(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        logged = outputs if isinstance(outputs, dict) else {}
        rates = self._per_image_rates(getattr(unwrap(runner.model), "backbone", None))
        if not rates or any(f"keep_rate.block{b}" in logged for b in rates):
            return
        means = {b: r.float().mean() for b, r in rates.items()}
        for block, mean in means.items():
            runner.message_hub.update_scalar(f"train/keep_rate.block{block}", mean.item())
        runner.message_hub.update_scalar("train/keep_rate.mean", torch.stack(list(means.values())).mean().item())

    def _collect(self, runner) -> None:
        backbone = getattr(unwrap(runner.model), "backbone", None)
        for block, values in self._per_image_rates(backbone).items():
            self.rates[block].extend(values.float().cpu().tolist())
        self._count_macs(backbone)

    def _summarise(self, runner, metrics: dict | None, mode: str) -> None:
        self._stop_watching()
        gathered = all_gather_object((dict(self.rates), self.macs))
        rates: dict[int, list[float]] = defaultdict(list)
        macs: list[tuple[float, float]] = []
        for part, part_macs in gathered:
            for block, values in part.items():
                rates[block].extend(values)
            macs.extend(part_macs)
        if not rates or metrics is None:
            return
        summary = {}
        if macs:
            real, dense = (sum(column) / len(macs) for column in zip(*macs))
            summary["flops/backbone_gmacs"] = real / 1e9
            summary["flops/dense_backbone_gmacs"] = dense / 1e9
            summary["flops/flop_bound"] = dense / real
        for block in sorted(rates):
            values = torch.tensor(rates[block])
            summary[f"keep_rate/block{block}"] = values.mean().item()
            summary[f"keep_rate_std/block{block}"] = values.std(unbiased=False).item()
        summary["keep_rate/mean"] = torch.tensor([v for b in rates for v in rates[b]]).mean().item()
        summary.update(self.rules)
        metrics.update(summary)
        for key, value in summary.items():
            if isinstance(value, str):
                runner.message_hub.update_info(f"{mode}/{key}", value)
            else:
                runner.message_hub.update_scalar(f"{mode}/{key}", value)
        if is_main_process():
            with open(osp.join(runner.work_dir, f"token_stats_{mode}.json"), "w") as f:
                json.dump({f"block{b}": rates[b] for b in sorted(rates)}, f)

    def before_val_epoch(self, runner) -> None:
        self._reset()
        self._record_tokens(runner)
        self._watch_input_size(runner)
        self._announce_rules(runner, "val")

    def before_test_epoch(self, runner) -> None:
        self._reset()
        self._record_tokens(runner)
        self._watch_input_size(runner)
        self._announce_rules(runner, "test")

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._collect(runner)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._collect(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._summarise(runner, metrics, "val")

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._summarise(runner, metrics, "test")


@HOOKS.register_module()
class SViTCalibrationHook(Hook):
    """Calibrates SViT's (or TPC's) per-block inference thresholds on training images after the last training
    iteration, before the last checkpoint is saved.

    During training the thresholds follow an EMA over recent batches while the gates still change; this pass
    recomputes them with the final gates, in inference mode (each block's threshold applied as it will be at
    test time), as the equal-weight mean over ``num_batches`` training batches of the per-batch threshold
    that keeps exactly the target fraction (:func:`calibrate_thresholds`, i.e. ``reducer.calibration()``).
    ``tools/analysis_tools/recalibrate.py`` runs the same pass on the same batches for a checkpoint.

    The images are drawn (seeded) from the training dataset with its training pipeline, not through the
    training dataloader, whose samplers keep state between iterators.

    Args:
        num_batches: Training batches to calibrate on.
        batch_size: Images per calibration batch.
        seed: Seed of the choice of images.
    """

    priority = "VERY_HIGH"  # before CheckpointHook writes the last checkpoint

    def __init__(self, num_batches: int = 50, batch_size: int = 4, seed: int = 0) -> None:
        if num_batches < 1 or batch_size < 1:
            raise ValueError(f"SViTCalibrationHook needs num_batches, batch_size >= 1, got {num_batches}, {batch_size}")
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seed = seed

    def batches(self, dataset):
        """``num_batches`` collated batches of training images, cycling through a seeded permutation."""
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        for b in range(self.num_batches):
            start = b * self.batch_size
            yield pseudo_collate([dataset[order[i % len(order)]] for i in range(start, start + self.batch_size)])

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.is_last_train_iter(runner):
            self.calibrate(runner)

    def calibrate(self, runner) -> None:
        reducer = threshold_reducer(runner.model)
        if reducer is None:
            return
        calibrate_thresholds(runner.model, self.batches(runner.train_dataloader.dataset))
        thresholds = ", ".join(f"{t:.3f}" for t in reducer.thresholds.tolist())
        runner.logger.info(f"SViT thresholds calibrated on {self.num_batches} training batches: {thresholds}")
