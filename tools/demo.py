"""The main job on the embedded shapes data: train the dense tiny ViT Mask R-CNN with tools/train.py,
evaluate COCO box and mask mAP with tools/test.py, print a summary and write it to WORK_DIR/summary.json.

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
MODELS = {"dense": "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"}


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def latest_checkpoint(work_dir: Path) -> Path:
    return Path((work_dir / "last_checkpoint").read_text().strip())


def train_and_test(name: str, config: str, work_dir: Path) -> dict:
    start = time.perf_counter()
    run("tools/train.py", config, "--work-dir", str(work_dir), "--resume")
    train_s = time.perf_counter() - start
    metrics_file = work_dir / "metrics.json"
    run(
        "tools/test.py",
        config,
        str(latest_checkpoint(work_dir)),
        "--work-dir",
        str(work_dir / "test"),
        "--metrics-out",
        str(metrics_file),
    )
    result = json.loads(metrics_file.read_text())
    return {
        "model": name,
        "config": config,
        "box_mAP": result["metrics"]["coco/bbox_mAP"],
        "mask_mAP": result["metrics"]["coco/segm_mAP"],
        "test_images_per_s": result["images_per_s"],
        "train_seconds_this_run": train_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=str(ROOT / "work_dirs/demo"))
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    rows = [train_and_test(name, cfg, work_dir / name) for name, cfg in MODELS.items()]
    (work_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    print("\nEmbedded shapes data, val split (100 images), CPU:")
    print(f"{'model':8} {'box mAP':>8} {'mask mAP':>9} {'test img/s':>11} {'train s':>8}")
    for r in rows:
        print(
            f"{r['model']:8} {r['box_mAP']:8.3f} {r['mask_mAP']:9.3f} {r['test_images_per_s']:11.2f} "
            f"{r['train_seconds_this_run']:8.0f}"
        )
    print(f"written: {work_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
