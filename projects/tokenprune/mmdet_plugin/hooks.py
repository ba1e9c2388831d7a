"""Keep-rate statistics of a token-reducing backbone over validation and test runs."""

from __future__ import annotations

import json
import os.path as osp
from collections import defaultdict

import torch
from mmdet.registry import HOOKS
from mmengine.dist import all_gather_object, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

PER_IMAGE = "keep_rate_per_image.block"


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
        self.rates: dict[int, list[float]] = defaultdict(list)

    def _reset(self) -> None:
        self.rates = defaultdict(list)

    def _collect(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        for key, value in getattr(model.backbone, "last_stats", {}).items():
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
