"""DynamicViT token sparsification (tokenprune.models.reducers.dynamicvit) in the ViT backbone, on tiny models."""

import functools
import math

import pytest
import reducer_checks
import torch
from reducer_checks import (
    DIM,
    assert_batch_equals_singles,
    assert_matches_dense,
    assert_shapes_match_dense,
    capture_states,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models import ViT
from tokenprune.models.reducers import DynamicViTReducer, build_reducer
from tokenprune.models.reducers.dynamicvit import block_with_policy
from tokenprune.models.reducers.toolkit import keep_target_loss

images = functools.partial(reducer_checks.images, size=(64, 96))  # a 4 x 6 grid of patches

BLOCKS = (2, 3, 4)
RATIOS = (0.7, 0.5, 0.3)
N = 24  # patch tokens of a 64 x 96 image


def make_model(cls_token=False, **kwargs):
    kwargs = {"blocks": BLOCKS, "keep_targets": RATIOS, **kwargs}
    return make_vit(DynamicViTReducer(DIM, **kwargs), cls_token=cls_token)


def force_predictors(model, keep: bool) -> None:
    """Predictors whose decision ignores the input: keep (or drop) every token, Gumbel noise or not."""
    for predictor in model.reducer.predictors:
        last = predictor.out_conv[4]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([50.0, -50.0]) * (1 if keep else -1))


def noise_free(model) -> None:
    """Training-mode decisions by argmax (straight-through) instead of Gumbel samples."""

    def sample_keep(log_p):
        hard = (log_p[..., 0] >= log_p[..., 1]).float()
        soft = log_p[..., 0].exp()
        return hard - soft.detach() + soft

    model.reducer.sample_keep = sample_keep


@pytest.mark.parametrize("keep_pruned", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token", [True, False])
def test_odd_and_non_square_inputs_give_the_dense_map(cls_token, training, keep_pruned):
    assert_shapes_match_dense(make_model(cls_token, keep_pruned=keep_pruned).train(training))


@pytest.mark.parametrize("keep_pruned", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token", [True, False])
def test_keep_ratio_one_matches_dense(cls_token, training, keep_pruned):
    model = make_model(cls_token, keep_targets=(1.0,) * 3, keep_pruned=keep_pruned).train(training)
    if training:
        force_predictors(model, keep=True)  # a ratio of 1 does not stop Gumbel sampling from dropping
    assert_matches_dense(model, images(2))
    assert all(v.item() == 1.0 for k, v in model.last_record.stats.items() if k.startswith("keep_rate."))


@pytest.mark.parametrize("keep_pruned", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_batch_equals_one_at_a_time(training, keep_pruned):
    model = make_model(keep_pruned=keep_pruned).train(training)
    noise_free(model)
    states = capture_states(model)
    assert_batch_equals_singles(model, images(3))
    kept = torch.stack([m.float().mean() for m in states[0].masks.values()])
    assert ((kept > 0) & (kept < 1)).any()  # the predictors dropped some tokens, not all


@pytest.mark.parametrize("ratio", [0.05, 1.0])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token", [True, False])
def test_extreme_budgets(cls_token, training, ratio):
    model = make_model(cls_token, keep_targets=(ratio,) * 3).train(training)
    if training and ratio < 1:
        force_predictors(model, keep=False)  # every token dropped by the sample: min_keep must step in
    model.record_tokens = True
    states = capture_states(model)
    out = model(images(3))
    assert torch.isfinite(out).all()
    want = max(1, math.floor(ratio * N))
    for mask in states[0].masks.values():
        assert (mask.sum(1) >= 1).all()
        if not training or ratio < 1:  # the fixed budget at inference; min_keep = 1 in training
            assert mask.sum(1).tolist() == [want] * 3
    if training:
        loss = model.last_record.aux_losses["loss_dynamicvit_ratio"]
        assert torch.isfinite(loss)
        (out.sum() + loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_paper_schedule_deit_s_224():
    # DynamicViT's DeiT-S setting: class token, predictors before blocks 3, 6, 9, ratios 0.7, 0.49, 0.343 of
    # the 196 patches at inference: int(196 * ratio) = 137, 96, 67 tokens (+ the class token)
    reducer = DynamicViTReducer(24, blocks=(3, 6, 9), keep_targets=(0.7, 0.49, 0.343))
    model = ViT(img_size=224, embed_dim=24, depth=12, num_heads=2, cls_token=True, reducer=reducer).eval()
    model.record_tokens = True
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    want = [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert model.last_record.token_counts.T.tolist() == [want, want]
    per_token = sum(
        m.in_features * m.out_features for m in reducer.predictors[0].modules() if hasattr(m, "in_features")
    )
    assert model.last_record.extra_macs == (196 + 137 + 96) * per_token


@pytest.mark.parametrize("cls_token", [True, False])
def test_keep_pruned_dropped_positions_keep_their_last_value(cls_token):
    # one stage: the positions it drops never run another block, so they hold block 1's output
    model = make_model(cls_token, blocks=(2,), keep_targets=(0.5,), keep_pruned=True).eval()
    after = []
    model.blocks[1].register_forward_hook(lambda m, args, out: after.append(out))
    states = capture_states(model)
    with torch.no_grad():
        tokens, _ = model.forward_features(images(2))
    P, dropped = int(cls_token), ~states[0].masks[2]
    assert dropped.sum(1).tolist() == [12, 12]
    torch.testing.assert_close(tokens[:, P:][dropped], model.norm(after[0][:, P:][dropped]))
    assert (tokens[:, P:][~dropped] - model.norm(after[0][:, P:][~dropped])).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_without_keep_dropped_positions_are_zero(training):
    model = make_model(keep_pruned=False).train(training)
    states = capture_states(model)
    finished = []
    finish = model.reducer.finish
    model.reducer.finish = lambda x, state: finished.append(finish(x, state)) or finished[-1]
    with torch.no_grad():
        model(images(2))
    dropped = ~states[0].masks[BLOCKS[-1]]
    assert dropped.any() and (finished[0][dropped] == 0).all()
    assert (finished[0][~dropped].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("training", [False, True])
def test_decisions_are_hierarchical(training):
    model = make_model().train(training)
    states = capture_states(model)
    with torch.no_grad():
        model(images(4))
    masks = [states[0].masks[b] for b in BLOCKS]
    for earlier, later in zip(masks, masks[1:]):
        assert not (later & ~earlier).any()  # a dropped token stays dropped
    if not training:
        assert [m.sum(1).tolist() for m in masks] == [[math.floor(r * N)] * 4 for r in RATIOS]


def test_training_masking_matches_inference_with_the_same_decisions():
    # predictors that keep the first k tokens by position: argmax in training, top-k at inference agree
    model = make_model(blocks=(2, 4), keep_targets=(0.5, 0.25))
    noise_free(model)
    states = capture_states(model)
    for s, keep in enumerate((12, 6)):
        predictor = model.reducer.predictors[s]
        predictor.forward = lambda x, policy, keep=keep: torch.log_softmax(
            torch.stack([torch.arange(x.shape[1], 0, -1.0) - (x.shape[1] - keep) - 0.5, torch.zeros(x.shape[1])], -1)
            .expand(x.shape[0], -1, -1)
            .clone(),
            dim=-1,
        )
    x = images(2)
    with torch.no_grad():
        inferred = model.eval()(x)
        trained = model.train()(x)
    for b in (2, 4):
        assert torch.equal(states[0].masks[b], states[1].masks[b])
    assert (trained - inferred).abs().max().item() < 1e-4


def test_masked_softmax_equals_masking_the_keys():
    model = make_model(cls_token=True).eval()
    block = model.blocks[1]
    x = torch.randn(2, N + 1, DIM)
    torch.testing.assert_close(block_with_policy(block, x, torch.ones(2, N + 1)), block(x), atol=1e-5, rtol=1e-5)
    policy = (torch.rand(2, N + 1) > 0.4).float()
    policy[:, 0] = 1.0
    kept = policy > 0.5
    got = block_with_policy(block, x, policy)
    want = block(x, kept[:, None, None, :])
    torch.testing.assert_close(got[kept], want[kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_pruned", [True, False])
def test_gradients_reach_every_predictor(keep_pruned):
    model = make_model(keep_pruned=keep_pruned).train()
    out = model(images(2))
    # through the masked softmax alone (the paper's path), then together with the ratio loss
    out.sum().backward(retain_graph=True)
    for predictor in model.reducer.predictors:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())
    model.zero_grad()
    model.last_record.aux_losses["loss_dynamicvit_ratio"].backward()
    for predictor in model.reducer.predictors:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())


def test_ratio_loss_zero_at_target_and_grows_away():
    ratios = torch.tensor([0.7, 0.49, 0.343])
    losses = [keep_target_loss(ratios[:, None] + d, ratios, "image").item() for d in (0.0, 0.1, -0.2, 0.3)]
    assert losses[0] == 0.0 and 0 < losses[1] < losses[2] < losses[3]
    # per image, as the paper: images above and below the target do not cancel
    spread = ratios[:, None] + torch.tensor([[-0.1, 0.1]])
    assert keep_target_loss(spread, ratios, "image").item() == pytest.approx(0.01)


@pytest.mark.parametrize("ratio, want", [(1.0, 0.0), (0.5, 2.0 * 0.25)])
def test_ratio_loss_in_the_model(ratio, want):
    model = make_model(keep_targets=(ratio,) * 3).train()
    force_predictors(model, keep=True)
    model(images(2))
    assert model.last_record.aux_losses["loss_dynamicvit_ratio"].item() == pytest.approx(want)
    model.eval()
    with torch.no_grad():
        model(images(2))
    assert model.last_record.aux_losses == {}


def test_token_maps_follow_the_kept_tokens():
    model = make_model().eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    for block, ratio in zip(BLOCKS, RATIOS):
        ids = model.last_record.token_maps[block]
        kept = ids >= 0
        assert kept.sum(1).tolist() == [math.floor(ratio * N)] * 2
        assert torch.equal(ids[kept], torch.arange(N).expand(2, -1)[kept])
    model.train()
    model(images(2))
    assert torch.equal(model.last_record.token_counts, torch.full((6, 2), float(N)))  # training masks, runs all


def test_invalid_settings():
    with pytest.raises(ValueError, match="one value per reducing block"):
        DynamicViTReducer(DIM, blocks=(1, 2), keep_targets=(0.7,))
    with pytest.raises(ValueError, match="non-increasing"):
        DynamicViTReducer(DIM, blocks=(1, 2), keep_targets=(0.5, 0.7))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        DynamicViTReducer(DIM, blocks=(1,), keep_targets=(0.0,))
    with pytest.raises(ValueError, match="divisible by 4"):
        DynamicViTReducer(50)
    with pytest.raises(ValueError, match="depth 6"):
        make_model(blocks=(3, 6), keep_targets=(0.7, 0.5))
    with pytest.raises(ConfigError, match="invalid DynamicViT reducer settings"):
        build_reducer({"type": "DynamicViT", "tau": 0}, DIM)
