"""PPT token pruning and pooling (tokenprune.models.reducers.ppt) in the ViT backbone."""

import math

import pytest
import torch
from reducer_checks import (
    DIM,
    IMG,
    assert_batch_equals_singles,
    assert_extreme_budget_is_safe,
    assert_restored_from_tokens,
    assert_shapes_match_dense,
    assert_zero_budget_is_dense,
    capture_states,
    dense_twin,
    images,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models import vit_small
from tokenprune.models.reducers import REDUCERS, PPTReducer, build_reducer
from tokenprune.models.reducers.base import PRUNED
from tokenprune.models.reducers.ppt import PAPER_CV_THRESHOLD, ppt_scores, redundancy
from tokenprune.models.reducers.toolkit import attention_half

N = IMG[0] * IMG[1] // 256
BLOCKS = (1, 3, 4)
POOL, PRUNE = 1e9, 1e-12  # thresholds that make every image pool, or prune


def make_model(cls_token: bool = True, **kwargs):
    kwargs = {"blocks": BLOCKS, "importance": "cls" if cls_token else "mean", **kwargs}
    return make_vit(PPTReducer(DIM, **kwargs), cls_token=cls_token)


@pytest.mark.parametrize("cls_token", [True, False])
def test_output_shape_equals_dense_map(cls_token):
    assert_shapes_match_dense(make_model(cls_token).eval())


@pytest.mark.parametrize("budget", [{"keep_ratio": 1.0}, {"r": 0}])
@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_zero_budget_equals_dense(budget, cls_token, training):
    assert_zero_budget_is_dense(make_model(cls_token, **budget), training)


@pytest.mark.parametrize("cls_token", [True, False])
def test_pooled_tokens_are_restored_to_every_source(cls_token):
    model = make_model(cls_token, threshold=POOL).eval()
    states = capture_states(model)
    assert_restored_from_tokens(model, images(2))
    assert all(p.all() for p in states[0].extra["pooled"].values())
    assert states[0].frozen is None  # pooling drops nothing


@pytest.mark.parametrize("cls_token", [True, False])
def test_pruned_tokens_keep_their_value_after_the_pruning_block(cls_token):
    # a pruned token leaves after its block's MLP: its value in the output is the dense model's after that
    # block, as nothing was reduced before it
    model = make_model(cls_token, blocks=(2,), keep_ratio=0.5, threshold=PRUNE).eval()
    model.record_tokens = True
    dense = dense_twin(model)
    after = []
    dense.blocks[2].register_forward_hook(lambda m, i, o: after.append(o))
    x = images(2)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        dense(x)
    P = int(cls_token)
    pruned = model.last_record.token_maps[2] == PRUNED
    assert pruned.sum(1).tolist() == [N // 2] * 2
    want = model.norm(after[0])[:, P:]
    torch.testing.assert_close(tokens[:, P:][pruned], want[pruned], atol=1e-5, rtol=1e-5)
    kept = model.last_record.token_maps[2][~pruned]
    assert torch.equal(kept, torch.nonzero(~pruned)[:, 1])  # no merging when pruning
    assert (tokens[:, P:][~pruned] - want[~pruned]).abs().amax(-1).min() > 1e-4  # the others moved on


def test_pruning_removes_the_lowest_scores():
    model = make_model(blocks=(2,), r=10, threshold=PRUNE).eval()
    model.record_tokens = True
    with torch.no_grad():
        x, _ = model.embed(images(2))
        for blk in model.blocks[:2]:
            x = blk(x)
        half = attention_half(model.blocks[2], x, attn_rows="all")
        scores = ppt_scores(half.attn, half.v, torch.ones(2, N + 1), 1, "cls")
        model(images(2))
    pruned = model.last_record.token_maps[2] == PRUNED
    assert torch.equal(pruned, scores <= scores.sort(dim=1).values[:, 9:10])


def test_batch_equals_one_at_a_time_with_mixed_decisions():
    model = make_model(cls_token=False).eval()
    states = capture_states(model)
    x = images(4)
    with torch.no_grad():
        model(x)
    stat = states[0].extra["redundancy"][BLOCKS[0]].sort().values
    model.reducer.threshold = float(stat[1] + stat[2]) / 2  # two images pool, two prune at the first block
    assert_batch_equals_singles(model, x)
    pooled = states[1].extra["pooled"][BLOCKS[0]]
    assert pooled.sum() == 2
    assert states[1].frozen is not None and (states[1].size > 1).any()  # both branches ran
    with torch.no_grad():
        model(x)
    assert model.last_record.stats[f"pool_rate.block{BLOCKS[0]}"].item() == 0.5


@pytest.mark.parametrize("keep_ratio", [0.05, 1.0])
@pytest.mark.parametrize("threshold", [POOL, PRUNE])
@pytest.mark.parametrize("cls_token", [True, False])
def test_extreme_budgets(keep_ratio, threshold, cls_token):
    model = make_model(cls_token, keep_ratio=keep_ratio, threshold=threshold)
    assert_extreme_budget_is_safe(model, keep_ratio)


@pytest.mark.parametrize("threshold", [None, POOL, PRUNE])
def test_deit_s_224_reproduces_ppts_schedule(threshold):
    # DeiT-S, r = 50 at blocks 3, 6, 9: 197 -> 147 -> 97 -> 49 whether the images prune or pool
    torch.manual_seed(0)
    reducer = PPTReducer(384, r=50, criterion="variance", threshold=threshold)
    model = vit_small(img_size=224, cls_token=True, reducer=reducer).eval()
    model.record_tokens = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 384, 14, 14)
    assert model.last_record.token_counts[:, 0].tolist() == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 2
    stats = model.last_record.stats
    assert [stats[f"keep_rate.block{b}"].item() * 196 for b in (3, 6, 9)] == pytest.approx([146, 96, 48])


def test_default_keep_ratios_are_the_papers_schedule():
    reducer = PPTReducer(384)
    n, counts = 196, []
    for block in (3, 6, 9):
        n -= reducer.removals(block, n)
        counts.append(n)
    assert counts == [146, 96, 48]


def test_cv_criterion_does_not_depend_on_the_token_count():
    pattern = torch.rand(1, 196) + 0.1
    small = pattern / pattern.sum()
    large = pattern.repeat(1, 16) / pattern.repeat(1, 16).sum()  # the same distribution over 16x the tokens
    cv_small, cv_large = redundancy(small, "cv"), redundancy(large, "cv")
    assert cv_large.item() == pytest.approx(cv_small.item(), rel=1e-2)
    assert redundancy(large, "variance").item() == pytest.approx(redundancy(small, "variance").item() / 256, rel=2e-2)
    # at 196 tokens, the cv test with the default threshold is the paper's variance test
    var = redundancy(small, "variance").item()
    assert (cv_small.item() < PAPER_CV_THRESHOLD) == (var < 7e-5)
    assert PAPER_CV_THRESHOLD == pytest.approx(196 * math.sqrt(7e-5))


def ppt_reference(model, x: torch.Tensor, blocks, r: int, threshold: float):
    """PPT as its paper describes it, one image at a time, written independently of the reducer: class
    token protected, scores = class attention summed over heads x value norm, normalised; Var < threshold
    pools with ToMe (x * size summed / size, class token kept first), else the r lowest-scored tokens go
    (the rest in decreasing score); proportional attention. Returns final tokens and the (t, N) sources."""
    tokens, _ = model.embed(x)
    out = []
    for z in tokens.split(1):
        N, C = z.shape[1], z.shape[2]
        size, source = torch.ones(1, N), torch.eye(N)[None]
        for i, blk in enumerate(model.blocks):
            h = blk.attn.num_heads
            q, k, v = blk.attn.qkv(blk.norm1(z)).reshape(1, -1, 3, h, C // h).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-2, -1) * (C // h) ** -0.5 + size.log()[:, None, None, :]
            attn = logits.softmax(-1)
            z = z + blk.attn.proj((attn @ v).transpose(1, 2).reshape(1, -1, C))
            if i in blocks:
                t = z.shape[1]
                rr = min(r, (t - 1) // 2)
                s = attn[:, :, 0].sum(1) * v.transpose(1, 2).reshape(1, t, C).norm(dim=-1)
                s = s[:, 1:] / s[:, 1:].sum()
                if s.var() < threshold:
                    metric = k.mean(1)
                    metric = metric / metric.norm(dim=-1, keepdim=True)
                    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
                    scores[:, 0] = -math.inf
                    best, best_b = scores.max(-1)
                    edges = best.argsort(-1, descending=True)
                    unm, src = edges[:, rr:].sort(1).values, edges[:, :rr]
                    dst = best_b.gather(1, src)

                    def merge(w, unm=unm, src=src, dst=dst):
                        wa, wb = w[:, ::2], w[:, 1::2]
                        e = w.shape[-1]
                        moved = wa.gather(1, src[..., None].expand(-1, -1, e))
                        wb = wb.scatter_reduce(1, dst[..., None].expand(-1, -1, e), moved, reduce="sum")
                        return torch.cat([wa.gather(1, unm[..., None].expand(-1, -1, e)), wb], 1)

                    z = merge(z * size[..., None]) / merge(size[..., None])
                    size, source = merge(size[..., None])[..., 0], merge(source)
                else:
                    keep = torch.cat([torch.zeros(1, 1, dtype=torch.long), 1 + s.argsort(-1, descending=True)], 1)
                    keep = keep[:, : t - rr]
                    z, size = z[:, keep[0]], size[:, keep[0]]
                    source = source[:, keep[0]]
            z = z + blk.mlp(blk.norm2(z))
        out.append((model.norm(z), source))
    return out


def test_matches_ppt_reference_with_both_branches():
    model = make_model(r=7, criterion="variance").eval()
    states = capture_states(model)
    x = images(4)
    with torch.no_grad():
        model(x)
        stat = states[0].extra["redundancy"][BLOCKS[0]].sort().values
        threshold = float(stat[1] + stat[2]) / 2
        model.reducer.threshold = threshold
        got, _ = model.forward_features(x)
        reference = ppt_reference(model, x, BLOCKS, 7, threshold)
    pooled = torch.stack(list(states[1].extra["pooled"].values()))
    assert pooled.any() and not pooled.all()
    for b, (tokens, source) in enumerate(reference):
        carried = source[0].sum(0) > 0  # positions still carried at the end
        want = (source[0].T @ tokens[0])[carried]
        assert (got[b][carried] - want).abs().max().item() < 1e-4
        assert torch.equal(carried, states[1].source[b] >= 0)


def test_cls_importance_needs_a_class_token():
    model = make_vit(PPTReducer(DIM, blocks=BLOCKS, importance="cls"), cls_token=False)
    with pytest.raises(ValueError, match="cls_token=True"):
        model(images(1))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="criterion"):
        PPTReducer(DIM, criterion="std")
    with pytest.raises(ValueError, match="importance"):
        PPTReducer(DIM, importance="max")
    with pytest.raises(ValueError, match="threshold"):
        PPTReducer(DIM, threshold=0.0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        PPTReducer(DIM, keep_ratio=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="one value per reducing block"):
        PPTReducer(DIM, keep_ratio=(0.5, 0.5))
    with pytest.raises(ValueError, match="depth 6"):
        make_vit(PPTReducer(DIM))  # blocks 3, 6, 9


def test_built_by_name_with_stats_and_macs():
    assert REDUCERS["PPT"] is PPTReducer
    with pytest.raises(ConfigError, match="invalid PPT reducer settings"):
        build_reducer({"type": "PPT", "criterion": "entropy"}, DIM)
    reducer = build_reducer({"type": "PPT", "blocks": BLOCKS, "importance": "mean", "threshold": POOL}, DIM)
    model = make_vit(reducer)
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    pooled_macs = model.last_record.extra_macs
    model.reducer.threshold = PRUNE
    with torch.no_grad():
        model(images(2))
    assert (pooled_macs > model.last_record.extra_macs).all() and (model.last_record.extra_macs > 0).all()
    assert set(model.last_record.token_maps) == set(BLOCKS)
    assert all(f"pool_rate.block{b}" in model.last_record.stats for b in BLOCKS)
