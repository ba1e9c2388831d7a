"""ViT-Adapter backbone (tokenprune.models.vit_adapter), its token reduction, and the official-checkpoint
converter (tokenprune.models.convert_official, tools/model_converters/official_to_tokenprune.py)."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from tokenprune.errors import WeightsMismatchError
from tokenprune.models.convert_official import convert_official_state_dict, is_official_layout, load_official
from tokenprune.models.reducers import REDUCERS, SViTReducer, build_reducer
from tokenprune.models.vit_adapter import ViTAdapter, ms_deform_attn_core

ROOT = Path(__file__).resolve().parents[1]
DIM = 48
TINY = dict(
    img_size=64,
    embed_dim=DIM,
    depth=4,
    num_heads=3,
    deform_num_heads=3,
    conv_inplane=8,
    interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
)
GATED = dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343])


def tiny(reducer=None, **kwargs) -> ViTAdapter:
    torch.manual_seed(0)
    return ViTAdapter(**{**TINY, **kwargs}, reducer=reducer)


@torch.no_grad()
def randomize(model: ViTAdapter, seed: int = 1) -> ViTAdapter:
    """Move every weight off its initial value (injector gammas start at 0, BatchNorm at identity), so that
    every part of the model shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def images(*size, batch=2, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# the backbone


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (72, 100), (50, 33)])
def test_output_shapes(size):
    model = tiny().eval()
    with torch.no_grad():
        outs = model(images(*size))
    H, W = (-(-s // 32) * 32 for s in size)  # padded to multiples of 32
    assert [tuple(o.shape) for o in outs] == [(2, DIM, H // s, W // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_padding_is_zero_padding():
    model = randomize(tiny()).eval()
    x = images(72, 100)
    with torch.no_grad():
        a = model(x)
        b = model(torch.nn.functional.pad(x, (0, 128 - 100, 0, 96 - 72)))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_deformable_attention_matches_mmcv_pytorch_path():
    pytest.importorskip("mmcv.ops")
    from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (2, 3), (1, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 3, 8, generator=g)
    locations = torch.rand(2, 5, 3, 3, 4, 2, generator=g) * 1.4 - 0.2  # some outside the map
    weights = torch.rand(2, 5, 3, 3, 4, generator=g)
    ours = ms_deform_attn_core(value, shapes, locations, weights)
    theirs = multi_scale_deformable_attn_pytorch(value, torch.tensor(shapes), locations, weights)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_every_part_gets_gradients():
    model = randomize(tiny()).train()
    loss = sum(o.square().mean() for o in model(images(64, 96)))
    loss.backward()
    parts = ["spm.stem.0", "level_embed", "interactions.0.injector", "interactions.3.extra_extractors.1",
             "blocks.0", "patch_embed", "pos_embed", "up.", "norm4"]  # fmt: skip
    for part in parts:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(interaction_indexes=[[0, 1], [3, 3]]), "consecutive"),
        (dict(interaction_indexes=[[0, 1], [2, 2]]), "consecutive"),
        (dict(patch_size=8), "patch_size=16"),
        (dict(norm="GN"), "'BN' or 'SyncBN'"),
        (dict(reducer_scope="block"), "reducer_scope"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTAdapter(**{**TINY, **kwargs})


def test_block_norm_eps_reaches_the_blocks():
    model = tiny(block_norm_eps=1e-5)
    assert {b.norm1.eps for b in model.blocks} == {b.norm2.eps for b in model.blocks} == {1e-5}


# token reduction inside the adapter


KEEP_ALL = {
    "SViT": dict(blocks=[1, 2, 3], keep_targets=[1.0] * 3),
    "EViT": dict(blocks=[1, 2, 3], keep_ratio=1.0, score="mean_attention"),
    "DynamicViT": dict(blocks=[1, 2, 3], keep_targets=[1.0] * 3),
}


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keeping_every_token_equals_dense(name):
    if name not in REDUCERS:
        pytest.skip(f"{name} is not registered")
    dense = randomize(tiny()).eval()
    pruned = tiny(build_reducer(dict(type=name, **KEEP_ALL[name]), DIM)).eval()
    pruned.load_state_dict(dense.state_dict(), strict=False)
    x = images(64, 96)
    with torch.no_grad():
        a, b = dense(x), pruned(x)
    assert pruned.scope == ("backbone" if name == "SViT" else "stage")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert float(pruned.last_record.stats["keep_rate.mean"]) == 1.0


def test_svit_pruning_changes_outputs_and_counts():
    dense = randomize(tiny()).eval()
    pruned = tiny(SViTReducer(DIM, inference="fixed", **GATED)).eval()
    pruned.load_state_dict(dense.state_dict(), strict=False)
    pruned.record_tokens = True
    x = images(64, 96)
    with torch.no_grad():
        a, b = dense(x), pruned(x)
    assert pruned.scope == "backbone"
    assert not torch.allclose(a[2], b[2])
    n = 4 * 6
    expected = [n, -(-0.7 * n // 1), -(-0.49 * n // 1), -(-0.343 * n // 1)]
    assert pruned.last_record.token_counts.tolist() == [[c, c] for c in expected]


def test_stage_scope_merges_the_stages():
    """DynamicViT at inference drops tokens from the set, so it runs once per stage: each stage's pruning
    block keeps its fraction of all tokens; counts, stats and maps cover the three pruning blocks."""
    if "DynamicViT" not in REDUCERS:
        pytest.skip("DynamicViT is not registered")
    model = randomize(tiny(build_tiny_reducer("DynamicViT"))).eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images(64, 96))
    assert model.scope == "stage"
    n = 4 * 6
    expected = [n] + [int(r * n) for r in (0.7, 0.49, 0.343)]
    assert model.last_record.token_counts.tolist() == [[c, c] for c in expected]
    assert {f"keep_rate.block{b}" for b in (1, 2, 3)} <= set(model.last_record.stats)
    assert model.last_record.token_maps.keys() == {1, 2, 3}
    assert model.last_record.extra_macs > 0


def test_stage_scope_refused_for_svit():
    with pytest.raises(ValueError, match="reducer_scope='auto' or 'backbone'"):
        tiny(SViTReducer(DIM, **GATED), reducer_scope="stage")


def test_svit_training_step():
    model = randomize(tiny(SViTReducer(DIM, **GATED))).train()
    outs = model(images(64, 96))
    assert "loss_svit_ratio" in model.last_record.aux_losses
    loss = sum(o.square().mean() for o in outs) + model.last_record.aux_losses["loss_svit_ratio"]
    loss.backward()
    for name in ("reducer.gates.0.fc1.weight", "reducer.gates.2.fc2.weight", "interactions.2.injector.gamma"):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(model.last_record.stats) >= {f"keep_rate.block{b}" for b in (1, 2, 3)}


# every registered reducer: the ones that shrink the token set run per stage ('auto')

REDUCER_KWARGS = {
    "SViT": GATED,
    "EViT": dict(blocks=[1, 2, 3], keep_ratio=0.7, score="mean_attention"),
    "DynamicViT": dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343]),
    "TPC": dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.49, 0.343]),
    "PPT": dict(blocks=[1, 2, 3], keep_ratio=0.7, importance="mean"),
    "BAT": dict(blocks=[1, 2, 3], keep_ratio=0.7, importance="mean"),
}


def build_tiny_reducer(name: str):
    try:
        return build_reducer(dict(type=name, **REDUCER_KWARGS.get(name, {})), DIM)
    except ValueError as e:
        pytest.skip(f"{name} with default settings does not fit the tiny adapter: {e}")


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_every_reducer_runs_in_the_adapter(name):
    model = tiny()
    try:
        model.set_reducer(build_tiny_reducer(name))
    except ValueError as e:
        pytest.skip(f"{name} does not fit the tiny adapter's 4 blocks: {e}")
    randomize(model)
    x = images(64, 96)
    model.train()
    outs = model(x)
    loss = sum(o.square().mean() for o in outs) + sum(model.last_record.aux_losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    model.record_tokens = True  # token counts of every scope, stage by stage included
    with torch.no_grad():
        outs = model(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(torch.isfinite(o).all() for o in outs)
    counts = model.last_record.token_counts
    assert counts.shape == (4, 2)
    assert counts[0].tolist() == [4 * 6, 4 * 6]  # block 0 reduces nothing: every token
    assert ((counts >= 1) & (counts <= 4 * 6)).all()


def test_backbone_scope_refuses_a_shrinking_reducer():
    reducer = build_tiny_reducer("EViT") if "EViT" in REDUCERS else pytest.skip("EViT is not registered")
    model = tiny(reducer, reducer_scope="backbone").eval()
    with pytest.raises(ValueError, match="reducer_scope='stage'"), torch.no_grad():
        model(images(64, 96))
    assert tiny(reducer).scope == "stage"


# weights: the official layouts and DeiT / timm

SVIT_BLOCK = {
    "attn.qkv.weight": "TransformerEncoderLayer.self_attn.in_proj_weight",
    "attn.qkv.bias": "TransformerEncoderLayer.self_attn.in_proj_bias",
    "attn.proj.weight": "TransformerEncoderLayer.self_attn.out_proj.weight",
    "attn.proj.bias": "TransformerEncoderLayer.self_attn.out_proj.bias",
    "mlp.fc1.weight": "TransformerEncoderLayer.linear1.weight",
    "mlp.fc1.bias": "TransformerEncoderLayer.linear1.bias",
    "mlp.fc2.weight": "TransformerEncoderLayer.linear2.weight",
    "mlp.fc2.bias": "TransformerEncoderLayer.linear2.bias",
    "norm1.weight": "TransformerEncoderLayer.norm1.weight",
    "norm1.bias": "TransformerEncoderLayer.norm1.bias",
    "norm2.weight": "TransformerEncoderLayer.norm2.weight",
    "norm2.bias": "TransformerEncoderLayer.norm2.bias",
}


def official_layout(model: ViTAdapter, svit: bool = False, layer_scale: bool = False) -> dict:
    """Our model's weights under the official code's names, as a whole-detector checkpoint would hold them:
    ``backbone.`` prefix, DeiT's class-token slot in pos_embed, SViT's encoder-layer and gate names, or
    ViT-Adapter's LayerScale (random gammas, the projections divided by them so the function is unchanged)."""
    g = torch.Generator().manual_seed(2)
    dim = model.embed_dim
    sd = {}
    for k, v in model.state_dict().items():
        if k in ("reducer.thresholds", "reducer.calibration_steps"):
            continue  # ours only
        if k == "pos_embed":
            v = torch.cat([torch.randn(1, 1, dim, generator=g), v], dim=1)
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if layer_scale and m and m[2] in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            gamma_key = f"blocks.{m[1]}.gamma{1 if m[2].startswith('attn') else 2}"
            if gamma_key not in sd:
                sd[gamma_key] = 0.5 + torch.rand(dim, generator=g)
            v = v / (sd[gamma_key][:, None] if v.dim() == 2 else sd[gamma_key])
        if svit and m:
            k = f"blocks.{m[1]}.{SVIT_BLOCK[m[2]]}"
        if svit and k.startswith("reducer.gates."):
            k = re.sub(r"^reducer\.gates\.(\d+)\.(fc[12])\.", r"selective_modules.\1.mlp.\2.", k)
            k = k.replace("reducer.gates.", "selective_modules.")
        sd[k] = v
    sd = {"backbone." + k: v for k, v in sd.items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, DIM, 1, 1)
    return sd


def test_official_vit_adapter_checkpoint_loads_and_reproduces():
    source = randomize(tiny()).eval()
    official = official_layout(source, layer_scale=True)
    official["backbone.norm.weight"] = torch.ones(DIM)  # a final norm the adapter does not have
    assert is_official_layout(official)
    target = tiny().eval()
    report = load_official(target, {"state_dict": official})
    assert report.missing == [] and report.defaults == [] and report.unexpected == []
    assert report.conversion.unplaced == ["norm.weight"]
    assert len(report.conversion.folded) == 2 * 4
    assert report.ignored == ["neck.lateral_convs.0.conv.weight"]
    x = images(64, 96)
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_scale_kept_for_a_layer_scale_model():
    source = randomize(tiny()).eval()
    target = tiny(init_values=1e-5).eval()
    report = load_official(target, official_layout(source, layer_scale=True))
    assert report.missing == [] and not report.conversion.folded
    assert not torch.equal(target.blocks[0].ls1.gamma, torch.full((DIM,), 1e-5))
    x = images(64, 96)
    with torch.no_grad():
        for a, b in zip(source(x), target(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_official_svit_checkpoint_loads_and_reproduces():
    source = randomize(tiny(SViTReducer(DIM, **GATED))).eval()
    official = official_layout(source, svit=True)
    assert any(".TransformerEncoderLayer.self_attn.in_proj_weight" in k for k in official)
    assert "backbone.selective_modules.0.mlp.fc1.weight" in official
    target = tiny(SViTReducer(DIM, **GATED)).eval()
    report = load_official(target, official)
    assert report.missing == [] and report.unexpected == [] and report.conversion.unplaced == []
    assert report.defaults == ["reducer.calibration_steps", "reducer.thresholds"]
    x = images(64, 96)
    with torch.no_grad():
        a, b = source(x), target(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(source.reducer.gates[2].fc2.weight, target.reducer.gates[2].fc2.weight)


def test_wrong_model_size_is_refused():
    official = official_layout(randomize(tiny()))
    with pytest.raises(WeightsMismatchError, match="different model"):
        load_official(tiny(embed_dim=96, deform_num_heads=6), official)


def test_converter_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "official_to_tokenprune", ROOT / "tools/model_converters/official_to_tokenprune.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    source = randomize(tiny(SViTReducer(DIM, **GATED))).eval()
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"meta": {"epoch": 6}, "state_dict": official_layout(source, svit=True)}, src)
    assert cli.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "could not place (left out): none" in out
    # no thresholds in the official file: added uncalibrated, and the report says how to calibrate them
    assert "added, uncalibrated" in out and f"tools/analysis_tools/recalibrate.py CONFIG {dst} " in out
    assert "model.backbone.reducer.inference=sample" in out
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["state_dict"]["backbone.reducer.calibration_steps"].tolist() == [0, 0, 0]
    assert ckpt["state_dict"]["backbone.reducer.thresholds"].tolist() == [0.0, 0.0, 0.0]
    assert "neck.lateral_convs.0.conv.weight" in ckpt["state_dict"]
    assert "backbone.blocks.3.attn.qkv.weight" in ckpt["state_dict"]
    assert not any("TransformerEncoderLayer" in k or "selective_modules" in k for k in ckpt["state_dict"])
    target = tiny(SViTReducer(DIM, **GATED)).eval()
    assert load_official(target, str(dst)).missing == []
    x = images(64, 96)
    with torch.no_grad():
        assert all(torch.equal(u, v) for u, v in zip(source(x), target(x)))

    bad = official_layout(source)
    bad["backbone.head.weight"] = torch.zeros(10, DIM)
    torch.save(bad, src)
    assert cli.main([str(src), str(dst)]) == 1
    out = capsys.readouterr().out
    assert "could not place (left out): ['backbone.head.weight']" in out
    assert "added, uncalibrated" in out  # gates under our names, no thresholds: the same advice

    dense = official_layout(randomize(tiny()), layer_scale=True)
    torch.save(dense, src)
    assert cli.main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "recalibrate" not in out and "added" not in out  # no gates: nothing to calibrate
    assert not any(k.startswith("backbone.reducer.") for k in torch.load(dst, weights_only=True)["state_dict"])


def test_convert_keeps_layer_scale_on_request():
    sd = official_layout(randomize(tiny()), layer_scale=True)
    out, report = convert_official_state_dict(sd, layer_scale="keep")
    assert "backbone.blocks.2.ls2.gamma" in out and not report.folded
    assert torch.equal(out["backbone.blocks.2.ls2.gamma"], sd["backbone.blocks.2.gamma2"])


def test_deit_weights_into_the_mmdet_backbone(tmp_path):
    pytest.importorskip("mmdet")
    from timm.models.vision_transformer import VisionTransformer

    from tokenprune.mmdet_plugin.adapter import TokenPruneViTAdapter

    torch.manual_seed(3)
    deit = VisionTransformer(img_size=64, patch_size=16, embed_dim=DIM, depth=4, num_heads=3, num_classes=10)
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict()}, path)
    backbone = TokenPruneViTAdapter(**TINY, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    spm_before = backbone.spm.fc1.weight.clone()
    backbone.init_weights()
    assert torch.equal(backbone.blocks[3].mlp.fc2.weight, deit.blocks[3].mlp.fc2.weight)
    assert torch.equal(backbone.pos_embed, deit.pos_embed[:, 1:])  # class-token slot dropped, same grid
    assert torch.equal(backbone.spm.fc1.weight, spm_before)

    # an official-layout file through the same init_cfg is recognised and converted
    source = randomize(tiny())
    torch.save(official_layout(source), path)
    backbone.init_weights()
    assert torch.equal(backbone.spm.fc1.weight, source.spm.fc1.weight)
    assert torch.equal(backbone.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_mmdet_backbone_errors():
    pytest.importorskip("mmdet")
    from tokenprune.errors import ConfigError
    from tokenprune.mmdet_plugin.adapter import TokenPruneViTAdapter

    with pytest.raises(ConfigError, match="interaction_indexes"):
        TokenPruneViTAdapter(**{**TINY, "interaction_indexes": [[0, 2]]})
    with pytest.raises(ConfigError, match="unknown reducer type"):
        TokenPruneViTAdapter(**TINY, reducer=dict(type="Nope"))
    with pytest.raises(ConfigError, match="init_cfg"):
        TokenPruneViTAdapter(**TINY, init_cfg=dict(type="Kaiming"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
