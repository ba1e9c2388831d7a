"""The COCO configs end to end on a user's own COCO-format data (docs/own_data.md), so that they cannot rot.

A tiny COCO-layout dataset with its own two classes (polygon and RLE masks, category ids 3 and 7) is written
here; tools/train.py trains on it for 2 iterations and tools/test.py evaluates the result, as a user runs them,
for the dense DeiT-T and SViT-T COCO configs (with the documented ``--cfg-options`` override for a short first
run) and for the example configs under configs/examples/ (copied and edited in their one block, as the doc says).
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from test_tools import COCO_METRICS, ROOT, run

CLASSES = ("apple", "pear")
CATEGORIES = [
    {"id": 3, "name": "apple", "supercategory": "fruit"},
    {"id": 7, "name": "pear", "supercategory": "fruit"},
]
IMAGE_W, IMAGE_H = 128, 96
NUM_TRAIN, NUM_VAL = 4, 2  # batch 2: one epoch is 2 iterations
DENSE_T = ROOT / "configs/dense/mask-rcnn_deit-t_simplefpn_3x_coco.py"
SVIT_T = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_6e_coco.py"
EXAMPLES = ROOT / "configs/examples"
DENSE_EXAMPLE = "mask-rcnn_deit-s_simplefpn_own-coco.py"
SVIT_EXAMPLE = "mask-rcnn_svit-s_simplefpn_own-coco.py"
DOC = ROOT / "docs/own_data.md"

# docs/own_data.md, "Our COCO configs as they are, with --cfg-options", a short first run: smaller images in
# train, val and test (separate copies), one epoch, a warm-up shorter than the run (2 iterations: mmengine's
# LinearLR is at the full rate from iteration end - 1 on, and never with end=1); here at the test's sizes
FIRST_RUN = [
    "train_dataloader.dataset.pipeline.2.scale=[(128,96),(128,128)]",
    "val_dataloader.dataset.pipeline.1.scale=(128,128)",
    "test_dataloader.dataset.pipeline.1.scale=(128,128)",
    "train_cfg.max_epochs=1",
    "param_scheduler.0.end=2",
]
# the same section: your own classes
OWN_CLASSES = [
    *(
        f"{loader}.dataset.metainfo.classes=({','.join(CLASSES)})"
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
    ),
    f"model.roi_head.bbox_head.num_classes={len(CLASSES)}",
    f"model.roi_head.mask_head.num_classes={len(CLASSES)}",
]
# test only: no ImageNet weights on this machine, no dataloader workers; for speed: fewer proposals and
# sampled RoIs, checkpoints without the optimizer state
TINY = [
    "model.backbone.init_cfg=None",
    *(
        f"{loader}.{key}"
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
        for key in ("num_workers=0", "persistent_workers=False")
    ),
    "model.train_cfg.rpn_proposal.max_per_img=100",
    "model.train_cfg.rcnn.sampler.num=64",
    "model.test_cfg.rpn.max_per_img=100",
    "default_hooks.checkpoint.save_optimizer=False",  # a third of the file to write and read
]


def write_split(root: Path, split: str, num_images: int) -> None:
    """``num_images`` images of IMAGE_W x IMAGE_H, each with an apple (a triangle, polygon mask) and a pear (a
    rectangle, compressed RLE mask), in ``root/{split}2017/`` and ``root/annotations/instances_{split}2017.json``."""
    rng = np.random.default_rng(len(split))
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        image = Image.new("RGB", (IMAGE_W, IMAGE_H), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(image)
        x, y = 6 + 5 * i, 8 + 2 * i
        triangle = [x, y, x + 40, y, x + 20, y + 36]
        draw.polygon(triangle, fill=(230, 60, 60))
        pear = np.zeros((IMAGE_H, IMAGE_W), dtype=np.uint8)
        x, y = 66 - 4 * i, 48 + 2 * i
        pear[y : y + 36, x : x + 48] = 1
        image.paste((60, 200, 90), (x, y, x + 48, y + 36))
        rle = mask_utils.encode(np.asfortranarray(pear))
        rle["counts"] = rle["counts"].decode()
        image_id = 100 + i
        for category_id, segmentation, bbox, area in (
            (3, [[float(v) for v in triangle]], [triangle[0], triangle[1], 40, 36], 720.0),
            (7, rle, [x, y, 48, 36], float(pear.sum())),
        ):
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=category_id,
                    segmentation=segmentation,
                    bbox=bbox,
                    area=area,
                    iscrowd=0,
                )
            )
        name = f"{image_id:012d}.jpg"
        image.save(root / f"{split}2017" / name, quality=95)
        images.append(dict(id=image_id, file_name=name, width=IMAGE_W, height=IMAGE_H))
    (root / "annotations").mkdir(exist_ok=True)
    ann = dict(images=images, annotations=annotations, categories=CATEGORIES)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(ann))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """A tiny dataset in COCO's layout: annotations/instances_{train,val}2017.json, train2017/, val2017/."""
    root = tmp_path_factory.mktemp("own_coco")
    write_split(root, "train", NUM_TRAIN)
    write_split(root, "val", NUM_VAL)
    return root


def coco_env(root: Path) -> dict:
    return {"COCO_ROOT": f"{root}/"}


def assert_trained(work_dir: Path, log: str, base_lr: str) -> Path:
    """Training ran its 2 iterations past the shortened warm-up, gave all 12 COCO figures for boxes and masks in
    its val loop, and saved a checkpoint whose dataset meta carries the own classes; returns the checkpoint."""
    assert "Epoch(train) [1][2/2]" in log
    assert f"base_lr: {base_lr} lr: {base_lr}" in log  # the warm-up is over, not stretched across the run
    val = [line for line in log.splitlines() if "Epoch(val) [1][2/2]" in line]  # the val loop, on the val copy
    assert len(val) == 1 and all(f"coco/{k}_{n}: " in val[0] for k in ("bbox", "segm") for n in COCO_METRICS)
    ckpt = work_dir / "epoch_1.pth"
    assert ckpt.is_file()
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["meta"]
    assert meta["iter"] == 2 and tuple(meta["dataset_meta"]["classes"]) == CLASSES
    return ckpt


def run_test(cfg: Path, ckpt: Path, out_dir: Path, *extra: str, env: dict | None = None) -> dict:
    """tools/test.py; asserts all 12 COCO figures for boxes and masks on the val images, returns the metrics."""
    out = out_dir / "metrics.json"
    run(
        sys.executable,
        "tools/test.py",
        str(cfg),
        str(ckpt),
        "--work-dir",
        str(out_dir),
        "--metrics-out",
        str(out),
        *extra,
        env=env,
    )
    summary = json.loads(out.read_text())
    assert summary["num_images"] == NUM_VAL
    for kind in ("bbox", "segm"):
        for name in COCO_METRICS:
            assert -1.0 <= summary["metrics"][f"coco/{kind}_{name}"] <= 1.0
    return summary["metrics"]


def train(cfg: Path, work_dir: Path, *extra: str, env: dict | None = None) -> str:
    """tools/train.py; returns its log."""
    proc = run(sys.executable, "tools/train.py", str(cfg), "--work-dir", str(work_dir), *extra, env=env)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dense_t_checkpoint(coco_root, tmp_path_factory) -> Path:
    """The dense DeiT-T COCO config, unchanged, trained for 2 iterations with the documented override."""
    work = tmp_path_factory.mktemp("dense_t")
    log = train(DENSE_T, work, "--cfg-options", *FIRST_RUN, *OWN_CLASSES, *TINY, env=coco_env(coco_root))
    return assert_trained(work, log, "1.0000e-04")


def test_dense_deit_t_coco_config_trains_and_tests(coco_root, dense_t_checkpoint, tmp_path):
    run_test(
        DENSE_T,
        dense_t_checkpoint,
        tmp_path,
        "--cfg-options",
        *FIRST_RUN,
        *OWN_CLASSES,
        *TINY,
        env=coco_env(coco_root),
    )


def test_svit_t_coco_config_fine_tunes_from_dense_and_tests(coco_root, dense_t_checkpoint, tmp_path):
    options = [
        *FIRST_RUN,
        *OWN_CLASSES,
        *TINY,
        f"load_from={dense_t_checkpoint}",
        "custom_hooks.1.num_batches=2",  # SViTCalibrationHook after the last iteration (default 50 batches)
    ]
    log = train(SVIT_T, tmp_path / "work", "--cfg-options", *options, env=coco_env(coco_root))
    assert "Load checkpoint from" in log and "loss_svit_ratio" in log
    assert "SViT thresholds calibrated on 2 training batches" in log
    ckpt = assert_trained(tmp_path / "work", log, "1.0000e-05")
    metrics = run_test(SVIT_T, ckpt, tmp_path / "test", "--cfg-options", *options, env=coco_env(coco_root))
    assert all(0 < metrics[f"keep_rate/block{b}"] <= 1 for b in range(3, 12))


def edit_block(text: str, **values) -> str:
    """What a user does to an example config: set the values of its edit block (one line each)."""
    for name, value in values.items():
        text, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, flags=re.MULTILINE)
        assert count == 1, f"{name} is not a one-line setting of the example's block"
    return text


def copy_example(name: str, folder: Path, **values) -> Path:
    """The example, copied out of configs/examples/ (its ../ bases made absolute) with its block edited."""
    text = (EXAMPLES / name).read_text().replace("'../", f"'{ROOT}/configs/")
    path = folder / name
    path.write_text(edit_block(text, **values))
    return path


def test_example_configs_on_own_data(coco_root, tmp_path):
    """The recipe of docs/own_data.md: edit the dense example's block (data, classes, sizes, schedule) and train
    it; then the SViT example, which takes the data from it, fine-tuned from its checkpoint, and test that."""
    folder = tmp_path / "configs"
    folder.mkdir()
    dense = copy_example(
        DENSE_EXAMPLE,
        folder,
        data_root=str(coco_root),  # no trailing slash: the example joins paths
        classes=CLASSES,
        train_scales=[(128, 96), (128, 128)],
        test_scale=(128, 128),
        max_epochs=1,
        warmup_iters=2,
    )
    cfg = Config.fromfile(str(dense))
    loaders = [cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader]
    assert [loader.dataset.metainfo.classes for loader in loaders] == [CLASSES] * 3
    assert [loader.dataset.pipeline[2 if loader is cfg.train_dataloader else 1].scale for loader in loaders] == [
        [(128, 96), (128, 128)],
        (128, 128),
        (128, 128),
    ]
    assert cfg.model.roi_head.bbox_head.num_classes == cfg.model.roi_head.mask_head.num_classes == len(CLASSES)
    log = train(dense, tmp_path / "dense", "--cfg-options", *TINY)
    dense_ckpt = assert_trained(tmp_path / "dense", log, "1.0000e-04")  # its val loop evaluated it

    svit = copy_example(
        SVIT_EXAMPLE, folder, load_from=str(dense_ckpt), max_epochs=1, warmup_iters=0, calibration_batches=2
    )
    assert [s.type for s in Config.fromfile(str(svit)).param_scheduler] == ["MultiStepLR"]  # 0: no warm-up
    log = train(svit, tmp_path / "svit", "--cfg-options", *TINY)
    assert "SViT thresholds calibrated on 2 training batches" in log
    svit_ckpt = assert_trained(tmp_path / "svit", log, "1.0000e-05")
    metrics = run_test(svit, svit_ckpt, tmp_path / "svit_test", "--cfg-options", *TINY)
    assert 0 < metrics["keep_rate/block11"] <= 1


# the DeiT SimpleFPN COCO configs and the token-reduction ones built on them, for which the doc's table holds
DEIT_COCO = sorted(
    p
    for folder in ("dense", "svit", "ppt", "tpc", "bat", "evit", "tome", "dynamicvit")
    for p in (ROOT / "configs" / folder).glob("*_coco.py")
)


def test_deit_coco_configs_found():
    names = {p.name for p in DEIT_COCO}
    assert {DENSE_T.name, SVIT_T.name, "mask-rcnn_svit-s_simplefpn_4e_coco.py"} <= names and len(names) >= 10


@pytest.mark.parametrize("path", DEIT_COCO, ids=lambda p: p.name)
def test_documented_override_points_at_the_scales_and_the_warm_up(path):
    """The list indices the doc's table names are the resize steps and the warm-up in each of these configs."""
    cfg = Config.fromfile(str(path))
    assert cfg.train_dataloader.dataset.pipeline[2].type == "RandomResize"
    for loader in (cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.pipeline[1].type == "Resize"
    warm_up = cfg.param_scheduler[0]
    assert warm_up.type == "LinearLR" and not warm_up.by_epoch and warm_up.end == 500
    hooks = [h["type"] for h in cfg.get("custom_hooks", [])]
    if "SViTCalibrationHook" in hooks:
        assert hooks.index("SViTCalibrationHook") == 1


def test_doc_names_what_this_test_runs():
    doc = DOC.read_text()
    for option in FIRST_RUN + OWN_CLASSES + ["custom_hooks.1.num_batches"]:
        assert option.split("=")[0] in doc, option
    for name in (DENSE_EXAMPLE, SVIT_EXAMPLE):
        assert f"configs/examples/{name}" in doc
