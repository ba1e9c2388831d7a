"""MMDetection's own tools/analysis_tools/get_flops.py on token-reducer models: it counts FLOPs with
mmengine's ``get_model_complexity_info``, which traces the model with ``torch.jit`` on a tensor input. Inside
the trace sizes are 0-dim tensors, and a few ops have no traced form for scalar arguments; the reducers must
trace (keep counts from ``int(n)``, never ``round()`` of a tensor; no ``scatter`` / ``full`` with a bool
scalar). The count follows the tokens the traced forward really ran (attention itself is not counted by
mmengine: it has no handle for ``scaled_dot_product_attention``); ``tools/analysis_tools/get_flops.py`` (ours)
counts every block from the realised tokens."""

import os
import subprocess
import sys
from pathlib import Path

import mmdet
import pytest
import torch
from mmengine.analysis import get_model_complexity_info
from test_tools import ROOT, write_tiny_config

from tokenprune.models import ViT
from tokenprune.models.reducers import REDUCERS, build_reducer

MMDET_GET_FLOPS = Path(mmdet.__file__).parent / ".mim/tools/analysis_tools/get_flops.py"
CLS_FREE = {
    "SViT": dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343]),
    "TPC": dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343]),
    "DynamicViT": dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343]),
    "EViT": dict(blocks=[1, 2, 3], keep_ratio=0.7, score="mean_attention"),
    "PPT": dict(blocks=[1, 2, 3], keep_ratio=0.7, importance="mean"),
    "BAT": dict(blocks=[1, 2, 3], keep_ratio=0.7, importance="mean"),
    "ToMe": dict(),
}


def traced_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """What MMDetection's get_flops.py computes: mmengine's jit-traced count on a tensor input."""
    return get_model_complexity_info(model, inputs=(x,), show_table=False, show_arch=False)["flops"]


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_traced_flop_count_of_every_reducer(name):
    torch.manual_seed(0)
    dense = ViT(img_size=64, embed_dim=48, depth=4, num_heads=3).eval()
    reduced = ViT(
        img_size=64, embed_dim=48, depth=4, num_heads=3, reducer=build_reducer(dict(type=name, **CLS_FREE[name]), 48)
    )
    reduced.load_state_dict(dense.state_dict(), strict=False)
    reduced.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = reduced(x)
    assert 0 < traced_flops(reduced, x) < traced_flops(dense, x)  # the trace ran the kept tokens only
    with torch.no_grad():
        assert torch.equal(reduced(x), want)  # tracing left the model as it was


@pytest.mark.parametrize(
    "extra",
    [
        "model = dict(type='TokenPruneMaskRCNN', backbone=dict(depth=4, reducer=dict(type='SViT', blocks=[2, 3], "
        "keep_targets=[0.7, 0.49])))",
        "model = dict(type='TokenPruneMaskRCNN', backbone=dict(depth=4, reducer=dict(type='DynamicViT', "
        "blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])))",
        "model = dict(type='TokenPruneMaskRCNN', backbone=dict(depth=4, reducer=dict(type='TPC', "
        "blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])))",
    ],
    ids=["SViT", "DynamicViT", "TPC"],
)
def test_mmdetection_get_flops_script_on_a_reducer_config(tmp_path, extra):
    if not MMDET_GET_FLOPS.is_file():
        pytest.skip(f"MMDetection's get_flops.py is not installed with mmdet ({MMDET_GET_FLOPS})")
    cfg = write_tiny_config(tmp_path, extra=extra)
    proc = subprocess.run(
        [sys.executable, str(MMDET_GET_FLOPS), str(cfg), "--num-images", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "projects")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Flops: " in proc.stdout and "Params: " in proc.stdout
