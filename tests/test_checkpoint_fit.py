"""Loading that checks fit (issue 14, item 1): tools/test.py and --resume refuse a checkpoint whose tensors do
not cover the model, with one message that says what is missing and what the file looks like; load_from
accepts exactly a new token reducer (named in one summary line); --allow-partial-load loads what fits.

In-process, on the models of the shapes and COCO configs (built on the CPU, no training). The tools' side is
in tests/test_reliability_tools.py; docs/reliability.md lists every case and its test."""

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import _load_checkpoint

import tokenprune  # noqa: F401  (registers the models and installs the safe loader)
from tokenprune.errors import ConfigError, WeightsMismatchError
from tokenprune.mmdet_plugin import checkpoint_fit
from tokenprune.mmdet_plugin.checkpoint_fit import check_checkpoint_fit, model_shapes, summarize_keys
from tokenprune.mmdet_plugin.cli import check_start_checkpoint
from tokenprune.mmdet_plugin.safe_load import IncompleteCheckpointError

ROOT = Path(__file__).resolve().parents[1]
DENSE = ROOT / "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
SVIT = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"
TPC = ROOT / "configs/tpc/mask-rcnn_tpc-t_simplefpn_shapes.py"
EVIT = ROOT / "configs/evit/mask-rcnn_evit-t_simplefpn_shapes.py"
ADAPTER = ROOT / "configs/adapter/mask-rcnn_vit-adapter-t_fpn_shapes.py"
DEIT_S_COCO = ROOT / "configs/dense/mask-rcnn_deit-s_simplefpn_3x_coco.py"
SVIT_REDUCER = ROOT / "configs/_base_/models/svit.py"


def config(path: Path, **options) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.merge_from_dict(options)
    return cfg


def save_model(cfg: Config, path: Path, drop: str | None = None) -> Path:
    """A checkpoint as our tools write it, of the model ``cfg`` builds (without the keys starting with
    ``drop``)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    state = MODELS.build(cfg.model).state_dict()
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    torch.save({"meta": {"iter": 1}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fit")
    return {
        "dense": save_model(config(DENSE), d / "dense.pth"),
        "svit": save_model(config(SVIT), d / "svit.pth"),
    }


@pytest.fixture
def logged(monkeypatch) -> list[tuple[str, int | None]]:
    """What the fit check logs: (message, level)."""
    out = []
    monkeypatch.setattr(checkpoint_fit, "print_log", lambda msg, logger=None, level=None: out.append((msg, level)))
    return out


def refusal(cfg: Config, path: Path, purpose: str) -> str:
    with pytest.raises(WeightsMismatchError) as info:
        check_checkpoint_fit(cfg, str(path), purpose)
    return str(info.value)


def test_a_checkpoint_that_fits_loads_silently(files, logged):
    fit = check_checkpoint_fit(config(SVIT), str(files["svit"]), "test")
    assert fit.exact and logged == []
    assert check_checkpoint_fit(config(DENSE), str(files["dense"]), "resume").exact
    # training-free reducers have no tensors: the dense checkpoint fits their configs exactly
    assert check_checkpoint_fit(config(EVIT), str(files["dense"]), "test").exact


def test_dense_checkpoint_for_an_svit_model_is_refused_by_test(files):
    message = refusal(config(SVIT), files["dense"], "test")
    assert message.startswith(f"checkpoint {files['dense']} does not fit the model of {SVIT}: ")
    assert "it looks like a dense checkpoint for an SViT model: its gates are untrained" in message
    assert "56 of the model's 261 tensors are not in the file (backbone.reducer.thresholds" in message
    assert "backbone.reducer.gates.0-8.* (54)" in message
    assert "Fine-tune it first (tools/train.py CONFIG --cfg-options load_from=" in message
    assert message.endswith("pass --allow-partial-load")


def test_load_from_accepts_exactly_a_new_reducer_in_one_summary_line(files, logged):
    fit = check_checkpoint_fit(config(SVIT), str(files["dense"]), "load_from")
    assert len(fit.missing) == 56 and not fit.unexpected and not fit.mis_shaped
    assert len(logged) == 1
    message, level = logged[0]
    assert message == (
        f"load_from {files['dense']}: a dense checkpoint for this SViT model, as a fine-tune from a dense model "
        "expects: the reducer's 56 new tensors start from their initialisation (backbone.reducer.thresholds, "
        "backbone.reducer.calibration_steps, backbone.reducer.gates.0-8.* (54)); every other tensor is loaded"
    )
    assert level is None  # info, not a warning
    # TPC's controllers and stabilizers are its new tensors the same way
    check_checkpoint_fit(config(TPC), str(files["dense"]), "load_from")
    assert "a dense checkpoint for this TPC model" in logged[1][0] and "backbone.reducer.controllers" in logged[1][0]


def test_load_from_refuses_anything_more_than_the_new_reducer(tmp_path, files):
    # a dense checkpoint with one block missing: the reducer gap is accepted, the block is not
    state = torch.load(files["dense"], weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("backbone.blocks.11.")}
    torch.save(state, tmp_path / "no_block.pth")
    message = refusal(config(SVIT), tmp_path / "no_block.pth", "load_from")
    assert "backbone.blocks.11.* (12)" in message and "backbone.reducer" in message
    assert "a new token reducer is the one accepted gap" in message
    # an SViT checkpoint with other gated blocks: its reducer is not new
    other = config(
        SVIT,
        **{"model.backbone.reducer.blocks": [3, 6, 9], "model.backbone.reducer.keep_targets": [0.7, 0.5, 0.3]},
    )
    message = refusal(other, files["svit"], "load_from")
    assert "it looks like a checkpoint of an SViT model with other reducer settings" in message


def test_vit_adapter_reducer_is_the_accepted_gap_too(tmp_path, logged):
    dense = save_model(config(ADAPTER), tmp_path / "adapter.pth")
    svit = config(ADAPTER, **{"model.backbone.reducer": Config.fromfile(str(SVIT_REDUCER)).svit_reducer})
    check_checkpoint_fit(svit, str(dense), "load_from")
    assert "a dense checkpoint for this SViT model" in logged[0][0]
    assert "it looks like a dense checkpoint for an SViT model: its gates are untrained" in refusal(svit, dense, "test")


def test_resume_needs_every_tensor(files):
    message = refusal(config(SVIT), files["dense"], "resume")
    assert "it looks like a dense checkpoint for an SViT model: its gates are untrained" in message
    assert "--resume continues a run of this config: resume with the config that wrote the checkpoint" in message


def test_svit_checkpoint_for_a_dense_model(files):
    message = refusal(config(DENSE), files["svit"], "test")
    assert "it looks like an SViT checkpoint (with a token reducer, backbone.reducer.*) for a dense model" in message
    assert "56 tensors of the file are not in the model" in message


def test_deit_t_weights_for_a_deit_s_model(files):
    message = refusal(config(DEIT_S_COCO), files["dense"], "load_from")
    assert "it looks like DeiT-T weights for a DeiT-S model" in message
    assert "have other shapes (e.g. backbone.pos_embed: file (1, 256, 192), model (1, 196, 384)" in message


def test_a_shallower_dense_checkpoint_for_a_fine_tune(tmp_path):
    """A 4-block dense model fine-tuned into a 12-block SViT model: 8 blocks would stay untrained."""
    path = save_model(config(DENSE, **{"model.backbone.depth": 4}), tmp_path / "dense4.pth")
    message = refusal(config(SVIT), path, "load_from")
    assert (
        "it looks like a checkpoint with a ViT backbone of 192 channels and 4 blocks for a model with a DeiT-T "
        "backbone (192 channels, 12 blocks). 152 of the model's 261 tensors are not in the file "
        "(backbone.blocks.4-11.* (96), backbone.reducer.thresholds" in message
    )


def test_resnet_checkpoint(tmp_path):
    resnet = {
        "backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
        "backbone.bn1.weight": torch.zeros(64),
        "backbone.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 1024),
    }
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    message = refusal(config(DENSE), tmp_path / "resnet.pth", "test")
    assert "it looks like a ResNet checkpoint for a ViT model" in message
    assert "204 of the model's 205 tensors are not in the file" in message
    assert "Test it with the config it was trained with" in message


def test_imagenet_weights_as_load_from_point_to_init_cfg(tmp_path):
    import timm

    path = tmp_path / "deit_t.pth"
    torch.save({"model": timm.create_model("deit_tiny_patch16_224").state_dict()}, path)
    message = refusal(config(DENSE), path, "load_from")
    assert "it looks like ImageNet classification weights of a DeiT-T, not a detector checkpoint" in message
    assert f"set model.backbone.init_cfg=dict(type='Pretrained', checkpoint='{path}')" in message


def test_a_detector_for_other_classes(tmp_path):
    path = save_model(config(DENSE, **{"model.roi_head.bbox_head.num_classes": 80}), tmp_path / "coco_heads.pth")
    message = refusal(config(DENSE), path, "test")
    assert "it looks like a detector for 80 classes for a model with 3 classes" in message
    assert "roi_head.bbox_head.fc_cls.weight: file (81, 256), model (4, 256)" in message


def test_allow_partial_load_loads_what_fits_with_a_warning(files, logged):
    import logging

    fit = check_checkpoint_fit(config(SVIT), str(files["dense"]), "test", allow_partial=True)
    assert len(fit.missing) == 56
    message, level = logged[0]
    assert level == logging.WARNING
    assert message.startswith(f"--allow-partial-load: loading {files['dense']} although it does not fit the model")
    assert "a dense checkpoint for an SViT model: its gates are untrained" in message


@pytest.mark.parametrize("purpose", ["test", "load_from", "resume"])
def test_truncated_checkpoint_is_named(tmp_path, files, purpose):
    data = files["dense"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint_fit(config(DENSE), str(cut), purpose)
    assert str(info.value).startswith(
        f"checkpoint {cut} is incomplete: the file ({len(data) // 3} bytes) ends before the index that torch "
        "writes last, so it was cut short while being saved or copied"
    )
    assert "use an earlier checkpoint" in str(info.value)
    with pytest.raises(IncompleteCheckpointError):  # the same through mmengine's loader (the runner's path)
        _load_checkpoint(str(cut), map_location="cpu")


def test_empty_checkpoint_file_is_named(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint .*empty.pth is empty \(0 bytes\)"):
        check_checkpoint_fit(config(DENSE), str(empty), "test")


def test_a_start_checkpoint_that_sets_the_backbone_makes_imagenet_weights_unneeded(files, logged):
    imagenet = {"type": "Pretrained", "checkpoint": "/no/such/deit_tiny.pth"}
    cfg = config(SVIT, load_from=str(files["dense"]), **{"model.backbone.init_cfg": imagenet})
    check_start_checkpoint(cfg)  # no 'pretrained backbone weights not found'
    assert cfg.model.backbone.init_cfg is None
    cfg = config(DENSE, load_from=None, **{"model.backbone.init_cfg": imagenet})  # training from ImageNet
    with pytest.raises(ConfigError, match="pretrained backbone weights not found: /no/such/deit_tiny.pth"):
        check_start_checkpoint(cfg)


def test_summarize_keys():
    keys = [f"backbone.blocks.{i}.attn.qkv.weight" for i in range(12)] + ["backbone.norm.weight"]
    assert summarize_keys(keys) == "backbone.blocks.0-11.* (12), backbone.norm.weight"


def test_model_shapes_are_the_state_dict_of_the_built_model():
    shapes = model_shapes(config(SVIT))
    assert shapes["backbone.reducer.thresholds"] == (9,)
    assert shapes["backbone.patch_embed.proj.weight"] == (192, 3, 16, 16)
