"""Reliability (issue 8) as a user meets it, through tools/train.py and tools/test.py in subprocesses: a run
killed with SIGKILL and resumed matches an uninterrupted one exactly, a NaN loss stops training with one
message, an unreadable image is named, and a legacy checkpoint needs --trust-checkpoint. Tiny models on a few
64x64 images of the embedded shapes data; docs/reliability.md lists every case and its test."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mmengine.logging import HistoryBuffer

import tokenprune  # noqa: F401  (allow-lists mmengine's checkpoint contents for torch.load)

ROOT = Path(__file__).resolve().parents[1]
SVIT_CFG = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"


def write_config(folder: Path, max_iters: int = 9, checkpoint_every: int = 3, extra: str = "") -> Path:
    """SViT on a 2-block, 48-channel ViT with narrow heads; 16 train / 4 val images of 64x64, one dataloader
    worker, logged every iteration without smoothing, a fixed seed and deterministic algorithms."""
    cfg = folder / "tiny_svit.py"
    cfg.write_text(f"""
_base_ = '{SVIT_CFG}'
data_root = '{folder}/shapes/'
generate = dict(seed=0, num_train=16, num_val=4, image_size=(64, 64))
train_dataloader = dict(batch_size=2, num_workers=1, persistent_workers=True,
                        dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
load_from = None
model = dict(
    backbone=dict(depth=2, embed_dim=48, num_heads=2, img_size=64,
                  reducer=dict(gated_blocks=[1], keep_targets=[0.7])),
    neck=dict(in_channels=48, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32), bbox_head=dict(in_channels=32, fc_out_channels=32),
                  mask_roi_extractor=dict(out_channels=32),
                  mask_head=dict(num_convs=1, in_channels=32, conv_out_channels=32)))
train_cfg = dict(max_iters={max_iters}, val_interval=1000)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end={max_iters})]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={checkpoint_every}, max_keep_ckpts=10))
log_processor = dict(window_size=1)
custom_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=2)]
randomness = dict(seed=0, deterministic=True)
{extra}
""")
    return cfg


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train(cfg: Path, work_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "tools/train.py", str(cfg), "--work-dir", str(work_dir), *extra]
    return subprocess.run(args, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)


def logged(work_dir: Path) -> dict[int, dict]:
    """Iteration -> the scalars logged for it (loss terms, lr, keep rates), over every run in the work dir."""
    out = {}
    for path in sorted(glob.glob(f"{work_dir}/*/vis_data/scalars.json")):
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                out[row["iter"]] = {k: v for k, v in row.items() if "loss" in k or k in ("lr", "grad_norm")}
    return out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = write_config(tmp_path)
    reference = tmp_path / "reference"
    proc = train(cfg, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        args = [sys.executable, "tools/train.py", str(cfg), "--work-dir", str(work)]
        killed = subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT)
        pointer, deadline = work / "last_checkpoint", time.time() + 300
        while killed.poll() is None and time.time() < deadline:
            if pointer.is_file() and pointer.read_text().endswith("iter_3.pth"):
                killed.send_signal(signal.SIGKILL)  # mid-run, as a preempted cluster job
                break
            time.sleep(0.01)
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"
    assert not (work / "iter_9.pth").exists()

    resumed = train(cfg, work, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed epoch: 0, iter: 3" in log and "random state restored from iteration 3" in log
    assert "Iter(train) [4/9]" in log and "Iter(train) [1/9]" not in log

    want, got = logged(reference), logged(work)
    assert sorted(want) == sorted(got) == list(range(1, 10))
    for it in range(1, 10):  # same losses (detector and SViT ratio loss), learning rate and gradient norm
        assert got[it] == want[it], f"iteration {it}: {got[it]} != {want[it]}"

    a, b = load(reference / "iter_9.pth"), load(work / "iter_9.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"] == 9
    assert_same_tensors(a["state_dict"], b["state_dict"], "state_dict")  # incl. SViT's calibrated thresholds
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")  # AdamW moments and step counts
    assert_same_tensors(a["param_schedulers"], b["param_schedulers"], "param_schedulers")
    saved = load(work / "iter_3.pth")  # written by the killed run and resumed from: 6 scheduler steps since
    assert saved["param_schedulers"][0]["_global_step"] == 3 and b["param_schedulers"][0]["_global_step"] == 9


def test_nan_loss_stops_training_with_one_message(tmp_path):
    cfg = write_config(tmp_path, max_iters=6, checkpoint_every=1)
    # AdamW moves every weight by about lr per step: at 1e30 the second forward overflows to inf/NaN
    proc = train(cfg, tmp_path / "work", "--cfg-options", "optim_wrapper.optimizer.lr=1e30")
    assert proc.returncode == 2
    assert "error: training stopped at iteration 2: the loss is not finite (loss=nan" in proc.stderr
    assert f"the last checkpoint, {tmp_path}/work/iter_1.pth, with tools/train.py CONFIG --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "work/iter_1.pth").is_file() and not (tmp_path / "work/iter_2.pth").exists()


def test_corrupted_image_is_named(tmp_path):
    cfg = write_config(tmp_path)
    from tokenprune.data import make_shapes_dataset

    make_shapes_dataset(str(tmp_path / "shapes"), seed=0, num_train=16, num_val=4, image_size=(64, 64))
    broken = tmp_path / "shapes/train/000005.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest was lost")
    proc = train(cfg, tmp_path / "work")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: image {broken} could not be read: it could not be decoded" in proc.stderr
    assert "remove its entry from the annotation file" in proc.stderr and "Traceback" not in proc.stderr


def test_legacy_checkpoint_needs_trust_checkpoint_in_tools_test(tmp_path, monkeypatch):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.logging import MessageHub

    cfg = write_config(tmp_path)
    model = MODELS.build(Config.fromfile(str(cfg)).model)
    hub = MessageHub.get_instance("test_reliability_tools_legacy")
    hub.update_scalar("train/loss", 1.5)
    ckpt = {"meta": {"iter": 1, "epoch": 0}, "state_dict": model.state_dict(), "message_hub": hub.state_dict()}

    def mmengine_getstate(self):  # mmengine 0.10.7's HistoryBuffer.__getstate__, which tokenprune replaces
        self.__dict__.update(statistics_methods=self._statistics_methods)
        return self.__dict__

    legacy = tmp_path / "legacy.pth"
    with monkeypatch.context() as m:
        m.setattr(HistoryBuffer, "__getstate__", mmengine_getstate)
        torch.save(ckpt, legacy)  # as plain mmengine writes it: with builtins.getattr

    def test(*extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "tools/test.py", str(cfg), str(legacy), "--work-dir", str(tmp_path / "test"), *extra]
        return subprocess.run(args, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)

    refused = test()
    assert refused.returncode == 2
    assert f"error: refused to load checkpoint {legacy}" in refused.stderr and "builtins.getattr" in refused.stderr
    assert "--trust-checkpoint" in refused.stderr and "Traceback" not in refused.stderr
    trusted = test("--trust-checkpoint", "--metrics-out", str(tmp_path / "metrics.json"))
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "with full unpickling (explicitly trusted)" in trusted.stdout + trusted.stderr
    assert "coco/bbox_mAP" in json.loads((tmp_path / "metrics.json").read_text())["metrics"]
