"""Hooks that make long training runs fail loudly and resume exactly.

- :class:`StopOnNonFiniteLossHook` ends training with one clear message when the loss becomes NaN or inf,
  before the checkpoint of that iteration is written (MMDetection's ``CheckInvalidLossHook`` stops with an
  empty ``AssertionError`` instead, and by default only checks every 50 iterations).
- :class:`RandomStateHook` saves torch's random state in every checkpoint and restores it when training
  resumes, so a resumed run draws the same RPN/RoI samples, Gumbel noise and drop-path masks as a run that was
  never interrupted (mmengine saves the seed only, and reseeding replays the random numbers of iteration 1).

Both are in ``default_hooks`` of ``configs/_base_/default_runtime.py``, and ``tools/train.py`` adds them to
configs that lack them (set ``default_hooks.check_invalid_loss=None`` or ``default_hooks.random_state=None``
to switch one off).

- :func:`exit_workers_with_parent`, called by ``tools/train.py`` and ``tools/test.py``, makes every DataLoader
  worker the runner builds end when the process that started it dies: a run killed with SIGKILL (or by the
  out-of-memory killer) would otherwise leave its workers behind, re-parented and blocked, holding their
  memory until ended by hand (torch's own check of the parent only runs while a worker waits for work).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import threading
import time

import torch
from mmdet.registry import HOOKS
from mmengine.dist import all_gather_object, all_reduce, get_rank, get_world_size, is_distributed
from mmengine.hooks import Hook
from mmengine.logging import print_log

from ..errors import TokenPruneError

RELIABILITY_HOOKS = {
    "check_invalid_loss": dict(type="StopOnNonFiniteLossHook", interval=1),
    "random_state": dict(type="RandomStateHook"),
}


class TrainingDivergedError(TokenPruneError, RuntimeError):
    """The training loss became NaN or inf."""


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().item() if value.numel() else float("nan")
    return float(value)


@HOOKS.register_module()
class StopOnNonFiniteLossHook(Hook):
    """Stop training with a :class:`TrainingDivergedError` naming the iteration, the non-finite loss terms,
    the last checkpoint and the usual fixes, as soon as the total loss is NaN or inf.

    It runs before the logger and checkpoint hooks, so the broken iteration is neither logged as a number
    nor saved. Under distributed training all ranks agree (one all-reduce of a flag), so no rank is left
    waiting for the others.

    Args:
        interval: Check every ``interval`` training iterations (1: every one; the loss is already copied to
            the CPU for logging every iteration, so checking costs nothing measurable).
    """

    priority = "ABOVE_NORMAL"

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs: dict | None = None) -> None:
        if not self.every_n_train_iters(runner, self.interval) or not outputs or "loss" not in outputs:
            return
        loss = outputs["loss"]
        finite = torch.isfinite(torch.as_tensor(loss)).all().float().reshape(1)
        if is_distributed():
            all_reduce(finite, op="min")
        if finite.item() == 1.0:
            return
        terms = {k: _as_float(v) for k, v in outputs.items() if "loss" in k}
        bad = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)) or "on another rank"
        last = runner.message_hub.get_info("last_ckpt")
        raise TrainingDivergedError(
            f"training stopped at iteration {runner.iter + 1}: the loss is not finite ({bad}). This iteration "
            "was not saved. Usual causes: a learning rate too high for the batch size (lower "
            "optim_wrapper.optimizer.lr or lengthen the warm-up), no gradient clipping "
            "(optim_wrapper.clip_grad=dict(max_norm=1.0)), fp16 overflow with --amp, or degenerate boxes in the "
            "annotations. Fix the cause, then "
            + (
                f"continue from the last checkpoint, {last}, with tools/train.py CONFIG --resume"
                if last
                else "train again (no checkpoint was saved yet)"
            )
        )


def _local_random_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Keep torch's global random state (CPU, and CUDA when in use) of every rank in each checkpoint under
    ``'random_state'`` and restore it when training resumes from that checkpoint.

    The data needs nothing: mmengine's ``IterBasedTrainLoop`` replays the dataloader up to the resumed
    iteration, and the sampler, the workers' seeds and the augmentations' numpy draws follow from the seed.
    What the model draws from torch's global generator (RPN and RoI sampling, Gumbel noise, drop path) is not
    replayed, so it is restored here, just before the first resumed iteration runs (after the replay).
    A checkpoint loaded with ``load_from`` to start a new run (fine-tuning) restores nothing.
    """

    # before CheckpointHook (VERY_LOW): the states are gathered on every rank in after_train_iter, because
    # mmengine saves checkpoints (and calls before_save_checkpoint) on rank 0 only, where a collective would hang
    priority = "LOW"

    def __init__(self) -> None:
        self._pending: tuple[int, list[dict]] | None = None
        self._gathered: list[dict] | None = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if is_distributed():
            self._gathered = all_gather_object(_local_random_state())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if is_distributed():
            if self._gathered is not None:
                checkpoint["random_state"] = self._gathered
        else:
            checkpoint["random_state"] = [_local_random_state()]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = checkpoint.get("random_state")
        iteration = checkpoint.get("meta", {}).get("iter")
        self._pending = (iteration, states) if states and iteration else None

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is None:
            return
        iteration, states = self._pending
        self._pending = None
        if runner.iter != iteration:  # load_from of a finished run: a new run, not a resume
            return
        if len(states) != get_world_size():
            print_log(
                f"RandomStateHook: the checkpoint holds the random state of {len(states)} processes, this run has "
                f"{get_world_size()}: random draws continue from the seed, not from where the run stopped",
                logger="current",
                level=logging.WARNING,
            )
            return
        state = states[get_rank()]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        print_log(f"RandomStateHook: random state restored from iteration {iteration}", logger="current")


# ---------------------------------------------------------------------------------------------------------
# DataLoader workers end with the process that started them

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(parent_pid: int, interval: float) -> None:
    direct_parent = os.getppid()
    while True:
        time.sleep(interval)
        if os.getppid() != direct_parent or not _alive(parent_pid):
            os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> str:
    """Make this process (a DataLoader worker) die as soon as ``parent_pid`` does: on Linux, by asking the
    kernel for SIGKILL when the parent exits (``prctl(PR_SET_PDEATHSIG)``); where that is not available, or
    when the parent is not this process's direct parent, by a thread that checks every ``interval`` seconds.
    Exits at once if the parent is already gone. Returns how ('pdeathsig' or 'watchdog')."""
    how = "watchdog"
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid and not _alive(parent_pid):  # died before the request took effect
        os._exit(1)
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent_pid, interval), daemon=True).start()
    return how


class ExitWithParent:
    """A DataLoader ``worker_init_fn``: :func:`exit_with_parent` for the process that built the loader, then
    the loader's own ``worker_init_fn`` (mmengine's seeding). Picklable, for every start method."""

    def __init__(self, parent_pid: int, init_fn=None) -> None:
        self.parent_pid = parent_pid
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        exit_with_parent(self.parent_pid)
        if self.init_fn is not None:
            self.init_fn(worker_id)


def guard_workers(loader):
    """Give a DataLoader with worker processes the :class:`ExitWithParent` worker_init_fn (once)."""
    if isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers > 0:
        if not isinstance(loader.worker_init_fn, ExitWithParent):
            loader.worker_init_fn = ExitWithParent(os.getpid(), loader.worker_init_fn)
    return loader


def exit_workers_with_parent() -> None:
    """Make every DataLoader that mmengine's runner builds (``Runner.build_dataloader``: training, validation,
    test) start workers that end with the process that started them (:class:`ExitWithParent`). Idempotent."""
    from mmengine.runner import Runner

    if getattr(Runner.build_dataloader, "_guards_workers", False):
        return
    build = Runner.build_dataloader

    def build_dataloader(*args, **kwargs):
        return guard_workers(build(*args, **kwargs))

    build_dataloader._guards_workers = True
    Runner.build_dataloader = staticmethod(build_dataloader)
