"""Token statistics (tokenprune.analysis) on hand-made token maps and masks, the analysis tools
(tools/analysis_tools/visualize_tokens.py, token_stats.py) on a tiny SViT detector, and TokenStatsHook's
keep rates in the visualizer's scalars."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image
from pycocotools.coco import COCO

from tokenprune.analysis import (
    KEPT,
    MERGED,
    PRUNED_STATE,
    REACTIVATED,
    TokenStatistics,
    analyse_token_maps,
    keep_rates,
    patch_fractions,
    position_states,
    tokens_inside,
)
from tokenprune.models import SViTReducer, ViT

ROOT = Path(__file__).resolve().parents[1]
SVIT_CFG = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"
TOOLS = ROOT / "tools/analysis_tools"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

register_all_modules()


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# hand-made maps on a 2 x 3 grid of 16-pixel patches (a 32 x 48 input), two images, reducing blocks 2, 3, 5
P = PRUNED_STATE  # noqa: N816 (drawing state, not the map value)
MAPS = {
    2: torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 2, -1, -1, 5]]),
    3: torch.tensor([[0, -1, -1, 3, 4, -1], [7, 7, 7, 7, -1, 5]]),
    5: torch.tensor([[0, 1, 2, -1, 4, 5], [0, -1, -1, 3, 4, -1]]),
}


def hand_mask() -> torch.Tensor:
    """(2, 32, 48) object pixels: image 0 fills token (0, 0), half of token (0, 1) and a quarter of token
    (1, 0); image 1 fills token (1, 2) only."""
    mask = torch.zeros(2, 32, 48, dtype=torch.bool)
    mask[0, 0:16, 0:16] = True  # token 0: all pixels
    mask[0, 0:8, 16:32] = True  # token 1: half -> inside (>= 0.5)
    mask[0, 16:24, 0:8] = True  # token 3: a quarter -> background
    mask[1, 16:32, 32:48] = True  # token 5
    return mask


def test_inside_rule_is_at_least_half_of_the_pixels():
    fractions = patch_fractions(hand_mask(), 16)
    assert fractions[0].tolist() == [1.0, 0.5, 0.0, 0.25, 0.0, 0.0]
    inside = tokens_inside(hand_mask(), 16)
    assert inside.tolist() == [[True, True, False, False, False, False], [False, False, False, False, False, True]]
    assert tokens_inside(hand_mask(), 16, min_fraction=0.75)[0].tolist() == [True] + [False] * 5


def test_patch_fractions_pad_like_the_backbone():
    mask = torch.ones(20, 40)  # the backbone pads 20 x 40 to 32 x 48: 2 x 3 tokens
    fractions = patch_fractions(mask, 16)
    assert fractions.shape == (1, 6)
    expected = [1.0, 1.0, 0.5, 4 / 16, 4 / 16, 4 * 8 / 256]
    assert torch.allclose(fractions[0], torch.tensor(expected))
    with pytest.raises(ValueError, match="does not fit"):
        patch_fractions(mask, 16, grid_hw=(1, 3))


def test_token_map_analysis_by_hand():
    a = analyse_token_maps(MAPS)
    assert a.blocks == [2, 3, 5]
    # image 1, block 2: tokens {0, 2, 5} over 6 positions, positions 0 and 1 merged; block 3: {7, 5}
    assert torch.allclose(a.keep_rate[:, 0], torch.tensor([1.0, 3 / 6, 5 / 6]))
    assert torch.allclose(a.keep_rate[:, 1], torch.tensor([3 / 6, 2 / 6, 3 / 6]))
    assert torch.allclose(a.coverage[:, 1], torch.tensor([4 / 6, 5 / 6, 3 / 6]))
    assert a.cluster_size[1, 1].tolist() == [4, 4, 4, 4, 0, 1]
    # reactivated: image 1 at block 3 position 3 (away at block 2 only: gap 1); image 0 at block 5 positions
    # 1, 2, 5 (gap 1); image 1 at block 5 position 4 (pruned at blocks 2 and 3: gap 2)
    assert a.reactivated[1].tolist() == [[False] * 6, [False, False, False, True, False, False]]
    assert a.reactivated[2, 0].tolist() == [False, True, True, False, False, True]
    assert a.reactivated[2, 1].tolist() == [False, False, False, False, True, False]
    assert a.gap[a.reactivated].tolist() == [1, 1, 1, 1, 2]
    states = position_states(a, 1)
    assert states[0].tolist() == [MERGED, MERGED, KEPT, P, P, KEPT]
    assert states[1].tolist() == [MERGED, MERGED, MERGED, REACTIVATED, P, KEPT]  # reactivated shows first
    assert states[2].tolist() == [KEPT, P, P, KEPT, REACTIVATED, P]
    assert keep_rates(MAPS)[3].tolist() == a.keep_rate[1].tolist()


def test_reactivation_gap_counts_the_blocks_away():
    maps = {b: torch.tensor([[0 if b in (0, 4) else -1, 1]]) for b in range(5)}  # away at blocks 1, 2, 3
    a = analyse_token_maps(maps)
    assert a.reactivated[:, 0, 0].tolist() == [False, False, False, False, True]
    assert a.gap[4, 0, 0] == 3


def test_statistics_agree_with_a_hand_made_mask():
    stats = TokenStatistics()
    inside = tokens_inside(hand_mask(), 16)  # image 0: tokens 0, 1; image 1: token 5
    stats.update(MAPS, inside, image_ids=["a", "b"])
    s = stats.summary()
    assert s["blocks"] == [2, 3, 5] and s["num_images"] == 2
    obj = s["inside_objects"]
    assert obj["area_share"] == pytest.approx(3 / 12)
    # kept tokens inside / kept tokens, a token of k positions weighing 1/k:
    # block 2: image 0 keeps 6 tokens, 2 inside; image 1 keeps {0,1}(1 token, 0 inside), 2, 5 (inside): 1 of 3
    assert obj["kept_share"]["block2"] == pytest.approx(3 / 9)
    # block 3: image 0 keeps 0 (inside), 3, 4; image 1 keeps the 4-position token (outside) and 5 (inside)
    assert obj["kept_share"]["block3"] == pytest.approx(2 / 5)
    # block 5: image 0 keeps 0, 1 (inside), 2, 4, 5; image 1 keeps 0, 3, 4, none inside
    assert obj["kept_share"]["block5"] == pytest.approx(2 / 8)
    assert obj["keep_rate_inside"]["block3"] == pytest.approx(2 / 3)
    assert obj["keep_rate_background"]["block3"] == pytest.approx((5 - 2) / 9)
    # image 0 keeps 1 of 3 tokens inside, its area share is 2/6 (not above); image 1: 1/2 against 1/6
    assert obj["images_above_area_share"]["block3"] == pytest.approx(0.5)
    kr = s["keep_rate"]["block3"]
    assert kr["mean"] == pytest.approx((3 / 6 + 2 / 6) / 2) and kr["std"] == pytest.approx((3 / 6 - 2 / 6) / 2)
    assert s["per_image_keep_rate"]["values"] == pytest.approx([(1 + 3 / 6 + 5 / 6) / 3, (3 / 6 + 2 / 6 + 3 / 6) / 3])
    r = s["reactivation"]
    assert r["gap_histogram"] == {"1": 4, "2": 1} and r["share_at_gap_1"] == pytest.approx(0.8)
    assert r["per_block"]["block5"]["fraction_of_positions"] == pytest.approx((3 / 6 + 1 / 6) / 2)
    # reactivated tokens after the first reducing block / kept tokens there; at block 3 the reactivated
    # position is one of the 4 carried by token 7, so it counts 1/4: (1/4 + 3 + 1) / (5 + 8)
    assert r["share_of_kept_tokens"] == pytest.approx(4.25 / 13)
    assert r["positions_ever_reactivated"] == pytest.approx((3 / 6 + 2 / 6) / 2)
    assert [p["image_id"] for p in s["per_image"]] == ["a", "b"]
    table = stats.table().splitlines()
    assert table[3].split()[:2] == ["3", "0.417"] and "area share 0.250" in table[-1]


def test_padding_tokens_are_left_out_of_the_shares():
    valid = torch.tensor([[True] * 5 + [False], [True] * 6])
    stats = TokenStatistics()
    stats.update(MAPS, tokens_inside(hand_mask(), 16), valid)
    assert stats.summary()["inside_objects"]["area_share"] == pytest.approx(3 / 11)


def test_dense_and_bad_input():
    stats = TokenStatistics()
    stats.update({}, tokens_inside(hand_mask(), 16))
    s = stats.summary()
    assert s["blocks"] == [] and s["per_image_keep_rate"]["mean"] == 1.0
    assert s["inside_objects"]["area_share"] == pytest.approx(3 / 12)
    with pytest.raises(ValueError, match="of one shape"):
        analyse_token_maps({1: torch.zeros(2, 6, dtype=torch.long), 2: torch.zeros(2, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="inside must be"):
        TokenStatistics().update(MAPS, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="after batches of blocks"):
        stats = TokenStatistics()
        stats.update(MAPS)
        stats.update({2: MAPS[2]})


def test_keep_rates_from_maps_match_the_svit_reducer():
    torch.manual_seed(0)
    reducer = SViTReducer(48, blocks=(1, 2, 3), keep_targets=(0.7, 0.5, 0.3), inference="fixed")
    model = ViT(img_size=64, embed_dim=48, depth=4, num_heads=3, reducer=reducer).eval()
    model.record_tokens = True
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 96))
    rates = keep_rates(model.last_record.token_maps)
    assert sorted(rates) == [1, 2, 3]
    for block, r in rates.items():
        assert torch.allclose(r, model.last_record.stats[f"keep_rate_per_image.block{block}"])
    assert torch.allclose(rates[3], torch.full((3,), math.ceil(0.3 * 24) / 24))


# the tools and the hook, on a tiny SViT detector and 100 x 128 shapes images (resized to 200 x 256 and
# padded to 224 x 256 by the test pipeline and the data preprocessor: 14 x 16 tokens, the last row padding)

TINY = """
_base_ = '{base}'
data_root = '{root}/shapes/'
generate = dict(seed=0, num_train=4, num_val=3, image_size=(100, 128))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, generate=generate))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, generate=generate))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
load_from = None
model = dict(backbone=dict(depth=4, reducer=dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.5, 0.3])))
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
custom_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=1, batch_size=2)]
randomness = dict(seed=0)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, checkpoint path) of a tiny, untrained SViT Mask R-CNN; its data is generated here."""
    root = tmp_path_factory.mktemp("tiny")
    cfg_path = root / "tiny.py"
    cfg_path.write_text(TINY.format(base=SVIT_CFG, root=root))
    cfg = Config.fromfile(str(cfg_path))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    from tokenprune.data import SHAPES_CLASSES, make_shapes_dataset

    make_shapes_dataset(root / "shapes", seed=0, num_train=4, num_val=3, image_size=(100, 128))
    ckpt = root / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": SHAPES_CLASSES}}}, ckpt)
    return cfg_path, ckpt, root


def test_visualize_tokens_writes_a_png_per_image(tiny, tmp_path):
    cfg, ckpt, root = tiny
    tool = load_tool("visualize_tokens")
    written = tool.run(
        [str(cfg), str(ckpt), "--out-dir", str(tmp_path / "split"), "--split", "val", "--indices", "0", "2"]
    )
    assert [Path(p).name for p in written] == ["000000.png", "000002.png"]
    with Image.open(written[0]) as im:
        im.load()
        # image panel + 3 block panels in one row of 2.4-inch panels at 80 dpi
        assert im.width == round(4 * 2.4 * 80) and im.height > 2.4 * 80
    image = root / "shapes/val/000001.png"
    written = tool.run([str(cfg), str(ckpt), "--out-dir", str(tmp_path / "files"), "--images", str(image)])
    assert [Path(p).name for p in written] == ["000001.png"] and Path(written[0]).stat().st_size > 1000


def test_panel_overlay_and_cluster_edges():
    tool = load_tool("visualize_tokens")
    ids = np.array([0, 0, 2, -1])  # 2 x 2 grid: positions 0 and 1 merged, 2 kept alone, 3 pruned
    states = np.array([MERGED, MERGED, KEPT, P])
    rgba = tool.token_overlay(states, ids, (2, 2))
    assert rgba[0, 0, 3] == rgba[0, 1, 3] == tool.CLUSTER_ALPHA and (rgba[0, 0] == rgba[0, 1]).all()
    assert rgba[1, 0, 3] == 0.0 and rgba[1, 1, 3] == tool.STATE_RGBA[P][3]
    # the merged pair is bounded below by two segments; nothing between its two members
    edges = tool.cluster_edges(ids, states, (2, 2), 16)
    assert sorted(edges) == [[(0, 16), (16, 16)], [(16, 16), (32, 16)]]


def reference_area_share(root: Path) -> float:
    """Tokens inside objects / image tokens, from the annotation file alone: masks decoded, resized x2
    (nearest: each pixel repeated), padded to 224 x 256, 16 x 16 patches, at least half of the pixels."""
    coco = COCO(str(root / "shapes/annotations/instances_val.json"))
    inside = valid = 0
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        union = np.zeros((info["height"], info["width"]), dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            union |= coco.annToMask(ann).astype(bool)
        big = np.zeros((224, 256))
        big[:200, :256] = union.repeat(2, 0).repeat(2, 1)
        area = np.zeros((224, 256))
        area[:200] = 1
        frac = big.reshape(14, 16, 16, 16).mean((1, 3))
        ok = area.reshape(14, 16, 16, 16).mean((1, 3)) >= 0.5
        inside += int(((frac >= 0.5) & ok).sum())
        valid += int(ok.sum())
    return inside / valid


def test_token_stats_writes_json_and_plots(tiny, tmp_path):
    cfg, ckpt, root = tiny
    out = tmp_path / "stats"
    summary = load_tool("token_stats").run([str(cfg), str(ckpt), "--out-dir", str(out), "--split", "val"])
    data = json.loads((out / "token_stats.json").read_text())
    assert data["num_images"] == 3 and data["blocks"] == [1, 2, 3]
    assert data["targets"] == {"block1": 0.7, "block2": 0.5, "block3": 0.3}
    for key in ("keep_rate", "per_image_keep_rate", "reactivation", "inside_objects", "per_image"):
        assert key in data
    # untrained gates, never calibrated: the fixed rule keeps exactly ceil(target * 224) tokens
    for block, target in ((1, 0.7), (2, 0.5), (3, 0.3)):
        assert data["keep_rate"][f"block{block}"]["mean"] == pytest.approx(math.ceil(target * 224) / 224)
    obj = data["inside_objects"]
    assert obj["valid_tokens"] == 3 * 13 * 16  # the last token row is 8 image rows of 16 + padding: valid;
    assert obj["area_share"] == pytest.approx(reference_area_share(root))
    assert summary["per_image"][0]["num_tokens"] == 224
    for name in ("keep_rate_per_block.png", "per_image_keep_rate.png", "reactivation.png", "inside_objects.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.width > 100


def test_tool_errors_are_clear(tiny, tmp_path, capsys, monkeypatch):
    cfg, ckpt, _ = tiny
    argv = ["token_stats.py", str(cfg), str(tmp_path / "none.pth"), "--out-dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as e:
        load_tool("token_stats").main()
    assert e.value.code == 2 and "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["x", str(cfg), str(ckpt), "--out-dir", str(tmp_path), "--indices", "7"])
    with pytest.raises(SystemExit) as e:
        load_tool("visualize_tokens").main()
    assert e.value.code == 2 and "--indices [7] are outside the test split of 3 images" in capsys.readouterr().err


def train_tiny(cfg_path: Path, work_dir: Path, name: str, **overrides) -> Runner:
    cfg = Config.fromfile(str(cfg_path))
    backends = [dict(type="LocalVisBackend")] + ([dict(type="TensorboardVisBackend")] if HAS_TENSORBOARD else [])
    cfg.visualizer = dict(type="DetLocalVisualizer", vis_backends=backends, name=f"vis_{name}")
    cfg.merge_from_dict(overrides)
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = name
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def scalar_lines(work_dir: Path) -> list[dict]:
    (path,) = work_dir.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("detector", ["TokenPruneMaskRCNN", "MaskRCNN"])
def test_hook_sends_keep_rates_to_the_visualizer(tiny, tmp_path, detector):
    cfg, _, _ = tiny
    runner = train_tiny(cfg, tmp_path, f"hook_{detector}", **{"model.type": detector})
    lines = scalar_lines(tmp_path)
    train = [line for line in lines if "loss" in line]
    val = [line for line in lines if "coco/bbox_mAP" in line]
    assert len(train) == 2 and len(val) == 1
    for line in train:  # every logger interval, once, whichever detector puts them into the log
        assert all(0.0 < line[f"keep_rate.block{b}"] <= 1.0 for b in (1, 2, 3)) and "keep_rate.mean" in line
    for b in (1, 2, 3):
        assert 0.0 < val[0][f"keep_rate/block{b}"] <= 1.0 and f"keep_rate_std/block{b}" in val[0]
    assert "keep_rate/mean" in val[0]
    history, _ = runner.message_hub.get_scalar("train/keep_rate.block1").data
    assert len(history) == 2  # one value per training iteration: not logged twice
    assert json.loads((tmp_path / "token_stats_val.json").read_text()).keys() == {"block1", "block2", "block3"}
    reducer = runner.model.backbone.reducer
    assert int(reducer.calibration_steps.min()) >= 1  # SViTCalibrationHook still ran
    if HAS_TENSORBOARD:
        assert list(tmp_path.glob("*/vis_data/events.out.tfevents.*"))
