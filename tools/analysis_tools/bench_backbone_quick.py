"""Quick CPU/GPU timing of the backbone alone: dense ViT against the same ViT with SViT pruning.

Both models share weights and are timed side by side (alternating within each run, so load from other jobs
hits both alike); reported is the median of ``--runs`` forwards after ``--warmup`` warm-ups. SViT runs in
``fixed`` inference mode by default, which keeps exactly ceil(target * N) tokens per image, so the timing does
not depend on (untrained) gate weights.

    python tools/analysis_tools/bench_backbone_quick.py [--size 512] [--batch 1 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import os.path as osp
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.models import SViTReducer, ViT  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dense vs SViT backbone timing")
    parser.add_argument("--size", type=int, nargs="+", default=[512], help="image size: S or H W")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes to time")
    parser.add_argument("--embed-dim", type=int, default=384, help="384 is DeiT-S")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--inference", default="fixed", choices=["fixed", "threshold"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[ViT, ViT]:
    """Dense and SViT backbones (default gated blocks and keep targets) with the same weights, in eval mode."""
    shape = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads}
    torch.manual_seed(0)
    dense = ViT(**shape)
    svit = ViT(**shape, reducer=SViTReducer(args.embed_dim, inference=args.inference))
    svit.load_state_dict(dense.state_dict(), strict=False)
    return dense.to(args.device).eval(), svit.to(args.device).eval()


def timed(model: ViT, x: torch.Tensor) -> float:
    """Seconds for one forward."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def bench(dense: ViT, svit: ViT, x: torch.Tensor, runs: int, warmup: int) -> tuple[float, float, float]:
    """Median seconds of dense and SViT, and SViT's realised mean keep rate over its gated blocks."""
    times: dict[str, list[float]] = {"dense": [], "svit": []}
    for i in range(warmup + runs):
        for name, model in (("dense", dense), ("svit", svit)):
            seconds = timed(model, x)
            if i >= warmup:
                times[name].append(seconds)
    keep = float(svit.last_stats["keep_rate.mean"])
    return statistics.median(times["dense"]), statistics.median(times["svit"]), keep


@torch.inference_mode()
def gate_seconds(svit: ViT, x: torch.Tensor, runs: int, warmup: int) -> float:
    """Median seconds of all SViT gates over the full token set of ``x``'s embedding (an upper bound of the
    gates' share: in the model, pruned-token rows are not cheaper for the gates either)."""
    tokens, _ = svit.embed(x)
    times = []
    for i in range(warmup + runs):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for gate in svit.reducer.gates:
            gate(tokens)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hw = (args.size[0], args.size[-1])
    dense, svit = build(args)
    print(
        f"ViT embed_dim={args.embed_dim} depth={args.depth} heads={args.heads}, input {hw[0]}x{hw[1]}, "
        f"device {args.device}, {torch.get_num_threads()} threads, SViT inference={args.inference!r}, "
        f"median of {args.runs} after {args.warmup} warm-ups"
    )
    print(
        f"{'batch':>5} {'dense ms':>10} {'svit ms':>10} {'speed-up':>9} {'keep rate':>10} {'gates ms':>9} "
        f"{'of dense':>8} {'of svit':>8}"
    )
    for batch in args.batch:
        x = torch.randn(batch, 3, *hw, device=args.device)
        t_dense, t_svit, keep = bench(dense, svit, x, args.runs, args.warmup)
        t_gates = gate_seconds(svit, x, args.runs, args.warmup)
        print(
            f"{batch:>5} {t_dense * 1e3:>10.1f} {t_svit * 1e3:>10.1f} {t_dense / t_svit:>8.2f}x {keep:>10.3f} "
            f"{t_gates * 1e3:>9.1f} {t_gates / t_dense:>8.1%} {t_gates / t_svit:>8.1%}"
        )


if __name__ == "__main__":
    main()
