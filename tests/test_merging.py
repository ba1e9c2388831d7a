"""The merging machinery ToMe, PPT and BAT share (tokenprune.models.reducers.merging)."""

import math

import pytest
import torch

from tokenprune.models.reducers.base import PRUNED
from tokenprune.models.reducers.merging import (
    MergeState,
    bipartite_merge_rounds,
    bipartite_soft_matching,
    compose,
    merge_tokens,
    token_ids,
)
from tokenprune.models.reducers.toolkit import attention_half, mlp_half
from tokenprune.models.vit import Block


def official_tome_pairs(metric: torch.Tensor, r: int, class_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The merges of ToMe's reference algorithm (index of each merged A token, index of its B token), written
    out from the paper's description: A = even tokens, B = odd ones, best edge per A token, top-r edges."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    src = node_max.argsort(dim=-1, descending=True)[..., :r]
    return 2 * src, 2 * node_idx.gather(-1, src) + 1


def official_edge_similarity(metric: torch.Tensor) -> list[float]:
    """Each A token's best cosine similarity to a B token, (M, D) -> |A| values."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return (metric[::2] @ metric[1::2].T).max(dim=-1).values.tolist()


@pytest.mark.parametrize("protected", [0, 1])
def test_bipartite_soft_matching_is_tomes(protected):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 25, 8, generator=g)
    r = 9
    assign = bipartite_soft_matching(metric, r, protected)
    assert assign.shape == (3, 25) and int(assign.max()) == 25 - r - 1
    src, dst = official_tome_pairs(metric, r, bool(protected))
    for b in range(3):
        merged = set(src[b].tolist())
        for i in range(25):
            if i in merged:  # merged into its B token, which survives
                j = dst[b][src[b].tolist().index(i)].item()
                assert assign[b, i] == assign[b, j] and j not in merged
            else:  # survives, with the A tokens merged into it
                assert (assign[b] == assign[b, i]).sum() == 1 + (dst[b] == i).sum()
        # ToMe's output order: unmerged A tokens (by index with a class token, else by edge similarity), then B
        unmerged_a = [i for i in range(0, 25, 2) if i not in merged]
        if not protected:
            sim = official_edge_similarity(metric[b])
            unmerged_a.sort(key=lambda i: -sim[i // 2])
        order = unmerged_a + list(range(1, 25, 2))
        assert assign[b, order].tolist() == list(range(25 - r))
        if protected:
            assert assign[b, 0] == 0 and (assign[b] == 0).sum() == 1


def test_merge_tokens_is_a_weighted_average_and_rounds_compose():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, generator=g)
    w = torch.rand(2, 12, generator=g) + 0.1
    assign = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 4, 5, 5, -1, 6]] * 2)
    out = merge_tokens(x, assign, 7, w)
    for t in range(7):
        members = assign[0] == t
        want = (x[:, members] * w[:, members, None]).sum(1) / w[:, members].sum(1, keepdim=True)
        torch.testing.assert_close(out[:, t], want)
    # two rounds of size-weighted merging == one merge by the composed assignment
    size = torch.ones(2, 12)
    second = torch.tensor([[0, 1, 0, 2, 1, 3, 3]] * 2)
    size1 = torch.zeros(2, 7).scatter_add(1, assign.clamp(min=0), torch.where(assign >= 0, size, 0.0))
    twice = merge_tokens(merge_tokens(x, assign, 7, size), second, 4, size1)
    torch.testing.assert_close(twice, merge_tokens(x, compose(assign, second), 4, size))


@pytest.mark.parametrize("r", [3, 11, 15])
def test_merge_rounds_reach_any_count(r):
    metric = torch.randn(2, 17, 4)
    assign, m, macs = bipartite_merge_rounds(metric, torch.ones(2, 17), r, 1)
    assert m == 17 - r and macs > 0
    assert assign[:, 0].tolist() == [0, 0] and ((assign == 0).sum(1) == 1).all()  # the class token alone
    for b in range(2):
        assert sorted(assign[b].unique().tolist()) == list(range(m))  # every output receives a token


def test_state_tracks_sources_over_steps():
    B, N, C = 2, 6, 3
    x = torch.randn(B, N, C)
    state = MergeState.start(x, (2, 3), 0)
    first = torch.tensor([[0, 0, 1, -1, 2, 3], [0, 1, 1, 2, -1, 3]])
    dropped = state.apply(first, 4)
    state.freeze(dropped, x * 10)
    assert state.size.tolist() == [[2, 1, 1, 1], [1, 2, 1, 1]]
    second = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 2]])
    state.apply(second, 3)
    assert state.source.tolist() == [[0, 0, 1, -1, 1, 2], [0, 0, 0, 1, -1, 2]]
    assert state.size.tolist() == [[2, 2, 1], [3, 1, 1]]
    final = torch.randn(B, 3, C)
    out = state.restore(final)
    assert torch.equal(out[0, 3], x[0, 3] * 10) and torch.equal(out[1, 4], x[1, 4] * 10)
    assert torch.equal(out[0, 4], final[0, 1]) and torch.equal(out[1, 2], final[1, 0])
    ids = token_ids(state.source, 0)
    assert ids.tolist() == [[0, 0, 2, PRUNED, 2, 5], [0, 0, 0, 3, PRUNED, 5]]


def test_state_with_prefix_keeps_it_first():
    x = torch.randn(1, 5, 2)
    state = MergeState.start(x, (2, 2), 1)
    state.apply(torch.tensor([[0, 1, 1, 2, 3]]), 4)
    assert state.source[0, 0] == 0 and token_ids(state.source, 1).tolist() == [[0, 0, 2, 3]]
    assert state.attn_mask(x, True).shape == (1, 1, 1, 4) and state.attn_mask(x, False) is None


@pytest.mark.parametrize("attn_rows", [None, "first", "all"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_split_block_equals_block(attn_rows, mask):
    torch.manual_seed(0)
    block = Block(24, 3).eval()
    x = torch.randn(2, 10, 24)
    m = {
        "none": None,
        "bool": torch.rand(2, 1, 1, 10) > 0.3,
        "float": torch.log(torch.rand(2, 1, 1, 10) + 0.5),
    }[mask]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True
    half = attention_half(block, x, m, attn_rows=attn_rows)
    torch.testing.assert_close(mlp_half(block, half.x), block(x, m), atol=1e-5, rtol=1e-5)
    assert half.k.shape == half.v.shape == (2, 3, 10, 8)
    if attn_rows is None:
        assert half.attn is None
    else:
        full = attention_half(block, x, m, attn_rows="all").attn
        torch.testing.assert_close(full.sum(-1), torch.ones(2, 3, 10))
        torch.testing.assert_close(half.attn, full if attn_rows == "all" else full[:, :, :1])
