"""What SViT's gates cost inside the pruned backbone, measured in place.

Three models share one DeiT-shaped ViT (random weights) and time round-robin in one run: dense; SViT; and SViT
whose gates replay the outputs they computed for the same batch in an untimed pass, so it prunes exactly the
same tokens but computes no gate. The gates' cost is the time SViT spends over the replaying model, given as a
share of the dense and of the pruned backbone's time. Torch + timm only::

    python tools/analysis_tools/svit_gate_cost.py --arch deit-s --size 512 512 --batch 1 4 --threads 2

The gates run in ``inference='fixed'`` unless ``--inference threshold`` (untrained thresholds then fall back
to the fixed budget, which decides the same way).
"""

from __future__ import annotations

import argparse
import json
import os.path as osp
import statistics
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

from tokenprune.benchmarking import ARCHS, Candidate, Timer, percentiles, time_round_robin  # noqa: E402
from tokenprune.models import ViT  # noqa: E402
from tokenprune.models.reducers import SViTReducer  # noqa: E402


class ReplayGate(nn.Module):
    """Stands in for a gate: ``record`` runs the real gate and keeps its output, otherwise returns the kept
    output (for the same input batch) without computing anything."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.record = True
        self.outputs: list[Tensor] = []
        self.calls = 0

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        if self.record:
            self.outputs.append(self.gate(x, policy))
            return self.outputs[-1]
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="deit-s", choices=sorted(ARCHS))
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--inference", default="fixed", choices=["fixed", "threshold"])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    embed_dim, heads = ARCHS[args.arch]
    torch.manual_seed(0)
    vit = ViT(img_size=224, embed_dim=embed_dim, num_heads=heads).to(device).eval()
    reducer = SViTReducer(embed_dim, inference=args.inference).to(device).eval()
    replays = [ReplayGate(g) for g in reducer.gates]
    real_gates = list(reducer.gates)
    timer = Timer(device)

    def use(gates: list[nn.Module], attach: bool = True) -> None:
        vit.set_reducer(reducer if attach else None)
        reducer.gates = nn.ModuleList(gates)

    result = {"arch": args.arch, "size": list(args.size), "threads": torch.get_num_threads(), "batches": {}}
    print(f"{args.arch} at {args.size[0]}x{args.size[1]}, {torch.get_num_threads()} threads, {device}")
    print("gates ms: median of the paired per-repeat differences (SViT - no-gate); q1-q3 of them in brackets")
    header = ("batch", "dense ms", "SViT ms", "no-gate ms", "gates ms", "of dense", "of SViT")
    print("{:>5} {:>9} {:>9} {:>11} {:>20} {:>9} {:>8}".format(*header))
    for batch in args.batch:
        x = torch.randn(batch, 3, *args.size, device=device)

        with torch.inference_mode():
            use(replays)
            for r in replays:
                r.record, r.outputs, r.calls = True, [], 0
            reference = vit(x)
            for r in replays:
                r.record = False
            use(real_gates)
            assert torch.equal(vit(x), reference), "the replaying model must prune the same tokens"
            candidates = [
                Candidate("dense", lambda: use(real_gates, attach=False), lambda x=x: vit(x)),
                Candidate("svit", lambda: use(real_gates), lambda x=x: vit(x)),
                Candidate("svit_no_gates", lambda: use(replays), lambda x=x: vit(x)),
            ]
            times = time_round_robin(candidates, args.runs, args.warmup, timer)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        paired = [s - r for s, r in zip(times["svit"], times["svit_no_gates"])]
        gates_ms = statistics.median(paired) * 1e3
        spread = percentiles([p * 1e3 for p in paired])
        row = {
            "ms": {k: percentiles([t * 1e3 for t in v]) for k, v in times.items()},
            "gates_ms_paired": percentiles([p * 1e3 for p in paired]),
            "gates_share_of_dense": gates_ms / med["dense"],
            "gates_share_of_svit": gates_ms / med["svit"],
        }
        result["batches"][str(batch)] = row
        print(
            f"{batch:5d} {med['dense']:9.1f} {med['svit']:9.1f} {med['svit_no_gates']:11.1f} "
            f"{gates_ms:6.2f} ({spread['q1']:5.2f}-{spread['q3']:5.2f}) "
            f"{row['gates_share_of_dense']:9.1%} {row['gates_share_of_svit']:8.1%}"
        )
    vit.set_reducer(reducer)
    reducer.gates = nn.ModuleList(real_gates)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
