"""Reliability (issue 8), in-process: numerics of the dense backbone and of every config's reducer (every
registered reducer on the same inputs: tests/test_reducer_contract.py), safe checkpoint loading and its opt-in,
the checks that turn bad data into one clear message, the choice of the checkpoint to resume from, the
reliability hooks in every config, and determinism of keep decisions and predictions.

The subprocess tests (SIGKILL and --resume, NaN loss, unreadable images, --trust-checkpoint) are in
tests/test_reliability_tools.py; docs/reliability.md lists every case and its test."""

import functools
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import _load_checkpoint
from reducer_checks import HARD_INPUTS, assert_finite, identical_zero_tokens

import tokenprune  # noqa: F401  (registers the models and installs the safe loader)
from tokenprune.data import make_shapes_dataset
from tokenprune.errors import ConfigError, DatasetError
from tokenprune.mmdet_plugin import cli
from tokenprune.mmdet_plugin.cli import (
    add_reliability_hooks,
    apply_resume,
    check_config,
    latest_checkpoint,
    load_config,
    training_loaders,
    user_message,
)
from tokenprune.mmdet_plugin.datasets import image_read_error
from tokenprune.mmdet_plugin.safe_load import (
    TRUST_ENV,
    UnsafeCheckpointError,
    resave_trusted,
    trust_checkpoint,
    unsafe_globals,
)
from tokenprune.models import SViTReducer, ViT
from tokenprune.models.reducers import build_reducer

ROOT = Path(__file__).resolve().parents[1]
# detector configs (configs/study/ holds study files, which list detector configs)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.py") if not {"_base_", "study"} & set(p.parts))
SHAPES_CFG = ROOT / "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
SVIT_CFG = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"

# ---------------------------------------------------------------------------------------------------------
# 3. Numerics: no NaN or inf from the backbone, dense and with the reducer of every config (every registered
# reducer on the same hard inputs: tests/test_reducer_contract.py::test_hard_inputs_are_finite)

DIM, DEPTH, HEADS = 48, 12, 3  # 12 blocks: the configs' reducer blocks (e.g. SViT's gates at blocks 3-11) fit


def make_dense_backbone(cls_token: bool = False) -> ViT:
    """The tiny dense ViT."""
    torch.manual_seed(0)
    return ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, cls_token=cls_token)


@functools.lru_cache
def config_backbone_settings(path: Path) -> tuple[dict | None, bool]:
    backbone = Config.fromfile(str(path)).model.backbone
    reducer = backbone.get("reducer")
    return (reducer.to_dict() if reducer else None), bool(backbone.get("cls_token", False))


def make_config_backbone(path: Path) -> ViT:
    """The tiny ViT with the reducer settings of a detection config (e.g. a CLS-free score) and its
    cls_token setting."""
    reducer, cls_token = config_backbone_settings(path)
    if reducer is None:
        pytest.skip(f"{path.name} is dense")
    torch.manual_seed(0)
    return ViT(
        img_size=64,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        cls_token=cls_token,
        reducer=build_reducer(reducer, DIM),
    )


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(HARD_INPUTS))
@pytest.mark.parametrize("cls_token", [False, True], ids=["no_cls", "cls"])
def test_dense_backbone_output_is_finite(cls_token, case, training):
    model = make_dense_backbone(cls_token)
    images, zero_tokens = HARD_INPUTS[case]
    if zero_tokens:
        identical_zero_tokens(model)
    assert_finite(model, images, training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(HARD_INPUTS))
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_backbone_with_a_configs_reducer_is_finite(path, case, training):
    model = make_config_backbone(path)
    images, zero_tokens = HARD_INPUTS[case]
    if zero_tokens:
        identical_zero_tokens(model)
    assert_finite(model, images, training)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["constant", "one_token_row", "very_wide_16x1024"])
@pytest.mark.parametrize("cls_token", [False, True], ids=["no_cls", "cls"])
def test_dense_backbone_is_finite_under_cpu_autocast(cls_token, case, dtype):
    model = make_dense_backbone(cls_token).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(HARD_INPUTS[case][0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("hw", [(16, 16), (16, 1024)], ids=["one_token", "wide_one_row"])
def test_svit_gates_that_prune_everything_under_bf16(hw, training):
    """The worst case at once: gates that would prune every token, bf16 autocast, one token row."""
    torch.manual_seed(0)
    model = ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, reducer=SViTReducer(DIM))
    with torch.no_grad():
        for gate in model.reducer.gates:
            gate.fc2.weight.zero_()
            gate.fc2.bias.copy_(torch.tensor([-50.0, 50.0]))  # p_keep ~ 0 everywhere
    model.train(training)
    model.record_tokens = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, *hw))
    assert torch.isfinite(out).all()
    for keep in model.last_record.token_maps.values():
        assert ((keep >= 0).sum(dim=1) >= 1).all()  # min_keep: at least one token per image
    if training:
        assert torch.isfinite(model.last_record.aux_losses["loss_svit_ratio"])


# ---------------------------------------------------------------------------------------------------------
# 1. Safe checkpoint loading and the opt-in for trusted legacy files


def legacy_mmengine_checkpoint(path: Path, monkeypatch) -> None:
    """A checkpoint as plain mmengine writes it: its log buffers pickle their statistics functions through
    ``builtins.getattr`` (what ``import tokenprune`` stops our own checkpoints from doing)."""

    def mmengine_getstate(self):  # mmengine 0.10.7's HistoryBuffer.__getstate__, which tokenprune replaces
        self.__dict__.update(statistics_methods=self._statistics_methods)
        return self.__dict__

    hub = MessageHub.get_instance("test_reliability_legacy")
    hub.update_scalar("train/loss", 0.5)
    with monkeypatch.context() as m:
        m.setattr(HistoryBuffer, "__getstate__", mmengine_getstate)
        ckpt = {"meta": {"iter": 2}, "state_dict": {"w": torch.arange(3.0)}, "message_hub": hub.state_dict()}
        torch.save(ckpt, path)


def test_legacy_checkpoint_is_refused_with_the_opt_in_named(tmp_path, monkeypatch):
    path = tmp_path / "legacy.pth"
    legacy_mmengine_checkpoint(path, monkeypatch)
    assert "builtins.getattr" in unsafe_globals(path)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        _load_checkpoint(str(path), map_location="cpu")
    message = str(info.value)
    assert str(path) in message and "builtins.getattr" in message and "plain mmengine" in message
    assert "--trust-checkpoint" in message and f"{TRUST_ENV}=1" in message


def test_torch_force_no_weights_only_does_not_switch_safe_loading_off(tmp_path, monkeypatch):
    path = tmp_path / "legacy.pth"
    legacy_mmengine_checkpoint(path, monkeypatch)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError):
        _load_checkpoint(str(path), map_location="cpu")


def test_trusting_the_file_loads_what_the_default_refuses(tmp_path, monkeypatch):
    path = tmp_path / "legacy_trusted.pth"
    legacy_mmengine_checkpoint(path, monkeypatch)
    other = tmp_path / "legacy_other.pth"
    legacy_mmengine_checkpoint(other, monkeypatch)
    trust_checkpoint(path)
    ckpt = _load_checkpoint(str(path), map_location="cpu")
    assert torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))
    assert ckpt["message_hub"]["log_scalars"]["train/loss"].current() == 0.5
    with pytest.raises(UnsafeCheckpointError):  # trust is per file
        _load_checkpoint(str(other), map_location="cpu")


def test_environment_opt_in_trusts_every_file(tmp_path, monkeypatch):
    path = tmp_path / "legacy.pth"
    legacy_mmengine_checkpoint(path, monkeypatch)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert _load_checkpoint(str(path), map_location="cpu")["meta"]["iter"] == 2


def test_resaved_legacy_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    path, safe = tmp_path / "legacy.pth", tmp_path / "safe.pth"
    legacy_mmengine_checkpoint(path, monkeypatch)
    assert resave_trusted(path, safe) == []
    ckpt = torch.load(safe, map_location="cpu", weights_only=True)
    assert ckpt["message_hub"]["log_scalars"]["train/loss"].mean() == 0.5


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/tokenprune_reliability_pwned",))


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load checkpoint .*(posix|os)\\.system"):
        _load_checkpoint(str(path), map_location="cpu")
    assert not os.path.exists("/tmp/tokenprune_reliability_pwned")
    assert isinstance(UnsafeCheckpointError("x"), pickle.UnpicklingError)  # callers catching torch's error still do


# ---------------------------------------------------------------------------------------------------------
# 2. Resume: the checkpoint it continues from


def save_tiny(path: Path, step: int) -> None:
    torch.save({"meta": {"iter": step}, "state_dict": {"w": torch.ones(1)}}, path)


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path):
    save_tiny(tmp_path / "iter_2.pth", 2)
    save_tiny(tmp_path / "iter_4.pth", 4)
    data = (tmp_path / "iter_4.pth").read_bytes()
    (tmp_path / "iter_6.pth").write_bytes(data[: len(data) // 2])  # killed while writing iter_6
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_4.pth"))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_4.pth")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_6.pth"))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_4.pth")
    (tmp_path / "iter_4.pth").unlink()  # e.g. max_keep_ckpts=1 removed it before the new one was written
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_2.pth")
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


def test_resume_path_that_does_not_exist(tmp_path):
    cfg = load_config(str(SHAPES_CFG), work_dir=str(tmp_path / "work"))
    with pytest.raises(ConfigError) as info:
        apply_resume(cfg, str(tmp_path / "iter_8.pth"))
    assert str(info.value) == (
        f"--resume {tmp_path}/iter_8.pth: checkpoint not found. Give the path of a checkpoint written by an earlier "
        "run of this config, or --resume without a path to continue from the latest checkpoint in the work dir "
        f"({tmp_path}/work)"
    )
    save_tiny(tmp_path / "iter_2.pth", 2)
    apply_resume(cfg, str(tmp_path / "iter_2.pth"))
    assert cfg.resume is True and cfg.load_from == str(tmp_path / "iter_2.pth")


# ---------------------------------------------------------------------------------------------------------
# 3. The reliability hooks are active in every config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_stops_on_nan_and_saves_the_random_state(path):
    hooks = Config.fromfile(str(path)).default_hooks
    assert hooks["check_invalid_loss"]["type"] == "StopOnNonFiniteLossHook"
    assert hooks["check_invalid_loss"]["interval"] == 1
    assert hooks["random_state"]["type"] == "RandomStateHook"


def test_train_tool_adds_the_hooks_to_configs_without_them_and_respects_none():
    cfg = Config(dict(default_hooks=dict(logger=dict(type="LoggerHook"), random_state=None)))
    add_reliability_hooks(cfg)
    assert cfg.default_hooks["check_invalid_loss"]["type"] == "StopOnNonFiniteLossHook"
    assert cfg.default_hooks["random_state"] is None and cfg.default_hooks["logger"]["type"] == "LoggerHook"


# ---------------------------------------------------------------------------------------------------------
# 4. Bad data: one clear message naming the file and the fix


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), seed=0, num_train=4, num_val=2, image_size=(64, 64))
    return root


def user_data(tmp_path: Path, shapes_root: Path, ann: dict | None = None, drop_image: bool = False) -> Path:
    """A user's copy of the shapes training split, with its annotation file replaced by ``ann``."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for f in (shapes_root / "train").iterdir():
        (root / "train" / f.name).write_bytes(f.read_bytes())
    if drop_image:
        (root / "train" / "000001.png").unlink()
    original = json.loads((shapes_root / "annotations/instances_train.json").read_text())
    (root / "ann.json").write_text(json.dumps(original if ann is None else ann(original)))
    return root


def check_user_config(root: Path, **options) -> None:
    """check_config, as tools/train.py runs it, on the shapes config pointed at the user's data."""
    cfg_options = {
        "train_dataloader.dataset.generate": None,
        "train_dataloader.dataset.data_root": f"{root}/",
        "train_dataloader.dataset.ann_file": "ann.json",
    }
    cfg_options.update({k.replace("__", "."): v for k, v in options.items()})
    cfg = load_config(str(SHAPES_CFG), cfg_options)
    check_config(cfg, loaders=("train_dataloader",))


def test_good_user_data_passes(tmp_path, shapes_root):
    check_user_config(user_data(tmp_path, shapes_root))


def test_missing_image_file_is_named(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root, drop_image=True)
    with pytest.raises(DatasetError, match=r"1 of 4 images listed in .*ann.json are missing, e.g. .*000001.png"):
        check_user_config(root)


def test_wrong_image_folder_is_named(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root)
    with pytest.raises(DatasetError, match=r"4 of 4 images .* are missing.*data_prefix"):
        check_user_config(root, train_dataloader__dataset__data_prefix=dict(img="images/"))


def test_empty_categories(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root, ann=lambda a: {**a, "categories": []})
    with pytest.raises(DatasetError, match="empty 'categories' list"):
        check_user_config(root)


def test_annotation_of_an_unknown_category(tmp_path, shapes_root):
    def bad(a):
        a["annotations"][0]["category_id"] = 99
        return a

    with pytest.raises(DatasetError, match=r"category ids \[99\] that are not in its 'categories'"):
        check_user_config(user_data(tmp_path, shapes_root, ann=bad))


def test_annotation_of_an_unknown_image(tmp_path, shapes_root):
    def bad(a):
        a["annotations"][0]["image_id"] = 12345
        return a

    with pytest.raises(DatasetError, match=r"image ids \[12345\] that are not in its 'images'"):
        check_user_config(user_data(tmp_path, shapes_root, ann=bad))


def test_classes_that_are_not_in_the_annotation_file(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root)
    with pytest.raises(ConfigError, match="none of the dataset's 3 classes .* is a category of"):
        check_user_config(root, train_dataloader__dataset__metainfo=dict(classes=("cat", "dog", "bird")))


def test_heads_predicting_another_number_of_classes(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root)
    with pytest.raises(ConfigError, match=r"bbox_head.num_classes=80 but the dataset has 3 classes"):
        check_user_config(root, model__roi_head__bbox_head__num_classes=80)


def no_images(a):
    return {**a, "images": [], "annotations": []}


def no_annotations(a):
    return {**a, "annotations": []}


def test_training_file_without_images(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root, ann=no_images)
    with pytest.raises(DatasetError) as info:
        check_user_config(root)
    assert str(info.value) == (
        f"annotation file {root}/ann.json lists no images: there is nothing to train on. Point the dataset's "
        "ann_file at a file that lists the images (and their annotations)"
    )


def test_training_file_without_annotations(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root, ann=no_annotations)
    with pytest.raises(DatasetError) as info:
        check_user_config(root)
    assert str(info.value) == (
        f"annotation file {root}/ann.json lists 4 images but no annotations: there is nothing to train on (images "
        "without objects are left out of training). Point train_dataloader.dataset.ann_file at the annotated "
        "training file"
    )


def check_user_val(root: Path, loader: str = "val_dataloader", **kwargs) -> None:
    """check_config of the shapes config evaluated on the user's data (the training split's images)."""
    evaluator = loader.replace("dataloader", "evaluator")
    cfg = load_config(
        str(SHAPES_CFG),
        {
            f"{loader}.dataset.generate": None,
            f"{loader}.dataset.data_root": f"{root}/",
            f"{loader}.dataset.ann_file": "ann.json",
            f"{loader}.dataset.data_prefix": dict(img="train/"),
            f"{evaluator}.ann_file": f"{root}/ann.json",
        },
    )
    check_config(cfg, loaders=(loader,), **kwargs)


def test_validation_file_without_images(tmp_path, shapes_root):
    root = user_data(tmp_path, shapes_root, ann=no_images)
    with pytest.raises(DatasetError, match=r"ann.json lists no images: there is nothing to evaluate\. Point"):
        check_user_val(root)


def test_evaluation_file_with_images_but_no_annotations(tmp_path, shapes_root, monkeypatch):
    root = user_data(tmp_path, shapes_root, ann=no_annotations)
    problem = (
        f"annotation file {root}/ann.json lists 4 images but no annotations: every COCO metric would be -1.000, as "
        "there is nothing to compare the predictions with"
    )
    with pytest.raises(DatasetError) as info:  # tools/test.py without --out / --show-dir: the metrics are all
        check_user_val(root, "test_dataloader", unannotated="error")
    assert str(info.value) == (
        f"{problem}. Evaluate against an annotated file (test_evaluator.ann_file), or, to keep the predictions "
        "only, pass --out preds.pkl or --show-dir DIR, which run without metrics to compare"
    )
    warnings = []
    monkeypatch.setattr(cli, "print_log", lambda msg, logger=None, level=None: warnings.append((msg, level)))
    check_user_val(root)  # validation during training, or tools/test.py keeping the predictions: a warning
    assert warnings == [(f"{problem}; the run goes on", logging.WARNING)]


def test_training_checks_only_the_files_training_reads(tmp_path):
    cfg = load_config(str(SHAPES_CFG))
    assert training_loaders(cfg) == ("train_dataloader", "val_dataloader")
    cfg.val_cfg = None  # no validation: its files are not read
    assert training_loaders(cfg) == ("train_dataloader",)
    cfg = load_config(
        str(SHAPES_CFG),
        {"test_dataloader.dataset.generate": None, "test_dataloader.dataset.data_root": f"{tmp_path}/gone/"},
    )
    check_config(cfg, loaders=training_loaders(cfg), init_weights=False)  # the broken test split is not read
    with pytest.raises(ConfigError, match="dataset folder not found"):
        check_config(cfg, loaders=("test_dataloader",), init_weights=False)


def test_testing_does_not_need_the_pretrained_weights():
    weights = {"type": "Pretrained", "checkpoint": "/no/such/deit_tiny.pth"}
    cfg = load_config(str(SHAPES_CFG), {"model.backbone.init_cfg": weights})
    check_config(cfg, loaders=(), init_weights=False)  # tools/test.py: the checkpoint holds the weights
    with pytest.raises(ConfigError, match="pretrained backbone weights not found: /no/such/deit_tiny.pth"):
        check_config(cfg, loaders=())  # training reads them


@pytest.mark.parametrize("coco_root", ["/data/coco", "/data/coco/"], ids=["no_slash", "slash"])
def test_coco_root_with_or_without_trailing_slash(monkeypatch, coco_root):
    monkeypatch.setenv("COCO_ROOT", coco_root)
    cfg = Config.fromfile(str(ROOT / "configs/dense/mask-rcnn_deit-t_simplefpn_3x_coco.py"))
    assert cfg.val_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"
    assert cfg.test_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"
    assert cfg.test_dataloader.dataset.data_root == "/data/coco/"


def test_syntax_error_in_a_base_file_names_that_file(tmp_path):
    (tmp_path / "_base_").mkdir()
    base = tmp_path / "_base_/schedule.py"
    base.write_text("train_cfg = dict(max_iters=10,\nval_cfg = dict()\n")
    (tmp_path / "middle.py").write_text(f"_base_ = ['{SHAPES_CFG}', './_base_/schedule.py']\n")
    child = tmp_path / "child.py"
    child.write_text("_base_ = './middle.py'\nmodel = dict(backbone=dict(depth=4))\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(child))
    assert str(info.value) == (
        f"config {child} could not be read: syntax error in its _base_ file {base} at line 1 "
        "('train_cfg = dict(max_iters=10,'): '(' was never closed. Fix that file"
    )
    child.write_text("_base_ = './middle.py'\nmodel = dict(backbone=dict(depth=4)\n")
    with pytest.raises(ConfigError, match=r"child.py could not be read: syntax error in the config itself at line 2"):
        load_config(str(child))


def test_unreadable_image_errors_are_explained_also_from_a_worker():
    worker = AssertionError(
        "Caught AssertionError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "loading.py", line 110, in transform\nAssertionError: failed to load image: /data/train/7.jpg'
    )
    error = image_read_error(worker)
    assert isinstance(error, DatasetError) and "image /data/train/7.jpg could not be read" in str(error)
    gone = image_read_error(FileNotFoundError(2, "No such file or directory", "/data/train/8.png"))
    assert "/data/train/8.png could not be read: it does not exist" in str(gone)
    assert image_read_error(FileNotFoundError(2, "No such file or directory", "/ckpt/model.pth")) is None
    assert image_read_error(ValueError("shape mismatch")) is None
    assert user_message(worker) == "failed to load image: /data/train/7.jpg"


# ---------------------------------------------------------------------------------------------------------
# 5. Determinism: same seed and config, same keep decisions and predictions (CPU)


def svit_detector(seed: int):
    from mmdet.registry import MODELS
    from mmengine.runner import set_random_seed

    cfg = Config.fromfile(str(SVIT_CFG))
    cfg.model.backbone.update(depth=4, embed_dim=48, num_heads=3)
    cfg.model.backbone.reducer.update(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])
    cfg.model.neck.in_channels = 48
    set_random_seed(seed)
    model = MODELS.build(cfg.model)
    model.backbone.record_tokens = True
    return model


def detection_batch(model, training: bool) -> dict:
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    rng = np.random.default_rng(0)
    inputs, samples = [], []
    for size in ((96, 128), (128, 80)):
        inputs.append(torch.from_numpy(rng.integers(0, 255, (3, *size), dtype=np.uint8)))
        masks = np.zeros((1, *size), dtype=np.uint8)
        masks[0, 10:60, 20:70] = 1
        gt = InstanceData(
            bboxes=torch.tensor([[20.0, 10.0, 70.0, 60.0]]), labels=torch.tensor([1]), masks=BitmapMasks(masks, *size)
        )
        meta = dict(img_shape=size, ori_shape=size, scale_factor=(1.0, 1.0))
        samples.append(DetDataSample(gt_instances=gt, metainfo=meta))
    return model.data_preprocessor({"inputs": inputs, "data_samples": samples}, training=training)


def run_twice_from_seed(seed: int):
    """Build, take 3 training forwards (Gumbel decisions, threshold calibration), then predict."""
    from mmengine.runner import set_random_seed

    model = svit_detector(seed)
    set_random_seed(seed)
    train_masks, losses = [], []
    model.train()
    for _ in range(3):
        data = detection_batch(model, training=True)
        out = model.loss(data["inputs"], data["data_samples"])
        losses.append(model.parse_losses(out)[0].item())
        train_masks.append({b: m.clone() for b, m in model.backbone.last_record.token_maps.items()})
    model.eval()
    with torch.no_grad():
        data = detection_batch(model, training=False)
        preds = model.predict(data["inputs"], data["data_samples"])
    eval_masks = model.backbone.last_record.token_maps
    return model, train_masks, losses, eval_masks, preds


def test_same_seed_same_keep_decisions_and_predictions():
    model_a, train_a, loss_a, eval_a, preds_a = run_twice_from_seed(3)
    model_b, train_b, loss_b, eval_b, preds_b = run_twice_from_seed(3)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert (model_a.backbone.reducer.calibration_steps > 0).all()  # the threshold rule decided at inference
    assert loss_a == loss_b
    for masks_a, masks_b in zip(train_a + [eval_a], train_b + [eval_b]):
        assert masks_a.keys() == masks_b.keys() == {1, 2, 3}
        assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    for pa, pb in zip(preds_a, preds_b):
        a, b = pa.pred_instances, pb.pred_instances
        assert len(a.scores) > 0
        assert torch.equal(a.bboxes, b.bboxes) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.masks, b.masks)
    _, train_c, _, _, _ = run_twice_from_seed(4)  # the comparison is not vacuous: another seed decides otherwise
    assert any(not torch.equal(train_a[0][k], train_c[0][k]) for k in train_a[0])


# ---------------------------------------------------------------------------------------------------------
# 6. Load: the memory check tool runs and reports (its figures are in docs/reliability.md)


def test_memory_check_reports_rss_per_batch(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_check", ROOT / "tools/analysis_tools/memory_check.py")
    memory_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_check)
    out = tmp_path / "memory.json"
    argv = ["--num-images", "3", "--batch-sizes", "1", "2", "--min-size", "32", "--max-size", "64", "--warmup", "0.3"]
    few = ["--cfg-options", "model.test_cfg.rpn.max_per_img=20", "model.test_cfg.rcnn.max_per_img=3"]
    report = memory_check.main([str(SVIT_CFG), *argv, "--passes", "2", *few, "--json-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == {"mask-rcnn_svit-t_simplefpn_shapes"}
    for runs in report["results"].values():
        assert [r["batch_size"] for r in runs] == [1, 2]
        for r in runs:
            one_pass = list(range(r["batch_size"], 3, r["batch_size"])) + [3]
            assert r["images_done"] == one_pass + [3 + n for n in one_pass]
            assert len(r["rss_mb"]) == len(r["images_done"]) and all(v > 0 for v in r["rss_mb"])
            assert r["rss_end_mb"] == r["rss_mb"][-1] and r["rss_max_mb"] == max(r["rss_mb"])
            assert r["rss_pass_end_mb"] == [r["rss_mb"][len(one_pass) - 1], r["rss_mb"][-1]]
            assert r["growth_in_last_pass_mb"] == round(r["rss_pass_end_mb"][1] - r["rss_pass_end_mb"][0], 2)
            assert r["growth_after_warmup_mb"] == round(r["rss_end_mb"] - r["rss_warm_mb"], 2)
