"""BAT token decoupling and merging (tokenprune.models.reducers.bat) in the ViT backbone."""

import pytest
import torch
from reducer_checks import (
    DEPTH,
    DIM,
    IMG,
    assert_batch_equals_singles,
    assert_restored_from_tokens,
    assert_shapes_match_dense,
    assert_zero_budget_is_dense,
    capture_states,
    images,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models import vit_small
from tokenprune.models.reducers import REDUCERS, BATReducer, build_reducer
from tokenprune.models.reducers.bat import bat_plan, dpc_knn
from tokenprune.models.reducers.merging import attention_importance
from tokenprune.models.reducers.toolkit import attention_half

N = IMG[0] * IMG[1] // 256
BLOCKS = (1, 3, 4)


def make_model(cls_token: bool = True, **kwargs):
    kwargs = {"blocks": BLOCKS, "importance": "cls" if cls_token else "mean", "cluster_ratio": 0.3, **kwargs}
    return make_vit(BATReducer(DIM, **kwargs), cls_token=cls_token)


@pytest.mark.parametrize("cls_token", [True, False])
def test_output_shape_equals_dense_map(cls_token):
    assert_shapes_match_dense(make_model(cls_token).eval())


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_zero_budget_equals_dense(cls_token, training):
    assert_zero_budget_is_dense(make_model(cls_token, keep_ratio=1.0), training)


@pytest.mark.parametrize("cls_token", [True, False])
def test_merged_tokens_are_restored_to_every_source(cls_token):
    model = make_model(cls_token, restore="merged").eval()
    states = capture_states(model)
    assert_restored_from_tokens(model, images(2))
    assert states[0].frozen is None and states[0].pinned is None  # BAT merges, it never drops


@pytest.mark.parametrize("cls_token", [True, False])
def test_clustered_positions_keep_their_value_from_before_the_cluster(cls_token):
    # restore='last' (default): matched attentive pairs are copied back to their positions, while a position
    # merged into a cluster keeps the value it had entering the block that clustered it
    model = make_model(cls_token, blocks=(2,), keep_ratio=0.5).eval()
    states = capture_states(model)
    entering = []
    model.blocks[1].register_forward_hook(lambda m, args, out: entering.append(out))  # block 2's input
    sizes = assert_restored_from_tokens(model, images(2))
    assert max(sizes) >= 2  # attentive pairs were merged and copied back
    state, P = states[0], int(cls_token)
    pinned = state.pinned
    k, clusters, _ = bat_plan(N, 0.5, 0.3)
    assert (pinned[:, :P] == 0).all() and (pinned.sum(1) == N - k).all()  # exactly the inattentive positions
    tokens, _ = model.forward_features(images(2))
    assert torch.equal(tokens[pinned], model.norm(entering[-1])[pinned])
    merged = make_model(cls_token, blocks=(2,), keep_ratio=0.5, restore="merged").eval()
    merged.load_state_dict(model.state_dict())
    other, _ = merged.forward_features(images(2))
    assert torch.equal(other[~pinned], tokens[~pinned]) and not torch.allclose(other[pinned], tokens[pinned])


@pytest.mark.parametrize("training", [False, True])
def test_batch_equals_one_at_a_time(training):
    assert_batch_equals_singles(make_model(cls_token=False).train(training), images(3))


def test_deit_s_224_follows_evits_schedule():
    # DeiT-S, keep rate 0.7 at blocks 3, 6, 9: ceil(0.7 n) attentive + 1 -> 197 -> 140 -> 100 -> 72
    torch.manual_seed(0)
    model = vit_small(img_size=224, cls_token=True, reducer=BATReducer(384)).eval()
    model.record_tokens = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 384, 14, 14)
    assert model.last_record.token_counts[:, 0].tolist() == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    for block, kept in ((3, 139), (6, 99), (9, 71)):
        assert model.last_record.token_maps[block][0].unique().numel() == kept


@pytest.mark.parametrize("n, keep, clusters", [(196, 0.7, 0.1), (48, 0.05, 0.3), (1000, 0.3, 1.0), (5, 0.5, 0.5)])
def test_plan_hands_on_evits_count(n, keep, clusters):
    k, c, pairs = bat_plan(n, keep, clusters)
    assert 1 <= c <= n - k and pairs == c - 1 and 2 * pairs <= k
    assert k - pairs + c == k + 1 < n
    assert bat_plan(10, 1.0, 0.1) is None and bat_plan(10, 0.9, 0.1) is None  # nothing (or one token) to merge


def test_dpc_knn_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(7)
    x = (centres[labels] + 0.3 * torch.randn(21, 2, generator=g))[torch.randperm(21, generator=g)]
    truth = (x[:, None] - centres[None]).norm(dim=-1).argmin(dim=1)
    cluster = dpc_knn(x[None], 3, k=5)[0]
    for c in range(3):  # the same partition, whatever the cluster numbering
        assert (cluster[truth == c] == cluster[truth == c][0]).all()
    assert cluster.unique().numel() == 3
    # identical points: ties are broken by position, deterministic, and every cluster holds its centre
    same = torch.zeros(1, 6, 4)
    first, again = dpc_knn(same, 2, 5), dpc_knn(same, 2, 5)
    assert torch.equal(first, again) and sorted(first[0].unique().tolist()) == [0, 1]


def test_attentive_tokens_pair_and_inattentive_tokens_cluster():
    model = make_model(blocks=(2,), keep_ratio=0.5).eval()
    model.record_tokens = True
    with torch.no_grad():
        x, _ = model.embed(images(2))
        for blk in model.blocks[:2]:
            x = blk(x)
        half = attention_half(model.blocks[2], x, attn_rows="all")
        importance = attention_importance(half.attn, torch.ones(2, N + 1), 1, "cls")
        model(images(2))
    k, clusters, pairs = bat_plan(N, 0.5, 0.3)
    ids = model.last_record.token_maps[2]
    attentive = importance >= importance.sort(dim=1, descending=True).values[:, k - 1 : k]
    for b in range(2):
        groups = [ids[b] == t for t in ids[b].unique()]
        assert len(groups) == k + 1
        mixed = [g for g in groups if (g & attentive[b]).any() and (g & ~attentive[b]).any()]
        assert not mixed  # no group mixes attentive and inattentive tokens
        att_groups = [int(g.sum()) for g in groups if (g & attentive[b]).any()]
        assert len(att_groups) == k - pairs and sum(att_groups) == k  # (several A tokens may join one B)
        assert max(att_groups) >= 2
        assert sum(1 for g in groups if (g & ~attentive[b]).any()) == clusters


def test_merged_value_is_the_importance_weighted_mean():
    # BAT at the last block: each final token is the importance-weighted mean of its members' values after
    # attention, then the MLP, and it lands at all its members (restore='merged': clusters too)
    model = make_model(blocks=(DEPTH - 1,), keep_ratio=0.4, restore="merged").eval()
    states = capture_states(model)
    x = images(1)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        z, _ = model.embed(x)
        for blk in model.blocks[:-1]:
            z = blk(z)
        last = model.blocks[-1]
        half = attention_half(last, z, attn_rows="all")
        w = attention_importance(half.attn, torch.ones(1, N + 1), 1, "cls")[0] / last.attn.num_heads
        source = states[0].source[0, 1:]
        for t in source.unique():
            members = source == t
            mean = (half.x[0, 1:][members] * w[members, None]).sum(0, keepdim=True) / w[members].sum()
            want = model.norm(mean + last.mlp(last.norm2(mean)))
            assert torch.allclose(tokens[0, 1:][members], want.expand(int(members.sum()), -1), atol=1e-5)


def test_cls_importance_needs_a_class_token():
    model = make_vit(BATReducer(DIM, blocks=BLOCKS, importance="cls"), cls_token=False)
    with pytest.raises(ValueError, match="cls_token=True"):
        model(images(1))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="cluster_ratio"):
        BATReducer(DIM, cluster_ratio=0.0)
    with pytest.raises(ValueError, match="knn"):
        BATReducer(DIM, knn=0)
    with pytest.raises(ValueError, match="importance"):
        BATReducer(DIM, importance="max")
    with pytest.raises(ValueError, match="restore"):
        BATReducer(DIM, restore="fused")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        BATReducer(DIM, keep_ratio=1.2)
    with pytest.raises(ValueError, match="depth 6"):
        make_vit(BATReducer(DIM))  # blocks 3, 6, 9


def test_built_by_name():
    assert REDUCERS["BAT"] is BATReducer
    with pytest.raises(ConfigError, match="invalid BAT reducer settings"):
        build_reducer({"type": "BAT", "knn": -1}, DIM)
    reducer = build_reducer({"type": "BAT", "blocks": BLOCKS, "importance": "mean"}, DIM)
    model = make_vit(reducer)
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    assert set(model.last_record.token_maps) == set(BLOCKS) and (model.last_record.extra_macs > 0).all()
    assert not list(reducer.parameters())
