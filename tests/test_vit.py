"""The dense ViT backbone against timm's own VisionTransformer, and weight loading from timm/DeiT files."""

import pytest
import timm
import torch

from tokenprune.errors import WeightsMismatchError
from tokenprune.models import SimpleFPN, load_timm_vit, vit_small, vit_tiny


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def test_matches_timm_deit_small_with_cls_token(deit_s, tmp_path):
    path = tmp_path / "deit_s.pth"
    torch.save({"model": deit_s.state_dict()}, path)
    ours = vit_small(img_size=224, cls_token=True).eval()
    report = load_timm_vit(ours, str(path))
    assert report.missing == [] and report.unexpected == []
    assert "head.weight" in report.dropped
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = deit_s.forward_features(x)[:, 1:]
        got = ours(x)
    assert got.shape == (2, 384, 14, 14)
    assert (got.flatten(2).transpose(1, 2) - want).abs().max().item() < 1e-4


def test_without_cls_token_drops_it_and_differs(deit_s):
    ours = vit_small(cls_token=False).eval()
    report = load_timm_vit(ours, deit_s.state_dict())
    assert "cls_token" in report.dropped and report.missing == []
    assert ours.pos_embed.shape == (1, 196, 384)
    assert torch.equal(ours.pos_embed, deit_s.pos_embed[:, 1:])


@pytest.mark.parametrize("hw, grid", [((320, 480), (20, 30)), ((333, 250), (21, 16)), ((16, 16), (1, 1))])
def test_any_input_size(hw, grid):
    model = vit_tiny(img_size=224).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    assert out.shape == (1, 192, *grid)
    assert torch.isfinite(out).all()


def test_pos_embed_resampled_to_backbone_grid(deit_s):
    ours = vit_small(img_size=256, cls_token=True)
    load_timm_vit(ours, deit_s.state_dict())
    assert ours.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(ours.pos_embed[:, 0], deit_s.pos_embed[:, 0])


def test_wrong_model_size_is_refused(deit_s):
    with pytest.raises(WeightsMismatchError, match="different model size.*embed_dim=192"):
        load_timm_vit(vit_tiny(), deit_s.state_dict())


def test_not_a_vit_file_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(WeightsMismatchError, match="not a timm or DeiT ViT"):
        load_timm_vit(vit_tiny(), str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_timm_vit(vit_tiny(), str(tmp_path / "missing.pth"))


def test_extra_and_missing_keys_are_reported(deit_s):
    sd = dict(deit_s.state_dict())
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    del sd["blocks.11.mlp.fc2.bias"]
    report = load_timm_vit(vit_small(cls_token=True), sd)
    assert report.unexpected == ["blocks.0.extra.weight"]
    assert report.missing == ["blocks.11.mlp.fc2.bias"]
    assert "missing in the file" in str(report) and "unexpected" in str(report)


def test_simple_fpn_strides():
    neck = SimpleFPN(192, 64, num_outs=5)
    outs = neck((torch.randn(2, 192, 20, 30),))
    assert [o.shape[-2:] for o in outs] == [(80, 120), (40, 60), (20, 30), (10, 15), (5, 8)]
    assert all(o.shape[:2] == (2, 64) for o in outs)


def test_roi_align_reads_the_simple_fpn_levels_correctly():
    """Regression: the neck's maps used to be permuted views (channels-last memory), which mmcv's CPU RoIAlign
    reads as if contiguous, so the RoI heads of every SimpleFPN detector got scrambled features and did not
    learn. mmcv's RoIAlign on each level must equal torchvision's, which honours strides."""
    mmcv_ops = pytest.importorskip("mmcv.ops")
    from torchvision.ops import roi_align as tv_roi_align

    torch.manual_seed(0)
    tokens = torch.randn(2, 8 * 12, 64)  # the backbone's map is a token-major (channels-last) view
    outs = SimpleFPN(64, 32, num_outs=5)(tokens.transpose(1, 2).reshape(2, 64, 8, 12))
    rois = torch.tensor([[0, 10.0, 20.0, 90.0, 70.0], [1, 33.0, 5.0, 60.0, 120.0], [1, 0.0, 0.0, 191.0, 127.0]])
    for level, stride in zip(outs, (4, 8, 16, 32, 64)):
        assert level.is_contiguous()
        ours = mmcv_ops.roi_align(level, rois, (7, 7), 1 / stride, 2, "avg", True)
        reference = tv_roi_align(level, rois, (7, 7), 1 / stride, 2, aligned=True)
        assert torch.allclose(ours, reference, atol=1e-5)
