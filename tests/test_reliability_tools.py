"""Reliability (issue 8) as a user meets it, through tools/train.py and tools/test.py in subprocesses: a run
killed with SIGKILL and resumed matches an uninterrupted one exactly, a NaN loss stops training with one
message, an unreadable image is named, and a legacy checkpoint needs --trust-checkpoint. Issue 14: a
checkpoint that does not fit the model is refused (--allow-partial-load loads it), testing a COCO config needs
no ImageNet file and takes COCO_ROOT without a trailing slash, an unannotated evaluation file is refused, and
dataloader workers end with a killed run. Tiny models on a few 64x64 images of the embedded shapes data;
docs/reliability.md lists every case and its test."""

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
                  reducer=dict(blocks=[1], keep_targets=[0.7])),
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


# ---------------------------------------------------------------------------------------------------------
# issue 14: checkpoints that do not fit, files a step does not read, evaluation files without annotations,
# dataloader workers of a killed run


def run_test(cfg, checkpoint: Path, work: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "tools/test.py", str(cfg), str(checkpoint), "--work-dir", str(work), *extra]
    return subprocess.run(
        args, cwd=ROOT, env={**environment(), **(env or {})}, capture_output=True, text=True, timeout=600
    )


def save_model(cfg_path: Path, path: Path, drop: str | None = None) -> Path:
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    state = MODELS.build(Config.fromfile(str(cfg_path)).model).state_dict()
    state = {k: v for k, v in state.items() if not (drop and k.startswith(drop))}
    torch.save({"meta": {"iter": 1, "epoch": 0}, "state_dict": state}, path)
    return path


def test_tools_test_refuses_a_dense_checkpoint_for_svit_unless_partial_load_is_allowed(tmp_path):
    cfg = write_config(tmp_path)
    dense = save_model(cfg, tmp_path / "dense.pth", drop="backbone.reducer.")
    refused = run_test(cfg, dense, tmp_path / "test")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (
        f"error: checkpoint {dense} does not fit the model of {cfg}: it looks like a dense checkpoint for an SViT "
        "model: its gates are untrained. 8 of the model's" in refused.stderr
    )
    assert "pass --allow-partial-load" in refused.stderr and "Traceback" not in refused.stderr
    metrics = tmp_path / "metrics.json"
    partial = run_test(cfg, dense, tmp_path / "test", "--allow-partial-load", "--metrics-out", str(metrics))
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert f"--allow-partial-load: loading {dense} although it does not fit the model" in partial.stdout
    assert "coco/bbox_mAP" in json.loads(metrics.read_text())["metrics"]


def fake_coco(root: Path, annotations: bool = True) -> None:
    """A COCO 2017 folder with one 32x32 validation image and COCO's 80 categories."""
    from mmdet.datasets import CocoDataset
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.new("RGB", (32, 32)).save(root / "val2017/000000000001.jpg")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CocoDataset.METAINFO["classes"])]
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 8], "area": 64, "iscrowd": 0}]
    coco = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 32, "width": 32}],
        "annotations": ann if annotations else [],
        "categories": categories,
    }
    (root / "annotations/instances_val2017.json").write_text(json.dumps(coco))


def test_tools_test_on_coco_reads_no_imagenet_file_and_names_a_resnet_checkpoint(tmp_path):
    fake_coco(tmp_path / "coco")
    resnet = {
        "backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
        "backbone.bn1.weight": torch.zeros(64),
        "backbone.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 1024),
    }
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    cfg = "configs/dense/mask-rcnn_deit-t_simplefpn_3x_coco.py"
    proc = run_test(
        cfg,
        tmp_path / "resnet.pth",
        tmp_path / "test",
        "--cfg-options",
        "model.backbone.init_cfg.checkpoint=/no/such/deit_tiny.pth",
        env={"COCO_ROOT": str(tmp_path / "coco")},  # no trailing slash
    )
    assert proc.returncode == 2
    assert "pretrained backbone weights not found" not in proc.stderr  # testing never reads them
    assert "annotation file not found" not in proc.stderr  # the evaluator's path is joined, not concatenated
    assert f"error: checkpoint {tmp_path}/resnet.pth does not fit the model of {cfg}: it looks like a ResNet " in (
        proc.stderr
    )
    assert "checkpoint for a ViT model" in proc.stderr and "Traceback" not in proc.stderr


def test_tools_test_refuses_an_evaluation_file_without_annotations(tmp_path):
    from tokenprune.data import make_shapes_dataset

    cfg = write_config(tmp_path)
    make_shapes_dataset(str(tmp_path / "shapes"), seed=0, num_train=16, num_val=4, image_size=(64, 64))
    ann = json.loads((tmp_path / "shapes/annotations/instances_val.json").read_text())
    empty = tmp_path / "shapes/annotations/unlabelled.json"
    empty.write_text(json.dumps({**ann, "annotations": []}))
    options = [
        "test_dataloader.dataset.generate=None",
        "test_dataloader.dataset.ann_file=annotations/unlabelled.json",
        f"test_evaluator.ann_file={empty}",
    ]
    proc = run_test(cfg, save_model(cfg, tmp_path / "svit.pth"), tmp_path / "test", "--cfg-options", *options)
    assert proc.returncode == 2
    assert (
        f"error: annotation file {empty} lists 4 images but no annotations: every COCO metric would be -1.000"
        in proc.stderr
    )
    assert "pass --out preds.pkl or --show-dir DIR" in proc.stderr and "Traceback" not in proc.stderr


BLOCKING_TRANSFORM = """
import os
import time

from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS


@TRANSFORMS.register_module()
class BlockForever(BaseTransform):
    \"\"\"Writes the worker's pid, then blocks (as a worker stuck on a slow file system would).\"\"\"

    def __init__(self, pid_file):
        self.pid_file = pid_file

    def transform(self, results):
        with open(self.pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(self.pid_file + ".tmp", self.pid_file)
        time.sleep(3600)
        return results
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_dataloader_worker_ends_when_training_is_killed(tmp_path):
    (tmp_path / "block_forever.py").write_text(BLOCKING_TRANSFORM)
    pid_file = tmp_path / "worker.pid"
    cfg = write_config(
        tmp_path,
        extra=f"""
custom_imports = dict(imports=['tokenprune', 'block_forever'], allow_failed_imports=False)
train_dataloader = dict(num_workers=1, persistent_workers=False, dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'), dict(type='BlockForever', pid_file='{pid_file}'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True), dict(type='PackDetInputs')]))
""",
    )
    env = {**environment(), "PYTHONPATH": str(tmp_path)}
    args = [sys.executable, "tools/train.py", str(cfg), "--work-dir", str(tmp_path / "work")]
    with open(tmp_path / "train.log", "w") as log:
        trainer = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.time() + 300
        while trainer.poll() is None and time.time() < deadline and not pid_file.is_file():
            time.sleep(0.1)
        assert pid_file.is_file(), (tmp_path / "train.log").read_text()[-3000:]
        worker = int(pid_file.read_text())
        assert running(worker)
        trainer.send_signal(signal.SIGKILL)  # as the out-of-memory killer or a preempted job
        trainer.wait(timeout=60)
        deadline = time.time() + 20
        while running(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(worker), "the dataloader worker outlived the training process it belonged to"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if worker is not None and running(worker):
            os.kill(worker, signal.SIGKILL)  # the worker this test started, left behind
