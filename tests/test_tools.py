"""tools/train.py, tools/test.py, tools/dist_train.sh and --resume, run as a user runs them (subprocesses)
on a few images of the embedded shapes data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenprune  # noqa: F401  (allow-lists mmengine's checkpoint contents for torch.load)

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CFG = ROOT / "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
COCO_METRICS = [
    "mAP",
    "mAP_50",
    "mAP_75",
    "mAP_s",
    "mAP_m",
    "mAP_l",
    "AR@100",
    "AR@300",
    "AR@1000",
    "AR_s@1000",
    "AR_m@1000",
    "AR_l@1000",
]


def write_tiny_config(folder: Path, base: Path = SHAPES_CFG, max_iters: int = 4, extra: str = "") -> Path:
    """A user's config inheriting ``base``: 8 train / 4 val images of 128x128, ``max_iters`` iterations,
    a checkpoint every 2."""
    cfg = folder / "tiny.py"
    cfg.write_text(f"""
_base_ = '{base}'
data_root = '{folder}/shapes/'
generate = dict(seed=0, num_train=8, num_val=4, image_size=(128, 128))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
model = dict(backbone=dict(depth=4))
train_cfg = dict(max_iters={max_iters}, val_interval=1000)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end={max_iters})]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=10))
randomness = dict(seed=0)
{extra}
""")
    return cfg


def run(*args: str, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train(cfg: Path, work_dir: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "tools/train.py", str(cfg), "--work-dir", str(work_dir), *extra, ok=ok)


def checkpoint_iter(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]["iter"]


def test_train_then_test_gives_all_coco_metrics(tmp_path):
    cfg = write_tiny_config(tmp_path)
    train(cfg, tmp_path / "work")
    ckpt = tmp_path / "work/iter_4.pth"
    assert ckpt.is_file() and checkpoint_iter(ckpt) == 4
    out = tmp_path / "metrics.json"
    run(
        sys.executable,
        "tools/test.py",
        str(cfg),
        str(ckpt),
        "--work-dir",
        str(tmp_path / "test"),
        "--metrics-out",
        str(out),
        "--out",
        str(tmp_path / "preds.pkl"),
    )
    summary = json.loads(out.read_text())
    for kind in ("bbox", "segm"):
        for name in COCO_METRICS:
            value = summary["metrics"][f"coco/{kind}_{name}"]
            assert -1.0 <= value <= 1.0
    assert summary["num_images"] == 4 and summary["images_per_s"] > 0
    assert (tmp_path / "preds.pkl").stat().st_size > 0


def test_svit_fine_tune_from_dense_then_test_reports_keep_rates(tmp_path):
    dense_cfg = write_tiny_config(tmp_path, max_iters=2)
    train(dense_cfg, tmp_path / "dense")
    svit_dir = tmp_path / "svit"
    svit_dir.mkdir()
    svit_cfg = write_tiny_config(
        svit_dir,
        base=ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py",
        extra=(
            f"load_from = '{tmp_path}/dense/iter_2.pth'\n"
            "model = dict(backbone=dict(depth=4, reducer=dict(blocks=[2, 3], keep_targets=[0.7, 0.49])))\n"
            "custom_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=3)]"
        ),
    )
    log = train(svit_cfg, svit_dir / "work").stdout
    assert "Load checkpoint from" in log and "loss_svit_ratio" in log and "keep_rate.block3" in log
    assert "SViT thresholds calibrated on 3 training batches" in log
    state = torch.load(svit_dir / "work/iter_4.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert state["backbone.reducer.calibration_steps"].tolist() == [3, 3]
    assert (state["backbone.reducer.thresholds"] > 0).all()
    out = tmp_path / "svit_metrics.json"
    run(
        sys.executable,
        "tools/test.py",
        str(svit_cfg),
        str(svit_dir / "work/iter_4.pth"),
        "--work-dir",
        str(svit_dir / "test"),
        "--metrics-out",
        str(out),
    )
    metrics = json.loads(out.read_text())["metrics"]
    assert 0 < metrics["keep_rate/block2"] <= 1 and 0 < metrics["keep_rate/block3"] <= 1
    assert metrics["coco/bbox_mAP"] >= 0
    per_image = json.loads((svit_dir / "test/token_stats_test.json").read_text())
    assert len(per_image["block3"]) == 4


def test_resume_continues_from_saved_iteration(tmp_path):
    cfg = write_tiny_config(tmp_path)
    work = tmp_path / "work"
    first = train(cfg, work, "--cfg-options", "train_cfg.max_iters=2")  # the run that was interrupted at 2
    assert "Iter(train) [2/2]" in first.stdout + first.stderr
    second = train(cfg, work, "--resume")
    log = second.stdout + second.stderr
    assert "resumed" in log.lower()
    assert "Iter(train) [3/4]" in log and "Iter(train) [1/4]" not in log
    assert checkpoint_iter(work / "iter_4.pth") == 4


def test_two_process_gloo_training_saves_a_checkpoint(tmp_path):
    cfg = write_tiny_config(tmp_path, max_iters=2)
    proc = run(
        "bash", "tools/dist_train.sh", str(cfg), "2", "--work-dir", str(tmp_path / "work"), env={"PORT": "29517"}
    )
    log = proc.stdout + proc.stderr
    assert "Distributed training: True" in log
    assert "distributed on CPU with gloo, world size 2" in log
    assert checkpoint_iter(tmp_path / "work/iter_2.pth") == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        ("model = dict(backbone=dict(type='NoSuchViT'))", "unknown backbone type 'NoSuchViT'"),
        (
            "train_dataloader = dict(dataset=dict(generate=None, data_root='/no/such/dir/'))",
            "dataset folder not found: /no/such/dir/",
        ),
        ("load_from = '/no/such/model.pth'", "load_from checkpoint not found"),
        ("model = dict(backbone=dict(reducer=dict(type='NoSuchReducer')))", "unknown reducer type 'NoSuchReducer'"),
        (
            "model = dict(backbone=dict(reducer=dict(type='SViT', blocks=[2, 3], keep_targets=[0.7, 1.5])))",
            "keep_targets must each be in (0, 1]",
        ),
        (
            "model = dict(backbone=dict(reducer=dict(type='SViT', blocks=[1, 2, 3], keep_targets=[0.7, 0.5])))",
            "keep_targets needs one value per reducing block",
        ),
    ],
)
def test_bad_config_gives_one_clear_message(tmp_path, extra, message):
    cfg = write_tiny_config(tmp_path, extra=extra)
    proc = train(cfg, tmp_path / "work", ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_annotation_file_that_is_not_coco(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/ann.json").write_text(json.dumps([{"file": "a.png", "boxes": []}]))
    extra = f"train_dataloader = dict(dataset=dict(generate=None, data_root='{tmp_path}/data/', ann_file='ann.json'))"
    proc = train(write_tiny_config(tmp_path, extra=extra), tmp_path / "work", ok=False)
    assert proc.returncode == 2 and "is not COCO instances format" in proc.stderr


def test_weights_for_another_model_size(tmp_path):
    import timm

    torch.save({"model": timm.create_model("deit_small_patch16_224").state_dict()}, tmp_path / "deit_s.pth")
    extra = f"model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='{tmp_path}/deit_s.pth')))"
    proc = train(write_tiny_config(tmp_path, extra=extra), tmp_path / "work", ok=False)
    assert proc.returncode == 2
    assert "different model size" in proc.stderr and "Traceback" not in proc.stderr
