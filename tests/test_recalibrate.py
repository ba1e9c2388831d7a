"""SViT's inference rules as the test log and metrics report them (TokenStatsHook), the threshold calibration
shared by SViTCalibrationHook and tools/analysis_tools/recalibrate.py, and the flow for a released SViT
checkpoint: official layout -> tools/model_converters/official_to_tokenprune.py -> recalibrate.py ->
tools/test.py."""

import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope
from test_adapter import official_layout
from test_tools import ROOT, run, write_tiny_config

from tokenprune.errors import ConfigError, WeightsMismatchError
from tokenprune.mmdet_plugin.hooks import TokenStatsHook, calibrate_thresholds
from tokenprune.models import SViTReducer, ViT

ADAPTER_SHAPES = ROOT / "configs/adapter/mask-rcnn_vit-adapter-t_fpn_shapes.py"
DENSE_SHAPES = ROOT / "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
SVIT_ADAPTER = """
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(depth=4, img_size=128, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
                  reducer=dict(type='SViT', blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])))
custom_hooks = [dict(type='TokenStatsHook')]
"""
TPC_VIT = """
model = dict(
    type='TokenPruneMaskRCNN',
    backbone=dict(depth=4, reducer=dict(type='TPC', blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])))
"""


def load_tool(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_detector(cfg_path: Path):
    init_default_scope("mmdet")
    torch.manual_seed(0)
    return MODELS.build(Config.fromfile(str(cfg_path)).model)


# TokenStatsHook: the rule of every gated block, logged and in the metrics


class Logger:
    def __init__(self):
        self.lines: list[tuple[int, str]] = []

    def info(self, msg):
        self.lines.append((logging.INFO, msg))

    def warning(self, msg):
        self.lines.append((logging.WARNING, msg))


def fake_runner(model, work_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(
        model=model, logger=Logger(), message_hub=MessageHub.get_instance("test_recalibrate"), work_dir=str(work_dir)
    )


def tiny_svit(**kwargs) -> SimpleNamespace:
    torch.manual_seed(0)
    reducer = SViTReducer(48, blocks=(1, 2, 3), keep_targets=(0.7, 0.49, 0.343), **kwargs)
    backbone = ViT(img_size=64, embed_dim=48, depth=4, num_heads=3, cls_token=False, reducer=reducer).eval()
    return SimpleNamespace(backbone=backbone)


def run_test_epoch(model, tmp_path):
    """One test epoch of one batch through TokenStatsHook: the runner, the hook and the epoch's metrics."""
    runner, hook = fake_runner(model, tmp_path), TokenStatsHook()
    hook.before_test_epoch(runner)
    with torch.no_grad():
        model.backbone(torch.randn(2, 3, 64, 96))
    hook.after_test_iter(runner, 0)
    metrics = {}
    hook.after_test_epoch(runner, metrics)
    return runner, hook, metrics


def test_hook_reports_each_blocks_rule_and_announces_the_fallback_once(tmp_path):
    model = tiny_svit()
    runner, hook, metrics = run_test_epoch(model, tmp_path)
    assert {k: v for k, v in metrics.items() if k.startswith("inference_rule/")} == {
        "inference_rule/block1": "fixed",
        "inference_rule/block2": "fixed",
        "inference_rule/block3": "fixed",
    }
    assert runner.message_hub.get_info("test/inference_rule/block2") == "fixed"
    info, warning = runner.logger.lines
    assert info == (logging.INFO, "SViT inference rule (test): fixed at blocks [1, 2, 3]")
    assert warning[0] == logging.WARNING and "\n" not in warning[1]
    assert "inference='threshold' falls back to 'fixed'" in warning[1] and "[1, 2, 3]: never calibrated" in warning[1]
    assert "tools/analysis_tools/recalibrate.py" in warning[1]
    # once per test run; validation announces only before the first one
    hook.before_test_epoch(runner)
    assert len(runner.logger.lines) == 4
    hook.before_val_epoch(runner)
    hook.before_val_epoch(runner)
    assert len(runner.logger.lines) == 6


@pytest.mark.parametrize("rule", ["official", "sample", "threshold"])
def test_hook_reports_the_configured_rule(tmp_path, rule):
    model = tiny_svit(inference=rule, sample_seed=3)
    if rule == "threshold":
        model.backbone.reducer.calibration_steps.fill_(1)
    runner, hook, metrics = run_test_epoch(model, tmp_path)
    assert [metrics[f"inference_rule/block{b}"] for b in (1, 2, 3)] == [rule] * 3
    assert metrics.get("inference_rule/sample_seed") == (3 if rule == "sample" else None)
    assert [level for level, _ in runner.logger.lines] == [logging.INFO]  # no fallback
    assert 0 < metrics["keep_rate/block1"] <= 1
    per_image = json.loads((tmp_path / "token_stats_test.json").read_text())
    assert len(per_image["block3"]) == 2


def test_calibrate_thresholds_restores_the_mode_and_needs_thresholds():
    model = tiny_svit()
    model.data_preprocessor = lambda data, training: {"inputs": data}
    model.training = True
    model.eval = lambda: setattr(model, "training", False)
    model.train = lambda mode=True: setattr(model, "training", mode)
    rates = calibrate_thresholds(model, [torch.randn(2, 3, 64, 96) for _ in range(3)])
    assert model.training and list(rates) == [1, 2, 3] and all(0 < r <= 1 for r in rates.values())
    assert model.backbone.reducer.calibration_steps.tolist() == [3, 3, 3]
    model.backbone.reducer = None
    with pytest.raises(ValueError, match="no reducer with calibrated thresholds"):
        calibrate_thresholds(model, [])


# recalibrate.py


def test_recalibrate_tpc_checkpoint(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path, base=DENSE_SHAPES, extra=TPC_VIT)
    detector = build_detector(cfg)
    src, out = tmp_path / "tpc.pth", tmp_path / "tpc_calibrated.pth"
    torch.save({"state_dict": detector.state_dict(), "meta": {"iter": 4, "note": "plain"}}, src)
    report = load_tool("tools/analysis_tools/recalibrate.py").run(
        [str(cfg), str(src), str(out), "--num-batches", "2", "--batch-size", "2"]
    )
    assert report["blocks"] == [1, 2, 3] and len(report["thresholds"]) == 3
    ckpt = torch.load(out, weights_only=True)
    state = ckpt["state_dict"]
    assert state["backbone.reducer.calibration_steps"].tolist() == [2, 2, 2]
    assert state["backbone.reducer.thresholds"].tolist() == report["thresholds"]
    assert ckpt["meta"]["iter"] == 4 and ckpt["meta"]["recalibrated"]["num_batches"] == 2
    own = ("backbone.reducer.thresholds", "backbone.reducer.calibration_steps")
    assert all(torch.equal(v, state[k]) for k, v in detector.state_dict().items() if k not in own)
    assert "TPC thresholds calibrated on 2 batches" in capsys.readouterr().out


def test_recalibrate_refuses_what_it_cannot_calibrate(tmp_path):
    tool = load_tool("tools/analysis_tools/recalibrate.py")
    dense_cfg = write_tiny_config(tmp_path)
    src, out = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save({"state_dict": build_detector(dense_cfg).state_dict()}, src)
    with pytest.raises(ConfigError, match="has no calibrated inference thresholds"):
        tool.run([str(dense_cfg), str(src), str(out)])
    tpc_cfg = write_tiny_config(tmp_path, base=DENSE_SHAPES, extra=TPC_VIT)
    with pytest.raises(WeightsMismatchError, match="no weights for the reducer"):  # a dense checkpoint
        tool.run([str(tpc_cfg), str(src), str(out)])
    with pytest.raises(ConfigError, match="checkpoint not found"):
        tool.run([str(tpc_cfg), str(tmp_path / "none.pth"), str(out)])
    assert not out.exists()


# a released SViT checkpoint, end to end


def test_official_svit_checkpoint_convert_recalibrate_test(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path, base=ADAPTER_SHAPES, extra=SVIT_ADAPTER)
    detector = build_detector(cfg)
    official = official_layout(detector.backbone, svit=True)  # the official SViT layout, as test_adapter's
    official.update({k: v for k, v in detector.state_dict().items() if not k.startswith("backbone.")})
    src, converted, calibrated = tmp_path / "official.pth", tmp_path / "converted.pth", tmp_path / "calibrated.pth"
    torch.save({"meta": {"epoch": 6}, "state_dict": official}, src)

    # 1. convert: the report says how to calibrate the converted file
    converter = load_tool("tools/model_converters/official_to_tokenprune.py")
    assert converter.main([str(src), str(converted)]) == 0
    report = capsys.readouterr().out
    assert "could not place (left out): none" in report
    assert "added, uncalibrated" in report  # the threshold buffers: the file holds every tensor of the model
    assert f"tools/analysis_tools/recalibrate.py CONFIG {converted} {tmp_path / 'converted_calibrated.pth'}" in report

    # 2. test the converted file as it is: every gated block falls back to the fixed budget, announced once
    def test(checkpoint: Path, name: str, *options: str) -> tuple[dict, str]:
        out = tmp_path / f"{name}.json"
        args = ["--work-dir", str(tmp_path / name), "--metrics-out", str(out)]
        proc = run(sys.executable, "tools/test.py", str(cfg), str(checkpoint), *args, *options)
        return json.loads(out.read_text())["metrics"], proc.stdout + proc.stderr

    metrics, log = test(converted, "converted")
    assert [metrics[f"inference_rule/block{b}"] for b in (1, 2, 3)] == ["fixed"] * 3
    assert log.count("falls back to 'fixed'") == 1 and "blocks [1, 2, 3]: never calibrated" in log
    assert metrics["keep_rate/block1"] == pytest.approx(0.703125)  # ceil(0.7 x 256) / 256, every image

    # 3. recalibrate on training images
    proc = run(
        sys.executable,
        "tools/analysis_tools/recalibrate.py",
        str(cfg),
        str(converted),
        str(calibrated),
        "--num-batches",
        "2",
        "--batch-size",
        "2",
    )
    assert "SViT thresholds calibrated on 2 batches of 2 training images" in proc.stdout
    before = torch.load(converted, weights_only=True)["state_dict"]
    after = torch.load(calibrated, weights_only=True)["state_dict"]
    assert after["backbone.reducer.calibration_steps"].tolist() == [2, 2, 2]
    assert (after["backbone.reducer.thresholds"] > 0).all()
    own = ("backbone.reducer.thresholds", "backbone.reducer.calibration_steps")
    assert before.keys() == after.keys() and not before[own[1]].any()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k not in own)

    # 4. test the calibrated file: the threshold rule at every gated block, no fallback
    metrics, log = test(calibrated, "calibrated")
    assert [metrics[f"inference_rule/block{b}"] for b in (1, 2, 3)] == ["threshold"] * 3
    assert "falls back" not in log and "SViT inference rule (test): threshold at blocks [1, 2, 3]" in log
    per_image = json.loads((tmp_path / "calibrated/token_stats_test.json").read_text())
    assert len(per_image["block3"]) == 4 and 0 < metrics["keep_rate/mean"] <= 1

    # 5. the official evaluation rule on the converted file: a seeded hard Gumbel draw, rates per image
    metrics, log = test(converted, "sample", "--cfg-options", "model.backbone.reducer.inference=sample")
    assert [metrics[f"inference_rule/block{b}"] for b in (1, 2, 3)] == ["sample"] * 3
    assert metrics["inference_rule/sample_seed"] == 0 and "falls back" not in log
    per_image = json.loads((tmp_path / "sample/token_stats_test.json").read_text())
    assert len(set(per_image["block1"])) > 1  # the realised rate differs per image
