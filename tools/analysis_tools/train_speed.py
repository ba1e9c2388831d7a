"""Training speed: one fine-tune iteration (forward, backward, optimizer step) of detectors from configs and of
their backbones alone, side by side in one run, e.g. dense against SViT trained masked and sparse.

    python tools/analysis_tools/train_speed.py --sizes 256 512 --batch 4 --runs 10 --warmup 2 --threads 2 \\
        --json-out train_speed.json

Without model arguments it times the shapes fine-tune configs: dense, SViT with today's masked training, SViT
with ``train_compute='sparse'`` and with ``probe=0.5``. Models are ``[LABEL=]CONFIG[:{JSON cfg-options}]``,
the reference first::

    python tools/analysis_tools/train_speed.py dense=configs/dense/X.py svit=configs/svit/Y.py \\
        'sparse=configs/svit/Y.py:{"model.backbone.reducer.train_compute": "sparse"}' --compare svit

Reported per size and part (backbone alone, whole detector): the median time per iteration with quartiles,
the speed-ups against the first model and against ``--compare`` (ratio of medians, and of the fastest runs,
the figure to read on a loaded machine), the training MACs per image and the FLOP bound
(``tokenprune.mmdet_plugin.train_speed.backbone_train_macs``: backward = 2 x forward; the heads' training
MACs as 3 x their counted forward), and each SViT model's realised training keep rate per gated block. See
``tokenprune.mmdet_plugin.train_speed`` for what an iteration contains.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from collections.abc import Sequence

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.benchmarking import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from tokenprune.mmdet_plugin.train_speed import add_args

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the measurement of ``argv`` (the command line without the program name); returns the JSON dict."""
    from tokenprune.mmdet_plugin.train_speed import run_train_speed

    return run_cli(run_train_speed, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
