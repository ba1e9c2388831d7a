"""Measured speed of token reduction: the dense model and any reducers side by side, in one run.

Two modes:

``backbone`` (torch + timm only, runs where MMDetection is not installed): one ViT, of a DeiT shape
(``deit-t/s/b``, global attention) or ViTDet's windowed ViT (``vitdet-t/s/b``: 14 x 14 windows, global blocks
2, 5, 8, 11, relative positions), random or loaded weights shared by every model (the reducers are swapped in
and out of the same backbone), each ``--reducer`` from ``tokenprune.models.reducers.REDUCERS`` by name with its
defaults or with JSON settings::

    python tools/analysis_tools/benchmark.py backbone --arch deit-s --size 512 512 --batch 1 4 --threads 2 \\
        --reducer none 'SViT:{"inference": "fixed"}' --runs 15 --warmup 3 --json-out bench.json
    python tools/analysis_tools/benchmark.py backbone --arch vitdet-b --size 1024 1024 --batch 1 2 --threads 2 \\
        --reducer none all --runs 5 --warmup 1 --json-out vitdet-b.json

``detector`` (MMDetection): the whole detector and its backbone alone, for the dense config first and one
or more pruned configs (optionally with checkpoints; without, the pruned models take the dense model's random
weights where they fit)::

    python tools/analysis_tools/benchmark.py detector configs/dense/X.py configs/svit/Y.py \\
        [--checkpoints dense.pth svit.pth] [--size 800 1216 | --dataset --num-images 20] --batch 1 2

``--reducer`` defaults to ``none all``: the dense model and every registered reducer that can run this
backbone, with its defaults except SViT and TPC at their fixed budget (``"inference": "fixed"``: the keep
schedule) and, on a backbone without a class token, EViT, PPT and BAT with their CLS-free scores. A reducer of
``all`` that cannot run the backbone (on a windowed one, every reducer that cannot drive windowed blocks:
``ViT.set_reducer`` refuses it) is skipped and listed with the reason, in the output and the JSON (``skipped``);
named explicitly, it stops the tool with that message.

Inputs: a fixed size of random pixels (``--size H W``), or real images (backbone: ``--images`` files or
folders, resized to fit ``--size`` and padded; detector: ``--dataset``, the first config's test dataloader).
Timing: ``--warmup`` untimed repeats, then ``--runs`` repeats; within each repeat every model runs once
(round-robin, the starting model rotating), so load from other processes hits all models alike. One run of a
model is one forward of every input batch. Reported per model and batch size: median latency per batch with
its quartiles and min/max, images/s, speed-up against the dense model (ratio of medians, the quartiles of
the per-repeat paired ratios, and the ratio of the fastest runs, which load from other processes cannot
improve, so it is the figure to read on a shared machine), MACs per image counted from the tokens each block really ran
(:mod:`tokenprune.models.flops`; in windowed blocks per window, from the tokens each window ran), the
FLOP-bound speed-up (dense MACs / pruned MACs) and measured / bound,
and the realised keep rate per block (tokens run / all tokens). CPU threads are set with
``torch.set_num_threads`` and reported; on a GPU the time comes from CUDA events after a synchronize.
Forwards run under ``torch.inference_mode`` (backbone) or ``torch.no_grad`` (detector, like MMDetection's
test loop), optionally under ``--amp fp16|bf16`` autocast; detector timing starts from preprocessed inputs
(data loading and normalisation are not timed).
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from collections.abc import Sequence

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.benchmarking import (  # noqa: E402
    add_backbone_model_args,
    add_common_args,
    add_detector_model_args,
    run_backbone,
    run_cli,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    bb = sub.add_parser("backbone", help="the ViT backbone alone (torch + timm only)")
    add_backbone_model_args(bb)
    add_common_args(bb)
    det = sub.add_parser("detector", help="whole MMDetection detectors and their backbones")
    add_detector_model_args(det)
    add_common_args(det)
    det.add_argument(
        "--backbone-only",
        action="store_true",
        help="time the backbones only, not the whole detectors (FLOPs are still counted for both)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark of ``argv`` (the command line without the program name); returns the JSON dict."""
    args = build_parser().parse_args(argv)
    if args.mode == "backbone":
        return run_cli(run_backbone, args)
    from tokenprune.mmdet_plugin.benchmarking import run_detector

    return run_cli(run_detector, args)


if __name__ == "__main__":
    main()
