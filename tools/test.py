"""Test (and evaluate) a detector: MMDetection's tools/test.py with this project's package, early config
checks, CPU distributed launch (gloo), and ``--metrics-out`` to keep the metrics and throughput as JSON.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out preds.pkl] [--show-dir DIR]
                         [--metrics-out metrics.json] [--trust-checkpoint] [--allow-partial-load]
                         [--cfg-options k=v ...] [--launcher ...]

CHECKPOINT must fit the model (every tensor), unless ``--allow-partial-load``; the backbone's pretrained
weights (``init_cfg``) are not read, so they need not exist. Dataloader workers end with this process.
"""

import argparse
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "projects"))

from mmengine.config import DictAction
from mmengine.dist import get_rank
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import tokenprune  # noqa: F401  (registers models, datasets and the checkpoint allow-list)
from tokenprune.errors import ConfigError
from tokenprune.mmdet_plugin.checkpoint_fit import check_checkpoint_fit
from tokenprune.mmdet_plugin.cli import check_config, load_config, report_errors, setup_cpu_distributed
from tokenprune.mmdet_plugin.reliability import exit_workers_with_parent
from tokenprune.mmdet_plugin.safe_load import trust_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Test (and evaluate) a detector")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="the dir for the evaluation logs")
    parser.add_argument("--out", help="dump predictions to this pickle file (.pkl) for offline evaluation")
    parser.add_argument("--show", action="store_true", help="show prediction results")
    parser.add_argument("--show-dir", help="save images with predictions drawn into this folder (in work-dir)")
    parser.add_argument("--wait-time", type=float, default=2, help="the interval of show (s)")
    parser.add_argument("--metrics-out", help="write the metrics, image count and images/s to this JSON file")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load CHECKPOINT with full unpickling, which can run code stored in the file: only for legacy files "
        "whose origin you trust (default: tensors and mmengine's log buffers only)",
    )
    parser.add_argument(
        "--allow-partial-load",
        action="store_true",
        help="test a CHECKPOINT that does not fit the model (missing, unexpected or mis-shaped tensors): load the "
        "tensors that fit, the others keep their initial values (default: refuse)",
    )
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override config settings, e.g. model.test_cfg.x=1"
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--tta", action="store_true", help="test time augmentation (needs tta_model in config)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


@report_errors
def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if not osp.isfile(args.checkpoint):
        raise ConfigError(f"checkpoint not found: {args.checkpoint}")
    cfg.load_from = args.checkpoint
    if args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    if args.out is not None and not args.out.endswith((".pkl", ".pickle")):
        raise ConfigError(f"--out must be a .pkl or .pickle file, got {args.out}")
    if args.tta and ("tta_model" not in cfg or "tta_pipeline" not in cfg):
        raise ConfigError("--tta needs tta_model and tta_pipeline in the config")
    # testing reads the test data, its evaluator's annotations and CHECKPOINT, not the pretrained weights
    predictions_kept = bool(args.out or args.show or args.show_dir)
    check_config(
        cfg, loaders=("test_dataloader",), init_weights=False, unannotated="warn" if predictions_kept else "error"
    )
    check_checkpoint_fit(cfg, args.checkpoint, "test", allow_partial=args.allow_partial_load)
    if args.show or args.show_dir:
        from mmdet.engine.hooks.utils import trigger_visualization_hook

        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        cfg.model = dict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    setup_cpu_distributed(cfg)
    exit_workers_with_parent()
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    start = time.perf_counter()
    metrics = runner.test()
    seconds = time.perf_counter() - start
    if args.metrics_out and get_rank() == 0:
        num_images = len(runner.test_dataloader.dataset)
        summary = {
            "metrics": metrics,
            "num_images": num_images,
            "seconds": seconds,
            "images_per_s": num_images / seconds,
        }
        os.makedirs(osp.dirname(osp.abspath(args.metrics_out)), exist_ok=True)
        with open(args.metrics_out, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
