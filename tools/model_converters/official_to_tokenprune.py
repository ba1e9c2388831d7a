"""Convert a checkpoint of the official ViT-Adapter or SViT code (MMDetection 2) to tokenprune's key layout.

    python tools/model_converters/official_to_tokenprune.py SRC.pth DST.pth [--layer-scale {fold,keep}]
                                                             [--trust-checkpoint]

SRC is a whole detector (``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``, e.g. SViT's released
``vit-adapter-t-3x.pth`` or ``svit-adapter-s-0.33x.pth``) or a backbone alone. DST holds only the converted
``state_dict`` (and a ``meta`` of strings): it loads with torch's weights-only loader, as ``load_from`` of our
configs in ``configs/adapter/``. Every key is accounted for in the printed report; the tool exits with code 1
if some backbone key could not be placed. See docs/adapter.md for what is renamed and why.

An SViT model converts without calibrated inference thresholds (the official code has none): DST gets the
two threshold buffers at their initial values (never calibrated), and the report says so and gives the
commands to calibrate them (``tools/analysis_tools/recalibrate.py CONFIG DST.pth OUT.pth``) or to evaluate DST
under the official rules (``--cfg-options model.backbone.reducer.inference=sample``, the rule of the published
numbers, or ``=official``).

SRC is read with ``torch.load(weights_only=True)``; ``--trust-checkpoint`` reads it with full unpickling,
which can run code stored in the file: only for files whose origin you trust.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.models.convert_official import add_uncalibrated_thresholds, convert_official_state_dict  # noqa: E402
from tokenprune.models.weights import read_weights  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Official ViT-Adapter / SViT checkpoint -> tokenprune layout")
    parser.add_argument("src", help="official checkpoint (.pth)")
    parser.add_argument("dst", help="where to write the converted checkpoint")
    parser.add_argument(
        "--layer-scale",
        choices=["fold", "keep"],
        default="fold",
        help="blocks.i.gamma1/gamma2 (ViT-Adapter's LayerScale): 'fold' multiplies them into the projections "
        "they scale (for our configs, init_values=None); 'keep' renames them to ls1/ls2.gamma (init_values set)",
    )
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="load SRC with full unpickling (trusted files only)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not osp.isfile(args.src):
        print(f"error: checkpoint file not found: {args.src}", file=sys.stderr)
        return 2
    try:
        ckpt = torch.load(args.src, map_location="cpu", weights_only=not args.trust_checkpoint)
    except Exception as e:  # the weights-only unpickler refuses the file
        print(
            f"error: {args.src} holds more than tensors and plain containers ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); if you trust its origin, rerun with --trust-checkpoint",
            file=sys.stderr,
        )
        return 2
    try:
        state_dict, report = convert_official_state_dict(read_weights(ckpt), layer_scale=args.layer_scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    add_uncalibrated_thresholds(state_dict, report)
    meta = {"converted_from": osp.basename(args.src), "converter": "tools/model_converters/official_to_tokenprune.py"}
    torch.save({"state_dict": state_dict, "meta": meta}, args.dst)
    report.converted_path = args.dst
    print(report)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 1 if report.unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
