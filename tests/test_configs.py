"""Every config under configs/ parses, and its detector builds, runs one training step and one prediction."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import InstanceData

ROOT = Path(__file__).resolve().parents[1]
# detector configs: every file but the bases and the study files (tools/analysis_tools/study.py reads those)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.py") if not {"_base_", "study"} & set(p.parts))

register_all_modules()


def make_batch(num_classes: int, size: int = 128, n: int = 2) -> dict:
    rng = np.random.default_rng(0)
    inputs, samples = [], []
    for i in range(n):
        inputs.append(torch.from_numpy(rng.integers(0, 255, (3, size, size), dtype=np.uint8)))
        masks = np.zeros((2, size, size), dtype=np.uint8)
        masks[0, 10:60, 20:70] = 1
        masks[1, 50:120, 40:100] = 1
        gt = InstanceData(
            bboxes=torch.tensor([[20.0, 10.0, 70.0, 60.0], [40.0, 50.0, 100.0, 120.0]]),
            labels=torch.tensor([i % num_classes, (i + 1) % num_classes]),
            masks=BitmapMasks(masks, size, size),
        )
        meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0), pad_shape=(size, size))
        samples.append(DetDataSample(gt_instances=gt, metainfo=meta))
    return {"inputs": inputs, "data_samples": samples}


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "mask-rcnn_vit-t_simplefpn_shapes.py" in names
    assert {f"mask-rcnn_deit-{s}_simplefpn_3x_coco.py" for s in "tsb"} <= names
    assert {"mask-rcnn_svit-t_simplefpn_shapes.py", "mask-rcnn_svit-s_simplefpn_4e_coco.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_builds_trains_and_predicts(path):
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports["imports"] == ["tokenprune"]
    assert isinstance(cfg.randomness.seed, int)  # every run is seeded: the same command repeats its figures
    cfg.model.backbone.init_cfg = None  # pretrained files are not on this machine
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    num_classes = cfg.model.roi_head.bbox_head.num_classes
    model.train()
    data = model.data_preprocessor(make_batch(num_classes), training=True)
    losses = model.loss(data["inputs"], data["data_samples"])
    reducer = cfg.model.backbone.get("reducer")
    if reducer is not None:
        if any(p.requires_grad for p in model.backbone.reducer.parameters()):  # training-free ones have no loss
            prefix = f"loss_{reducer['type'].lower()}_"  # e.g. loss_svit_ratio, loss_tpc_budget
            assert any(k.startswith(prefix) for k in losses)
            assert all(v >= 0 for k, v in losses.items() if k.startswith(prefix))
        # every method names its reduced blocks the same way (reducers/base.py), and reports a keep rate at each
        blocks = model.backbone.reducer.reduced_blocks(model.backbone.depth)
        assert blocks and all(f"keep_rate.block{b}" in losses for b in blocks)
    total = sum(v.sum() for k, v in losses.items() if "loss" in k and isinstance(v, torch.Tensor))
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(make_batch(num_classes), training=False)
        results = model.predict(data["inputs"], data["data_samples"])
        feats = model.extract_feat(data["inputs"])
    # mmcv's RoIAlign reads raw memory as contiguous NCHW: a channels-last map would give the RoI heads
    # scrambled features without any error (this once kept every SimpleFPN model from learning)
    assert all(f.is_contiguous() for f in feats)
    assert len(results) == 2
    for r in results:
        pred = r.pred_instances
        assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels) == len(pred.masks)
