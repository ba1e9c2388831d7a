"""ToMe token merging (tokenprune.models.reducers.tome) in the ViT backbone, on tiny models and DeiT-S."""

import math

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
from tokenprune.models.reducers import REDUCERS, ToMeReducer, build_reducer
from tokenprune.models.reducers.toolkit import keep_count

N = IMG[0] * IMG[1] // 256


def make_model(cls_token: bool = False, **kwargs):
    return make_vit(ToMeReducer(DIM, **kwargs), cls_token=cls_token)


@pytest.mark.parametrize("cls_token", [True, False])
def test_output_shape_equals_dense_map(cls_token):
    assert_shapes_match_dense(make_model(cls_token).eval())


@pytest.mark.parametrize("budget", [{"keep_ratio": 1.0}, {"r": 0}])
@pytest.mark.parametrize("training", [False, True])
def test_zero_budget_equals_dense(budget, training):
    assert_zero_budget_is_dense(make_model(cls_token=True, **budget), training)


@pytest.mark.parametrize("cls_token", [True, False])
def test_merged_tokens_are_restored_to_every_source(cls_token):
    model = make_model(cls_token, keep_ratio=0.7).eval()
    sizes = assert_restored_from_tokens(model, images(2))
    assert max(sizes) >= 3  # merges of merges


@pytest.mark.parametrize("training", [False, True])
def test_batch_equals_one_at_a_time(training):
    model = make_model(keep_ratio=0.8).train(training)
    assert_batch_equals_singles(model, images(3))


@pytest.mark.parametrize("keep_ratio", [0.9, 0.3, 0.05])
def test_keep_ratio_of_the_current_tokens_is_met(keep_ratio):
    # below 0.5, one block runs several matching rounds to meet its ratio
    model = make_model(cls_token=True, keep_ratio=keep_ratio).eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    n = N
    for block in range(DEPTH):
        assert model.last_record.token_counts[block].tolist() == [1 + n] * 2
        n = keep_count(keep_ratio, n, min_keep=1)
        assert model.last_record.stats[f"keep_rate.block{block}"].item() == pytest.approx(n / N)
    maps = model.last_record.token_maps
    assert sorted(maps) == list(range(DEPTH))
    assert all(len(ids.unique()) == keep_count(keep_ratio, N, min_keep=1) for ids in maps[0])  # distinct ids = tokens


def test_only_the_configured_blocks_merge():
    model = make_model(blocks=(1, 4), keep_ratio=(0.5, 0.8)).eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    after_1 = keep_count(0.5, N, min_keep=1)
    want = [N, N, after_1, after_1, after_1, keep_count(0.8, after_1, min_keep=1)]
    assert model.last_record.token_counts[:, 0].tolist() == want
    assert sorted(model.last_record.token_maps) == [1, 4]
    stats = model.last_record.stats
    assert {k for k in stats if k.startswith("keep_rate.block")} == {"keep_rate.block1", "keep_rate.block4"}
    assert (model.last_record.extra_macs > 0).all()


def test_deit_s_224_reproduces_tomes_schedule():
    # DeiT-S, r = 13 in every block: 197 -> 184 -> ... -> 54 tokens entering the last block, 41 leaving it
    torch.manual_seed(0)
    model = vit_small(img_size=224, cls_token=True, reducer=ToMeReducer(384, r=13)).eval()
    model.record_tokens = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 384, 14, 14)
    assert model.last_record.token_counts[:, 0].tolist() == [197 - 13 * i for i in range(12)]
    assert model.last_record.stats["keep_rate.block11"].item() == pytest.approx(40 / 196)


def reference_merge(z: torch.Tensor, unm: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """ToMe's merge by summation: unmerged A tokens, then the B tokens with their merged A tokens added."""
    za, zb = z[:, ::2], z[:, 1::2]
    c = z.shape[-1]
    kept = za.gather(1, unm[..., None].expand(-1, -1, c))
    moved = za.gather(1, src[..., None].expand(-1, -1, c))
    zb = zb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce="sum")
    return torch.cat([kept, zb], dim=1)


def tome_reference(model, x: torch.Tensor, r: int) -> torch.Tensor:
    """ToMe as its paper describes it, written independently of the reducer: source matrices for unmerge,
    ``x * size`` summed and divided by the summed size, log(size) on the attention logits, merging between
    attention and MLP; the class token (first) protected. Returns the normalised, unmerged tokens."""
    x, _ = model.embed(x)
    B, N, C = x.shape
    protected = model.num_prefix_tokens
    size = None
    source = torch.eye(N).expand(B, N, N)
    for blk in model.blocks:
        h = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(B, -1, 3, h, C // h).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * (C // h) ** -0.5
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        attn_out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        x = x + blk.attn.proj(attn_out)
        t = x.shape[1]
        rr = min(r, (t - protected) // 2)
        metric = k.mean(1)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if protected:
            scores[:, 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edges = node_max.argsort(dim=-1, descending=True)
        unm, src = edges[:, rr:], edges[:, :rr]
        if protected:  # ToMe keeps the class token first; without one the unmerged stay in edge order
            unm = unm.sort(dim=1).values
        dst = node_idx.gather(1, src)

        s = torch.ones(B, t, 1) if size is None else size
        x, size = (
            reference_merge(x * s, unm, src, dst) / reference_merge(s, unm, src, dst),
            reference_merge(s, unm, src, dst),
        )
        source = reference_merge(source, unm, src, dst)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(source.transpose(1, 2) @ x)


@pytest.mark.parametrize("cls_token", [True, False])
def test_matches_tome_reference(cls_token):
    model = make_model(cls_token, r=5).eval()
    x = images(2)
    with torch.no_grad():
        got, _ = model.forward_features(x)
        want = tome_reference(model, x, 5)
    assert got.shape == want.shape == (2, N + cls_token, DIM)
    assert (got - want).abs().max().item() < 1e-4


def test_restored_value_is_the_size_weighted_mean_of_the_sources():
    # one merging block at the last block: each final token is the size-weighted mean of its sources'
    # post-attention values followed by the MLP, and lands at all its sources
    model = make_model(blocks=(DEPTH - 1,), keep_ratio=0.5).eval()
    states = capture_states(model)
    x = images(1)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        ref_tokens, _ = model.embed(x)
        for blk in model.blocks[:-1]:
            ref_tokens = blk(ref_tokens)
        h = model.blocks[-1]
        mid = ref_tokens + h.attn(h.norm1(ref_tokens))  # all sizes are 1 before the merge
        source = states[0].source[0]
        for t in source.unique():
            members = source == t
            merged = mid[0, members].mean(0, keepdim=True)
            want = model.norm(merged + h.mlp(h.norm2(merged)))
            assert torch.allclose(tokens[0, members], want.expand(int(members.sum()), -1), atol=1e-5)
    assert len(source.unique()) == keep_count(0.5, N, min_keep=1)


def test_invalid_arguments():
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ToMeReducer(DIM, keep_ratio=0.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ToMeReducer(DIM, keep_ratio=1.5)
    with pytest.raises(ValueError, match="either keep_ratio"):
        ToMeReducer(DIM, keep_ratio=0.9, r=3)
    with pytest.raises(ValueError, match="non-negative integers"):
        ToMeReducer(DIM, r=-1)
    with pytest.raises(ValueError, match="strictly increasing"):
        ToMeReducer(DIM, blocks=(3, 2))
    with pytest.raises(ValueError, match="one value per reducing block"):
        ToMeReducer(DIM, blocks=(1, 2), keep_ratio=(0.9, 0.9, 0.9))
    with pytest.raises(ValueError, match="one value per reducing block"):
        make_vit(ToMeReducer(DIM, keep_ratio=(0.9,) * (DEPTH + 1)))
    with pytest.raises(ValueError, match="depth 6"):
        make_vit(ToMeReducer(DIM, blocks=(2, 6)))
    with pytest.raises(ValueError, match="embed_dim"):
        make_vit(ToMeReducer(96))


def test_built_by_name():
    assert REDUCERS["ToMe"] is ToMeReducer
    reducer = build_reducer({"type": "ToMe", "keep_ratio": 0.8}, DIM)
    assert isinstance(reducer, ToMeReducer) and reducer.keep_ratio == 0.8
    with pytest.raises(ConfigError, match="invalid ToMe reducer settings"):
        build_reducer({"type": "ToMe", "keep_ratio": 2.0}, DIM)
    assert not list(reducer.parameters())  # training-free
