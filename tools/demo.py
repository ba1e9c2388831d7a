"""The main job on the embedded shapes data: train the dense tiny ViT Mask R-CNN with tools/train.py,
fine-tune SViT from it, evaluate COCO box and mask mAP of both with tools/test.py, print a summary and write
it to WORK_DIR/summary.json.

    python tools/demo.py [--work-dir work_dirs/demo]

Training resumes from the latest checkpoint in the work dir, so a second run skips finished training.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DENSE = "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
SVIT = "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def latest_checkpoint(work_dir: Path) -> Path:
    return Path((work_dir / "last_checkpoint").read_text().strip())


def train_and_test(name: str, config: str, work_dir: Path, *train_args: str) -> dict:
    start = time.perf_counter()
    run("tools/train.py", config, "--work-dir", str(work_dir), "--resume", *train_args)
    train_s = time.perf_counter() - start
    checkpoint = str(latest_checkpoint(work_dir))
    metrics_file = work_dir / "metrics.json"
    run(
        "tools/test.py",
        config,
        checkpoint,
        "--work-dir",
        str(work_dir / "test"),
        "--metrics-out",
        str(metrics_file),
    )
    result = json.loads(metrics_file.read_text())
    metrics = result["metrics"]
    return {
        "model": name,
        "config": config,
        "box_mAP": metrics["coco/bbox_mAP"],
        "mask_mAP": metrics["coco/segm_mAP"],
        "keep_rate": metrics.get("keep_rate/mean", 1.0),
        "keep_rate_per_block": {
            f"block{b}": metrics[f"keep_rate/block{b}"]
            for b in sorted(int(k[len("keep_rate/block") :]) for k in metrics if k.startswith("keep_rate/block"))
        },
        "test_images_per_s": result["images_per_s"],
        "train_seconds_this_run": train_s,
        "checkpoint": checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "work_dirs/demo"))
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    dense = train_and_test("dense", DENSE, work_dir / "dense")
    svit = train_and_test("svit", SVIT, work_dir / "svit", "--cfg-options", f"load_from={dense['checkpoint']}")
    rows = [dense, svit]
    (work_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    print("\nEmbedded shapes data, val split (100 images), CPU:")
    print(f"{'model':8} {'box mAP':>8} {'mask mAP':>9} {'keep rate':>10} {'test img/s':>11} {'train s':>8}")
    for r in rows:
        print(
            f"{r['model']:8} {r['box_mAP']:8.3f} {r['mask_mAP']:9.3f} {r['keep_rate']:10.3f} "
            f"{r['test_images_per_s']:11.2f} {r['train_seconds_this_run']:8.0f}"
        )
    print("SViT keep rate per gated block (val, deterministic inference):")
    print("  " + "  ".join(f"{k}: {v:.3f}" for k, v in svit["keep_rate_per_block"].items()))
    print(f"written: {work_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
