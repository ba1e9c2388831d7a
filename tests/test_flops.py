"""tokenprune.models.flops: MACs from realised token counts, against hand counts written here independently."""

import math

import pytest
import torch
from torch import nn

from tokenprune.models import SViTReducer, ViT, vit_small
from tokenprune.models.flops import (
    LayerMacCounter,
    backbone_macs,
    count_backbone_macs,
    dense_backbone_macs,
    flop_bound_speedup,
    macs_from_counts,
)
from tokenprune.models.record import ReductionRecord


def hand_block(n: float, c: int) -> float:
    """A ViT block with MLP ratio 4: qkv 3nC^2, proj nC^2, MLP 8nC^2, q@k^T and attn@v n^2 C each."""
    return 12 * n * c * c + 2 * n * n * c


def hand_vit(n_patches: int, prefix: int, c: int, depth: int, patch: int = 16) -> float:
    return depth * hand_block(n_patches + prefix, c) + n_patches * c * 3 * patch * patch


def small_vit(**kwargs) -> ViT:
    torch.manual_seed(0)
    return ViT(embed_dim=64, depth=4, num_heads=2, **kwargs).eval()


def test_dense_count_matches_hand_count():
    vit = small_vit(cls_token=True)
    macs = count_backbone_macs(vit, torch.randn(2, 3, 48, 80))  # 3 x 5 patches + CLS
    expected = hand_vit(15, 1, 64, 4)
    assert macs.total.shape == (2,)
    assert torch.allclose(macs.total, torch.full((2,), expected, dtype=torch.float64), rtol=0.01)
    assert macs.tokens.eq(16).all() and macs.keep_rates.eq(1).all()
    # the padded input (50 x 70 -> 64 x 80) costs its 4 x 5 patches
    padded = count_backbone_macs(vit, torch.randn(1, 3, 50, 70))
    assert padded.total.item() == pytest.approx(hand_vit(20, 1, 64, 4), rel=0.01)


def test_deit_s_at_224_matches_the_published_4_6_gflops():
    """DeiT's "4.6 GFLOPs" for DeiT-S (Touvron et al., ICML 2021, Table 1) are multiply-accumulates, which is
    what we count."""
    macs = dense_backbone_macs(vit_small(cls_token=True), (224, 224))
    assert macs.total.item() == pytest.approx(hand_vit(196, 1, 384, 12), rel=1e-9)
    assert macs.total.item() / 1e9 == pytest.approx(4.6, abs=0.05)


def test_fixed_budget_svit_counts_the_kept_tokens():
    targets = (0.7, 0.5, 0.3)
    vit = small_vit(reducer=SViTReducer(64, blocks=(1, 2, 3), keep_targets=targets, inference="fixed"))
    n = 4 * 6
    pruned = count_backbone_macs(vit.eval(), torch.randn(2, 3, 64, 96))
    dense = dense_backbone_macs(vit, (64, 96), batch=2)
    kept = [n] + [math.ceil(t * n) for t in targets]
    assert pruned.tokens[:, 0].tolist() == kept
    for i, k in enumerate(kept):
        assert pruned.blocks[i, 0].item() == pytest.approx(hand_block(k, 64), rel=0.01)
    gates = 3 * n * (64 * 16 + 16 * 2)
    assert pruned.reducer[0].item() == gates
    assert pruned.total[0].item() == pytest.approx(
        sum(hand_block(k, 64) for k in kept) + n * 64 * 768 + gates, rel=0.01
    )
    assert flop_bound_speedup(dense, pruned) > 1.0
    assert flop_bound_speedup(dense, dense) == 1.0


def test_token_counts_agree_with_what_the_linear_layers_ran():
    """Independent of the reducer's own report: forward hooks see the gathered token sets of each block."""
    vit = small_vit(reducer=SViTReducer(64, blocks=(1, 2, 3), keep_targets=(0.7, 0.5, 0.3), inference="fixed"))
    x = torch.randn(1, 3, 64, 96)
    with LayerMacCounter(vit.blocks) as counter:
        macs = count_backbone_macs(vit, x)
    per_token = 12 * 64 * 64  # qkv + proj + fc1 + fc2
    for i in range(4):
        seen = sum(v for k, v in counter.macs.items() if k.startswith(f"{i}."))
        assert seen == macs.tokens[i, 0].item() * per_token


def test_windowed_blocks_count_attention_per_padded_window():
    """ViTDet's windowed blocks: a 7 x 10 grid in windows of 4 is padded to 8 x 12, 6 windows of 16 tokens;
    qkv and proj run on the 96 padded tokens, attention within each window, the MLP on the 70 real tokens.
    The hand count is written here; forward hooks on the linear layers confirm the token counts."""
    torch.manual_seed(0)
    c = 64
    vit = ViT(img_size=64, embed_dim=c, depth=4, num_heads=4, window_size=4, global_block_indexes=(3,))
    x = torch.randn(1, 3, 7 * 16, 10 * 16)
    with LayerMacCounter(vit.blocks) as counter:
        macs = count_backbone_macs(vit, x)
    windowed = 96 * 4 * c * c + 2 * 6 * 16 * 16 * c + 70 * 8 * c * c
    assert macs.blocks[:3, 0].tolist() == [windowed] * 3
    assert macs.blocks[3, 0].item() == hand_block(70, c)  # the global block
    for i in range(3):
        linear = {k.split(".", 1)[1]: v for k, v in counter.macs.items() if k.startswith(f"{i}.")}
        assert linear["attn.qkv"] == 96 * 3 * c * c and linear["mlp.fc1"] == 70 * 4 * c * c


def test_per_image_counts_and_padding():
    vit = small_vit()
    counts = torch.tensor([[24.0, 24.0], [20.0, 10.0], [12.0, 5.0], [8.0, 3.0]])
    macs = macs_from_counts(vit, counts, (64, 96), extra=torch.tensor([100.0, 50.0]))
    for b in range(2):
        expected = sum(hand_block(n, 64) for n in counts[:, b].tolist()) + 24 * 64 * 768 + [100, 50][b]
        assert macs.total[b].item() == pytest.approx(expected, rel=0.01)
    assert macs.total[0] > macs.total[1]
    # padded: every image costs its batch's largest count at each block
    vit.last_record = ReductionRecord(token_counts=counts)
    padded = backbone_macs(vit, (64, 96), padded=True)
    assert padded.tokens[:, 1].tolist() == [24.0, 20.0, 12.0, 8.0]
    assert padded.total[0].item() == padded.total[1].item() == pytest.approx(macs.total[0].item() - 100)


def test_layer_counter_counts_convolutions_and_linear_layers():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 20 * 20, 5))
    x = torch.randn(2, 3, 10, 10)
    with LayerMacCounter(model) as counter:
        model(x)
    assert counter.macs["0"] == 2 * 8 * 10 * 10 * 3 * 9
    assert counter.macs["1"] == 2 * 8 * 10 * 10 * 4 * 4
    assert counter.macs["3"] == 2 * 5 * 1600
    with LayerMacCounter(model, exclude=[conv]) as skipping:
        model(x)
    assert "0" not in skipping.macs and skipping.total == counter.total - counter.macs["0"]
    model(x)  # hooks are gone after the with block
    assert skipping.total == counter.total - counter.macs["0"]


def test_clear_errors():
    vit = small_vit()
    with pytest.raises(ValueError, match="record_tokens = True"):
        backbone_macs(vit, (64, 64))
    count_backbone_macs(vit, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="exceed the 4 tokens of a 32x32 input"):
        backbone_macs(vit, (32, 32))
