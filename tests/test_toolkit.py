"""What the reducers share (tokenprune.models.reducers.toolkit), checked against the copies each method carried
before they were gathered there: the refactor changed no number."""

import math

import pytest
import torch

from tokenprune.models.reducers.toolkit import (
    attention_half,
    force_min_keep,
    keep_count,
    keep_target_loss,
    mlp_half,
    run_masked,
    topk_mask,
)
from tokenprune.models.vit import Block

DIM, HEADS = 24, 3


# the formulas as the method files wrote them before the toolkit (svit.py, merging.py, dynamicvit.py, common.py)


def old_svit_keep_count(target: float, n: int) -> int:
    return math.ceil(round(target * int(n), 6))


def old_merging_keep_count(ratio: float, n: int) -> int:
    n = int(n)
    return min(n, max(1 if n else 0, math.ceil(round(ratio * n, 6))))


def old_fixed_keep_count(ratio: float, n: int, min_keep: int = 1) -> int:
    return max(min_keep, math.floor(round(ratio * int(n), 6)))


def old_attention_trace(block, x, attn_mask=None):
    attn_mod = block.attn
    B, N, C = x.shape
    h = attn_mod.num_heads
    q, k, v = attn_mod.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    attn = logits.softmax(dim=-1)
    a = attn_mod.proj_drop(attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), attn


def old_block_with_policy(block, x, policy, eps=1e-6):
    attn_mod = block.attn
    B, N, C = x.shape
    h = attn_mod.num_heads
    q, k, v = attn_mod.qkv(block.norm1(x)).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    logits = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
    keys = policy[:, None, None, :]
    weights = keys + (1.0 - keys) * torch.eye(N, dtype=keys.dtype)
    e = (logits - logits.amax(dim=-1, keepdim=True)).float().exp() * weights.float()
    attn = ((e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)).to(x.dtype)
    a = attn_mod.proj_drop(attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
    x = x + block.drop_path1(block.ls1(a))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def old_svit_ratio_loss(fractions, targets, mode="batch"):
    if mode == "batch":
        return ((fractions.mean(dim=1) - targets) ** 2).mean()
    return ((fractions - targets[:, None]) ** 2).mean()


def old_dynamicvit_ratio_loss(fractions, ratios):
    return ((fractions - ratios[:, None]) ** 2).mean()


RATIOS = [0.0, 0.05, 0.1, 0.25, 0.3, 0.343, 0.49, 0.5, 0.7, 146 / 196, 0.875, 0.9, 1.0]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 13, 24, 196, 1000])
def test_one_keep_count_reproduces_the_three_it_replaced(n):
    for ratio in RATIOS:
        assert keep_count(ratio, n) == old_svit_keep_count(ratio, n)
        assert keep_count(ratio, n, min_keep=1) == old_merging_keep_count(ratio, n)
        for min_keep in (1, 3, 2000):
            for m in {n, n // 2, max(n - 1, 0)}:  # DynamicViT's caller caps it at the current count m <= n
                want = min(m, old_fixed_keep_count(ratio, n, min_keep))
                assert min(m, keep_count(ratio, n, "floor", min_keep)) == want
        # EViT's: min(M, max(min_keep, ceil))
        for min_keep in (1, 4, 2000):
            assert keep_count(ratio, n, min_keep=min_keep) == min(n, max(min_keep, old_svit_keep_count(ratio, n)))


def test_keep_count_of_a_traced_size_and_float_noise():
    assert keep_count(0.7, torch.tensor(10)) == keep_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001
    assert keep_count(0.343, torch.tensor(24), "floor") == keep_count(0.343, 24, "floor") == 8
    assert keep_count(0.05, 5, min_keep=1) == 1 and keep_count(0.5, 0, min_keep=1) == 0
    with pytest.raises(ValueError, match="rounding"):
        keep_count(0.5, 10, "round")


@pytest.mark.parametrize("training", [False, True])
def test_explicit_attention_half_is_the_old_trace_and_the_block(training):
    torch.manual_seed(0)
    block = Block(DIM, HEADS).train(training)
    x = torch.randn(2, 9, DIM)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    mask[..., 0] = True
    for m in (None, mask, torch.log(torch.rand(2, 1, 1, 9) + 0.5)):
        half = attention_half(block, x, m, attn_rows="all")
        out, attn = old_attention_trace(block, x, m)
        assert torch.equal(mlp_half(block, half.x), out) and torch.equal(half.attn, attn)
        torch.testing.assert_close(mlp_half(block, half.x), block(x, m), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(half.attn.sum(-1), torch.ones(2, HEADS, 9))


def test_policy_attention_is_the_old_block_with_policy():
    torch.manual_seed(0)
    block = Block(DIM, HEADS)
    x = torch.randn(2, 9, DIM)
    policy = (torch.rand(2, 9) > 0.4).float().requires_grad_()
    got = mlp_half(block, attention_half(block, x, attn_rows="all", policy=policy).x)
    assert torch.equal(got, old_block_with_policy(block, x, policy))
    with pytest.raises(ValueError, match="policy"):
        attention_half(block, x, attn_rows="first", policy=policy)


def test_keep_target_loss_is_both_old_losses():
    fractions, targets = torch.rand(4, 3), torch.tensor([0.7, 0.5, 0.3, 0.2])
    assert torch.equal(keep_target_loss(fractions, targets), old_svit_ratio_loss(fractions, targets))
    assert torch.equal(keep_target_loss(fractions, targets, "image"), old_svit_ratio_loss(fractions, targets, "image"))
    assert torch.equal(keep_target_loss(fractions, targets, "image"), old_dynamicvit_ratio_loss(fractions, targets))


def test_force_min_keep_and_masked_run():
    d = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7, 0.6]])
    out = force_min_keep(d, scores, 2)
    assert out.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]
    out.sum().backward()
    assert d.grad is not None and torch.equal(topk_mask(scores, 1), torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]).bool())
    torch.manual_seed(0)
    block = Block(DIM, HEADS)
    x = torch.randn(2, 5, DIM)
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    want = block(x, torch.cat([torch.ones(2, 1, dtype=torch.bool), keep > 0.5], 1)[:, None, None, :])
    assert torch.equal(run_masked(block, x, keep, 1), want)
