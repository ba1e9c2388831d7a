"""Train a detector: MMDetection's tools/train.py with this project's package, early config checks and
CPU distributed launch (gloo).

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--cfg-options k=v ...]
                          [--trust-checkpoint] [--allow-partial-load] [--launcher {none,pytorch,slurm,mpi}]

Training stops with one message if the loss becomes NaN or inf, and checkpoints carry the random state, so
``--resume`` continues exactly where an interrupted run stopped. The checkpoint a run starts from must fit the
model (``load_from``: a new token reducer is the one accepted gap; ``--resume``: every tensor), unless
``--allow-partial-load``. Dataloader workers end with this process. See docs/reliability.md.
"""

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "projects"))

import torch
from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import tokenprune  # noqa: F401  (registers models, datasets and the checkpoint allow-list)
from tokenprune.errors import ConfigError
from tokenprune.mmdet_plugin.cli import (
    add_reliability_hooks,
    apply_resume,
    check_config,
    check_start_checkpoint,
    load_config,
    report_errors,
    setup_cpu_distributed,
    training_loaders,
)
from tokenprune.mmdet_plugin.reliability import exit_workers_with_parent
from tokenprune.mmdet_plugin.safe_load import trust_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a detector")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--amp", action="store_true", help="enable automatic mixed precision training (GPU)")
    parser.add_argument("--auto-scale-lr", action="store_true", help="scale the LR by the total batch size")
    parser.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from this checkpoint; without a path, from the latest checkpoint in the work dir (if none "
        "is there yet, start as the config says)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load the checkpoint of --resume / load_from with full unpickling, which can run code stored in the "
        "file: only for legacy files whose origin you trust (default: tensors and mmengine's log buffers only)",
    )
    parser.add_argument(
        "--allow-partial-load",
        action="store_true",
        help="start from a --resume / load_from checkpoint that does not fit the model (missing, unexpected or "
        "mis-shaped tensors): load the tensors that fit, the others keep their initial values (default: refuse; "
        "a load_from without the model's new token reducer is always accepted)",
    )
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override config settings, e.g. train_cfg.max_iters=10"
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


@report_errors
def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        if not torch.cuda.is_available():
            raise ConfigError("--amp needs a CUDA GPU (mmengine's AmpOptimWrapper); drop --amp on CPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise ConfigError("--auto-scale-lr needs auto_scale_lr = dict(enable=False, base_batch_size=N)")
        cfg.auto_scale_lr.enable = True
    apply_resume(cfg, args.resume)
    if args.trust_checkpoint and cfg.get("load_from"):
        trust_checkpoint(cfg.load_from)
    add_reliability_hooks(cfg)
    check_config(cfg, loaders=training_loaders(cfg), init_weights=False)
    check_start_checkpoint(cfg, allow_partial=args.allow_partial_load)  # and the pretrained weights, if read
    setup_cpu_distributed(cfg)
    exit_workers_with_parent()
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()
    if torch.distributed.is_initialized():
        # shut the group down explicitly: a gloo group left to interpreter exit can abort the process
        # ("terminate called without an active exception") after training has finished
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
