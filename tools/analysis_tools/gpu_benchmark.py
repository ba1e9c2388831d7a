"""The GPU run, ready to go: the backbone benchmark for the dense ViT, SViT and every reducer, in fp32 and under
fp16 / bf16 autocast, side by side, with a time budget: first ViTDet's windowed ViT-B at 1024x1024, batch 1 and 2
(the reducers that can drive windowed blocks; the others are listed as skipped), then the DeiT-S shape at
512x512 and 800x1344, batch 1, 4 and 16. Torch + timm only (no mmcv, mmdet or mmengine), so it runs on a bare GPU
machine from a checkout::

    python tools/analysis_tools/gpu_benchmark.py --out-dir work_dirs/gpu_bench          # cuda
    python tools/analysis_tools/gpu_benchmark.py --device cpu --arch deit-t --sizes 256x256 --amp none bf16 \\
        --windowed-arch none

It writes ``results.json`` (every benchmark run's full output) and ``table.md`` (speed-up over dense with
measured / FLOP bound, and dense images/s, per backbone, size, precision and batch) to ``--out-dir``. Each
setting is one round-robin run of ``tokenprune.benchmarking.run_backbone`` (random weights, random pixels);
settings left when ``--budget-s`` is spent are skipped and named in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.benchmarking import add_backbone_model_args, add_common_args, run_backbone  # noqa: E402

# dense and every reducer that can run the backbone ("all": SViT and TPC at their fixed budget; the detection
# ViT has no class token, so EViT, PPT and BAT use their CLS-free scores; on the windowed ViT the reducers that
# cannot drive windowed blocks are skipped, with the reason, in results.json and table.md)
DEFAULT_MODELS = ["none", "all"]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HxW, e.g. 800x1344, got {text!r}") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="work_dirs/gpu_bench", help="where results.json and table.md go")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--arch", default="deit-s", help="global-attention backbone: deit-t, deit-s (default), deit-b")
    parser.add_argument("--depth", type=int, default=12, help="blocks (fewer only for quick tests)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(512, 512), (800, 1344)])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--windowed-arch", default="vitdet-b", help="windowed backbone run first: vitdet-t/s/b (default), or none"
    )
    parser.add_argument("--windowed-sizes", type=parse_size, nargs="+", default=[(1024, 1024)])
    parser.add_argument("--windowed-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--windowed-models", nargs="+", default=DEFAULT_MODELS, help="--reducer specs for the windowed backbone"
    )
    parser.add_argument("--amp", nargs="+", default=["none", "fp16", "bf16"], choices=["none", "fp16", "bf16"])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="--reducer specs of benchmark.py")
    parser.add_argument("--runs", type=int, default=20, help="timed repeats per setting (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repeats first (default 5)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip settings once this is spent (450 s)")
    return parser


@dataclass
class Setting:
    """One backbone at one input size, run at every precision of ``--amp``.

    Attributes:
        arch: The backbone (``--arch`` of benchmark.py).
        size: Input (H, W).
        batches: Batch sizes.
        models: ``--reducer`` specs of benchmark.py.
    """

    arch: str
    size: tuple[int, int]
    batches: list[int]
    models: list[str]


def plan(args: argparse.Namespace) -> list[Setting]:
    """The settings to run, each at every precision: the windowed backbone's first."""
    out = []
    if args.windowed_arch.lower() != "none":
        out += [
            Setting(args.windowed_arch, s, args.windowed_batches, args.windowed_models) for s in args.windowed_sizes
        ]
    return out + [Setting(args.arch, s, args.batches, args.models) for s in args.sizes]


def run_setting(args: argparse.Namespace, setting: Setting, amp: str) -> dict:
    """One benchmark run: every model and batch size of one backbone at one input size and precision.

    Args:
        args: The command line.
        setting: The backbone, size, batch sizes and models.
        amp: ``none``, ``fp16`` or ``bf16``.
    """
    arch, size, batches = setting.arch, setting.size, setting.batches
    parser = argparse.ArgumentParser()
    add_backbone_model_args(parser)
    add_common_args(parser)
    argv = ["--arch", arch, "--depth", str(args.depth), "--size", str(size[0]), str(size[1])]
    argv += ["--batch", *map(str, batches), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    argv += ["--device", args.device, "--reducer", *setting.models]
    if amp != "none":
        argv += ["--amp", amp]
    return run_backbone(parser.parse_args(argv))


def markdown(runs: list[dict], skipped: list[str], device_name: str) -> str:
    lines = [
        f"# Backbone benchmark on {device_name}",
        "",
        "Speed-up of each model's backbone over dense (median of paired round-robin runs) with measured / FLOP "
        "bound in brackets; dense images/s in the last row of each block. Command: "
        "`python tools/analysis_tools/gpu_benchmark.py` (see its --help).",
    ]
    for run in runs:
        results = run["result"]["results"]
        labels = list(results[0]["models"])
        lines += ["", f"## {run['arch']} {run['size'][0]}x{run['size'][1]}, {run['amp']}", ""]
        lines.append("| model | " + " | ".join(f"batch {r['batch']}" for r in results) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in results) + " |")
        for label in labels:
            cells = []
            for r in results:
                m = r["models"][label]
                cells.append(f"{m['speedup']:.2f}x ({m['measured_over_bound']:.2f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append(
            "| dense images/s | " + " | ".join(f"{r['models']['dense']['images_per_s']:.1f}" for r in results) + " |"
        )
        left_out = [s["label"] for s in run["result"].get("skipped", [])]
        if left_out:
            lines += ["", f"Cannot run this backbone (reasons in results.json): {', '.join(left_out)}."]
    if skipped:
        lines += ["", "Skipped (time budget or error): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    start, runs, skipped = time.perf_counter(), [], []
    for setting in plan(args):
        for amp in args.amp:
            arch, size = setting.arch, setting.size
            tag = f"{arch} {size[0]}x{size[1]} {amp}"
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{tag}: budget of {args.budget_s:.0f} s spent")
                continue
            print(f"\n=== {tag} ===", flush=True)
            try:
                result = run_setting(args, setting, amp)
            except (ValueError, RuntimeError) as e:  # e.g. a precision the device does not support
                skipped.append(f"{tag}: {e}")
                print(f"skipped: {e}", flush=True)
                continue
            runs.append({"arch": arch, "size": list(size), "amp": amp, "result": result})
    device_name = runs[0]["result"]["environment"]["device_name"] if runs else args.device
    with open(osp.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "runs": runs, "skipped": skipped}, f, indent=1, default=str)
    table = markdown(runs, skipped, device_name)
    with open(osp.join(args.out_dir, "table.md"), "w") as f:
        f.write(table)
    print(f"\n{table}\nwritten: {args.out_dir}/results.json, table.md ({time.perf_counter() - start:.0f} s)")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
