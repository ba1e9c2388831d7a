"""Hooks for token-reducing backbones: keep-rate statistics over val/test, and the calibration of SViT's
inference thresholds at the end of training."""

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

PER_IMAGE = "keep_rate_per_image.block"


def unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class TokenStatsHook(Hook):
    """Collects the backbone's per-image keep rate at every gated block during val/test and adds a summary to
    the epoch's metrics (so it is logged and returned by ``runner.test()``):

    - ``keep_rate/block{i}``: mean over images of the realised keep rate at block i,
    - ``keep_rate_std/block{i}``: its spread over images,
    - ``keep_rate/mean``: mean over blocks and images.

    The per-image rates are written to ``<work_dir>/token_stats_{val,test}.json``.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.rates: dict[int, list[float]] = defaultdict(list)

    def _collect(self, runner) -> None:
        for key, value in getattr(unwrap(runner.model).backbone, "last_stats", {}).items():
            if key.startswith(PER_IMAGE):
                self.rates[int(key[len(PER_IMAGE) :])].extend(value.float().cpu().tolist())

    def _summarise(self, runner, metrics: dict | None, mode: str) -> None:
        gathered = all_gather_object(dict(self.rates))
        rates: dict[int, list[float]] = defaultdict(list)
        for part in gathered:
            for block, values in part.items():
                rates[block].extend(values)
        if not rates or metrics is None:
            return
        for block in sorted(rates):
            values = torch.tensor(rates[block])
            metrics[f"keep_rate/block{block}"] = values.mean().item()
            metrics[f"keep_rate_std/block{block}"] = values.std(unbiased=False).item()
        metrics["keep_rate/mean"] = torch.tensor([v for b in rates for v in rates[b]]).mean().item()
        if is_main_process():
            with open(osp.join(runner.work_dir, f"token_stats_{mode}.json"), "w") as f:
                json.dump({f"block{b}": rates[b] for b in sorted(rates)}, f)

    def before_val_epoch(self, runner) -> None:
        self._reset()

    def before_test_epoch(self, runner) -> None:
        self._reset()

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
    """Calibrates SViT's per-block inference thresholds on training images after the last training iteration,
    before the last checkpoint is saved.

    During training the thresholds follow an EMA over recent batches while the gates still change; this pass
    recomputes them with the final gates, in inference mode (each block's threshold applied as it will be at
    test time), as the equal-weight mean over ``num_batches`` training batches of the per-batch threshold
    that keeps exactly the target fraction.

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

    @torch.no_grad()
    def calibrate(self, runner) -> None:
        model = unwrap(runner.model)
        reducer = getattr(model.backbone, "reducer", None)
        if reducer is None or not hasattr(reducer, "reset_thresholds"):
            return
        momentum = reducer.threshold_momentum
        model.eval()
        reducer.reset_thresholds()
        reducer.threshold_momentum = 0.0  # every batch weighs 1 / (number of batches so far)
        reducer.calibrating = True
        try:
            for data in self.batches(runner.train_dataloader.dataset):
                model.backbone(model.data_preprocessor(data, False)["inputs"])
        finally:
            reducer.calibrating = False
            reducer.threshold_momentum = momentum
            model.train()
        thresholds = ", ".join(f"{t:.3f}" for t in reducer.thresholds.tolist())
        runner.logger.info(f"SViT thresholds calibrated on {self.num_batches} training batches: {thresholds}")
