"""EViT token reorganisation (tokenprune.models.reducers.evit) in the ViT backbone, on tiny models."""

import functools
import math

import pytest
import reducer_checks
import torch
from reducer_checks import (
    DEPTH,
    DIM,
    HEADS,
    assert_batch_equals_singles,
    assert_matches_dense,
    assert_shapes_match_dense,
    capture_states,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models import ViT
from tokenprune.models.reducers import EViTReducer, build_reducer
from tokenprune.models.reducers.toolkit import attention_half

images = functools.partial(reducer_checks.images, size=(64, 96))  # a 4 x 6 grid of patches

SCORES = [(True, "cls"), (True, "mean_attention"), (False, "mean_attention")]


def make_model(cls_token=False, score=None, **kwargs):
    score = score or ("cls" if cls_token else "mean_attention")
    kwargs = {"blocks": (1, 3, 4), "keep_ratio": 0.5, "score": score, **kwargs}
    return make_vit(EViTReducer(DIM, **kwargs), cls_token=cls_token)


@pytest.mark.parametrize("restore", ["fused", "last"])
@pytest.mark.parametrize("cls_token, score", SCORES)
def test_odd_and_non_square_inputs_give_the_dense_map(cls_token, score, restore):
    assert_shapes_match_dense(make_model(cls_token, score, restore=restore).eval())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token, score", SCORES)
def test_keep_rate_one_matches_dense(cls_token, score, training):
    model = make_model(cls_token, score, keep_ratio=1.0).train(training)
    assert_matches_dense(model, images(2))
    assert all(v.item() == 1.0 for k, v in model.last_record.stats.items() if k.startswith("keep_rate."))


def group_sizes(ids: torch.Tensor) -> torch.Tensor:
    """(B, n) token map -> (B, n) number of positions sharing each position's id."""
    return (ids.unsqueeze(-1) == ids.unsqueeze(1)).sum(-1)


@pytest.mark.parametrize("cls_token, score", SCORES)
def test_fused_token_is_restored_to_every_source_position(cls_token, score):
    model = make_model(cls_token, score, restore="fused").eval()
    model.record_tokens = True
    states = capture_states(model)
    with torch.no_grad():
        tokens, _ = model.forward_features(images(2))
    P, state = int(cls_token), states[0]
    patches = tokens[:, P:]
    fused_value = model.norm(state.finish_input[:, -1])  # the last fusion's token ends the set
    last_cluster = state.owner == state.finish_input.shape[1] - P - 1
    assert (last_cluster.sum(1) > 1).all()
    torch.testing.assert_close(patches[last_cluster], fused_value.repeat_interleave(last_cluster.sum(1), dim=0))
    ids = model.last_record.token_maps[4]  # after the last reducing block
    for b in range(2):  # every cluster (a fused token kept later is one too) holds one value at all positions
        for i in ids[b].unique():
            members = patches[b][ids[b] == i]
            torch.testing.assert_close(members, members[:1].expand_as(members))
    alone = patches[group_sizes(ids) == 1]
    assert len(alone) > 0 and (alone[:, None] - fused_value[None]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("cls_token, score", SCORES)
def test_restore_last_keeps_the_value_before_fusion(cls_token, score):
    model = make_model(cls_token, score, blocks=(2,), restore="last").eval()
    model.record_tokens = True
    before = []
    model.blocks[1].register_forward_hook(lambda m, args, out: before.append(out))  # block 2 input
    with torch.no_grad():
        tokens, _ = model.forward_features(images(2))
    P = int(cls_token)
    fused = group_sizes(model.last_record.token_maps[2]) > 1
    assert fused.sum(1).tolist() == [12, 12]  # 24 tokens, keep 0.5: 12 fused per image
    torch.testing.assert_close(tokens[:, P:][fused], model.norm(before[0][:, P:][fused]))


@pytest.mark.parametrize("fuse", ["mean", "sum"])
@pytest.mark.parametrize("cls_token, score", SCORES)
def test_attentive_tokens_kept_and_the_rest_fused_by_attention(cls_token, score, fuse, monkeypatch):
    from tokenprune.models.reducers import evit

    model = make_model(cls_token, score, blocks=(2,), fuse=fuse).eval()
    model.record_tokens = True
    before, mlp_inputs = [], []
    model.blocks[1].register_forward_hook(lambda m, args, out: before.append(out))  # block 2 input
    mlp_half = evit.mlp_half
    monkeypatch.setattr(evit, "mlp_half", lambda block, y: mlp_inputs.append(y) or mlp_half(block, y))
    with torch.no_grad():
        model(images(2))
        # the expected reduction, from the block's attention computed by toolkit.attention_half
        x, P = before[0], int(cls_token)
        trace = attention_half(model.blocks[2], x, attn_rows="all")
        B, N, C = x.shape
        attn_out = (trace.attn @ trace.v).transpose(1, 2).reshape(B, N, C)
        mid = x + model.blocks[2].attn.proj(attn_out)
    scores = trace.attn[:, :, 0, P:].mean(1) if score == "cls" else trace.attn[:, :, :, P:].mean((1, 2))
    k = math.ceil(0.5 * (N - P))
    top = scores.topk(k, dim=1).indices.sort(dim=1).values
    ids = model.last_record.token_maps[2]
    kept = (ids == torch.arange(N - P)) & (group_sizes(ids) == 1)
    assert torch.equal(kept.nonzero()[:, 1].reshape(B, k), top)
    y = mlp_inputs[0]
    assert y.shape == (B, P + k + 1, C)
    torch.testing.assert_close(y[:, P:-1], mid[:, P:].gather(1, top.unsqueeze(-1).expand(-1, -1, C)))
    w = scores.masked_fill(kept, 0.0).unsqueeze(-1)
    want = (w * mid[:, P:]).sum(1)
    if fuse == "mean":
        want = want / w.sum(1)
    torch.testing.assert_close(y[:, -1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("restore", ["fused", "last"])
def test_batch_equals_one_at_a_time(restore, training):
    model = make_model(restore=restore).train(training)
    assert_batch_equals_singles(model, images(3))


@pytest.mark.parametrize("keep_rate", [0.05, 1.0])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token, score", SCORES)
def test_extreme_budgets(cls_token, score, keep_rate, training):
    model = make_model(cls_token, score, keep_ratio=keep_rate).train(training)
    model.record_tokens = True
    x = images(3)
    out = model(x)
    assert torch.isfinite(out).all()
    if training:
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    P = int(cls_token)
    counts = model.last_record.token_counts[:, 0].tolist()
    if keep_rate == 1.0:
        assert counts == [24 + P] * DEPTH
    else:  # ceil(0.05 * 24) = 2 kept + 1 fused, then ceil(0.05 * 3) = 1 kept + 1 fused, twice
        assert counts == [24 + P] * 2 + [3 + P] * 2 + [2 + P] * 2
        distinct = {b: [len(row.unique()) for row in ids] for b, ids in model.last_record.token_maps.items()}
        assert distinct == {1: [3] * 3, 3: [2] * 3, 4: [2] * 3}


def test_paper_schedule_deit_s_224():
    # EViT's DeiT-S setting: class token, keep 0.7 at blocks 3, 6, 9 (0-indexed), inattentive tokens fused;
    # 196 patches -> 138 + 1 fused -> 98 + 1 -> 70 + 1 (a tiny width: the counts depend on the schedule only)
    reducer = EViTReducer(24, blocks=(3, 6, 9), keep_ratio=0.7, score="cls")
    model = ViT(img_size=224, embed_dim=24, depth=12, num_heads=2, cls_token=True, reducer=reducer).eval()
    model.record_tokens = True
    mlp_tokens = {}
    for i in (3, 6, 9):
        model.blocks[i].mlp.register_forward_hook(lambda m, args, out, i=i: mlp_tokens.__setitem__(i, out.shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    want = [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2  # what each block's attention runs on
    assert model.last_record.token_counts.T.tolist() == [want, want]
    assert mlp_tokens == {3: 140, 6: 100, 9: 72}  # the reducing blocks' MLPs already run on the kept set
    assert {b: len(ids[0].unique()) for b, ids in model.last_record.token_maps.items()} == {3: 139, 6: 99, 9: 71}
    assert model.last_record.stats["keep_rate.block3"].item() == pytest.approx(139 / 196)
    assert model.last_record.extra_macs == (58 + 41 + 29) * 24  # the fused tokens' weighted sums


def test_invalid_settings():
    with pytest.raises(ValueError, match="needs a class token"):
        make_model(cls_token=False, score="cls")(images(1))
    with pytest.raises(ValueError, match="one value per reducing block"):
        EViTReducer(DIM, blocks=(1, 2), keep_ratio=(0.7,))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        EViTReducer(DIM, keep_ratio=0.0)
    with pytest.raises(ValueError, match="use restore='last'"):
        EViTReducer(DIM, fuse="none", restore="fused")
    with pytest.raises(ValueError, match="score must be one of"):
        EViTReducer(DIM, score="cls_attention")
    with pytest.raises(ValueError, match="depth 6"):
        make_model(blocks=(3, 6))
    with pytest.raises(ConfigError, match="invalid EViT reducer settings"):
        build_reducer({"type": "EViT", "keep_ratio": 1.5}, DIM)
    default = build_reducer({"type": "EViT"}, DIM)  # the paper's blocks 3, 6, 9 need 10 blocks at least
    with pytest.raises(ValueError, match="do not fit a backbone of depth 6"):
        ViT(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, reducer=default)
    with pytest.raises(ValueError, match="embed_dim=96"):
        ViT(embed_dim=DIM, depth=12, num_heads=HEADS, reducer=EViTReducer(96))


def test_without_fusion_dropped_positions_keep_their_last_value():
    model = make_model(blocks=(2,), fuse="none", restore="last").eval()
    model.record_tokens = True
    before = []
    model.blocks[1].register_forward_hook(lambda m, args, out: before.append(out))  # block 2 input
    with torch.no_grad():
        tokens, _ = model.forward_features(images(2))
    dropped = model.last_record.token_maps[2] < 0
    assert dropped.sum(1).tolist() == [12, 12]
    assert model.last_record.token_counts[3:, 0].tolist() == [12] * 3  # no fused token
    torch.testing.assert_close(tokens[dropped], model.norm(before[0][dropped]))
