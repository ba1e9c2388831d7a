"""TPC pause/restart token control (tokenprune.models.reducers.tpc) in the ViT backbone, on tiny models."""

import functools
import math

import pytest
import reducer_checks
import torch
import torch.nn.functional as F
from reducer_checks import (
    DIM,
    assert_batch_equals_singles,
    assert_matches_dense,
    assert_shapes_match_dense,
    capture_states,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models.reducers import TPCReducer, build_reducer
from tokenprune.models.reducers.toolkit import keep_target_loss
from tokenprune.models.reducers.tpc import tpc_smooth_loss

images = functools.partial(reducer_checks.images, size=(64, 96))  # a 4 x 6 grid of patches

BLOCKS = (2, 3, 4, 5)
TARGETS = (0.7, 0.7, 0.49, 0.343)
N = 24  # patch tokens of a 64 x 96 image


def make_model(cls_token=False, seed=0, **kwargs):
    kwargs = {"blocks": BLOCKS, "keep_targets": TARGETS, **kwargs}
    return make_vit(TPCReducer(DIM, **kwargs), cls_token=cls_token, seed=seed)


def force_controllers(model, pause: float, restart: float, blocks=BLOCKS) -> None:
    """Controllers whose probabilities ignore the input: p_pause, p_restart in {0, 1}."""
    for b in blocks:
        fc2 = model.reducer.controllers[model.reducer.gate_index[b]].fc2
        with torch.no_grad():
            fc2.weight.zero_()
            fc2.bias.copy_(torch.tensor([50.0 if pause else -50.0, 50.0 if restart else -50.0]))


def noise_free(model) -> None:
    """Training-mode samples by thresholding at p = 0.5 (straight-through) instead of logistic noise."""

    def sample(logits):
        soft = torch.sigmoid(logits)
        return (soft > 0.5).float() - soft.detach() + soft

    model.reducer.sample_pause_restart = sample


def random_stabilizers(model) -> None:
    for stabilizer in model.reducer.stabilizers:
        with torch.no_grad():
            stabilizer.conv.weight.normal_(0, 0.2)
            stabilizer.conv.bias.normal_(0, 0.2)


@torch.no_grad()
def calibrate(model, steps: int = 3, batch: int = 4) -> None:
    model.train()
    for i in range(steps):
        model(images(batch, seed=100 + i))
    model.eval()


@pytest.mark.parametrize("inference", ["threshold", "fixed"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token", [True, False])
def test_odd_and_non_square_inputs_give_the_dense_map(cls_token, training, inference):
    model = make_model(cls_token, inference=inference)
    calibrate(model)
    assert_shapes_match_dense(model.train(training))


@pytest.mark.parametrize("stabilizer", [True, False])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_token", [True, False])
def test_keep_target_one_matches_dense(cls_token, training, stabilizer):
    model = make_model(cls_token, keep_targets=(1.0,) * 4, stabilizer=stabilizer)
    if stabilizer:
        random_stabilizers(model)  # a trained stabilizer: no paused token, so no effect
    if training:
        force_controllers(model, pause=0, restart=1)  # a target of 1 does not stop sampling from pausing
    assert_matches_dense(model.train(training), images(2))
    assert all(v.item() == 1.0 for k, v in model.last_record.stats.items() if k.startswith("keep_rate."))


@pytest.mark.parametrize("inference", ["threshold", "fixed"])
def test_batch_equals_one_at_a_time_eval(inference):
    model = make_model(inference=inference)
    random_stabilizers(model)
    calibrate(model)
    states = capture_states(model)
    assert_batch_equals_singles(model, images(3))
    counts = torch.stack([m.sum(1) for m in states[0].masks.values()])  # (blocks, images)
    assert (counts < N).any(1).all()  # every controlled block gathered
    if inference == "threshold":  # images ran different numbers of tokens: padding was exercised
        assert (counts != counts[:, :1]).any()


def test_batch_equals_one_at_a_time_train():
    model = make_model().train()
    random_stabilizers(model)
    noise_free(model)
    states = capture_states(model)
    assert_batch_equals_singles(model, images(3))
    active = torch.stack([m.float().mean() for m in states[0].masks.values()])
    assert ((active > 0) & (active < 1)).any()


@pytest.mark.parametrize("stabilizer", [True, False])
def test_train_masking_matches_eval_gathering(stabilizer):
    # the same decisions both ways (training: sample at p = 0.5; inference: threshold 0.5 on s)
    model = make_model(stabilizer=stabilizer)
    if stabilizer:
        random_stabilizers(model)
    noise_free(model)
    with torch.no_grad():
        model.reducer.thresholds.fill_(0.5)
        model.reducer.calibration_steps.fill_(1)
    states = capture_states(model)
    x = images(3)
    with torch.no_grad():
        inferred = model.eval()(x)
        trained = model.train()(x)
    for block in BLOCKS:
        assert torch.equal(states[0].masks[block], states[1].masks[block])
    assert not all(m.all() for m in states[0].masks.values())
    assert (trained - inferred).abs().max().item() < 1e-5


@pytest.mark.parametrize("training", [False, True])
def test_paused_tokens_restart(training):
    # block 2 runs half the tokens; block 3 pauses every active token and restarts every paused one
    model = make_model(blocks=(2, 3), keep_targets=(0.5, 0.5), inference="fixed").train(training)
    noise_free(model)
    force_controllers(model, pause=1, restart=1, blocks=(3,))
    states = capture_states(model)
    with torch.no_grad():
        model(images(2))
    first, second = states[0].masks[2], states[0].masks[3]
    assert 0 < first.sum() < first.numel()
    assert torch.equal(second, ~first)
    assert model.last_record.stats["restart_rate.block3"].item() == 1.0


def record_run_block(model, index: int) -> tuple[list, list]:
    """Record the tokens the reducer's run_block gets and returns at block ``index``."""
    inputs, outputs, run_block = [], [], model.reducer.run_block

    def recording_run_block(i, block, x, state):
        out = run_block(i, block, x, state)
        if i == index:
            inputs.append(x)
            outputs.append(out)
        return out

    model.reducer.run_block = recording_run_block
    return inputs, outputs


@pytest.mark.parametrize("training", [False, True])
def test_paused_tokens_keep_their_value_or_get_the_stabilizer_update(training):
    # a controlled block that pauses nearly everything: after it the paused positions hold their input
    # (block 1's output), plus the depth-wise 3x3 update of the stabilizer when it is on
    outs = {}
    for stabilizer in (False, True):
        model = make_model(blocks=(2,), keep_targets=(0.05,), stabilizer=stabilizer)
        if stabilizer:
            random_stabilizers(model)
        force_controllers(model, pause=1, restart=0, blocks=(2,))
        model.train(training)
        inputs, outputs = record_run_block(model, 2)
        states = capture_states(model)
        with torch.no_grad():
            model(images(2))
        paused = ~states[0].masks[2]
        assert (paused.sum(1) >= N - 2).all()  # 1 (training: min_keep) or ceil(0.05 * 24) = 2 run
        x = inputs[0]
        if stabilizer:
            conv = model.reducer.stabilizers[0].conv
            grid = x.transpose(1, 2).reshape(2, DIM, 4, 6)
            x = x + F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=DIM).flatten(2).transpose(1, 2)
        outs[stabilizer] = outputs[0]
        torch.testing.assert_close(outputs[0][paused], x[paused])
        assert (outputs[0][~paused] - inputs[0][~paused]).abs().amax(-1).min() > 1e-3  # the others ran
    assert (outs[True] - outs[False]).abs().max() > 1e-2


@pytest.mark.parametrize("stabilizer", [True, False])
def test_gradients_reach_controllers_and_stabilizers(stabilizer):
    model = make_model(stabilizer=stabilizer).train()
    out = model(images(2))
    out.sum().backward(retain_graph=True)  # through the straight-through decisions and the stabilizer
    modules = list(model.reducer.controllers) + list(model.reducer.stabilizers or [])
    for module in modules:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    model.zero_grad()
    losses = model.last_record.aux_losses
    (losses["loss_tpc_budget"] + losses["loss_tpc_smooth"]).backward()
    for controller in model.reducer.controllers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in controller.parameters())


def test_budget_and_smooth_losses_zero_at_target_and_grow_away():
    targets = torch.tensor([0.7, 0.49])
    losses = [keep_target_loss(targets[:, None] + d, targets).item() for d in (0.0, 0.1, -0.2, 0.3)]
    assert losses[0] == 0.0 and 0 < losses[1] < losses[2] < losses[3]
    flat = torch.full((2, 2, 5, 7), 0.3)
    assert tpc_smooth_loss(flat).item() == pytest.approx(0.0, abs=1e-12)
    ramp = torch.linspace(0, 1, 7).expand(2, 2, 5, 7)  # smooth, not constant: small but not zero
    outliers = [flat.clone() for _ in range(2)]
    outliers[0][0, 0, 2, 3] = 0.5
    outliers[1][0, 0, 2, 3] = 0.9
    smooth = [tpc_smooth_loss(p).item() for p in (ramp, *outliers)]
    assert smooth[0] > 0 and 0 < smooth[1] < smooth[2]  # a larger outlier costs more


@pytest.mark.parametrize("target, want", [(1.0, 0.0), (0.5, 4.0 * 0.25)])
def test_losses_in_the_model(target, want):
    model = make_model(keep_targets=(target,) * 4).train()
    force_controllers(model, pause=0, restart=1)
    model(images(2))
    assert model.last_record.aux_losses["loss_tpc_budget"].item() == pytest.approx(want)
    assert model.last_record.aux_losses["loss_tpc_smooth"].item() == pytest.approx(0.0, abs=1e-12)  # constant maps


@pytest.mark.parametrize("target", [0.05, 1.0])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("inference", ["threshold", "fixed"])
def test_extreme_budgets(inference, training, target):
    model = make_model(cls_token=False, keep_targets=(target,) * 4, inference=inference)
    calibrate(model)
    if target < 1:
        force_controllers(model, pause=1, restart=0)  # everything paused: min_keep must step in
    model.train(training)
    states = capture_states(model)
    out = model(images(3))
    assert torch.isfinite(out).all()
    for mask in states[0].masks.values():
        if target == 1.0 and not training:
            assert mask.all()
        elif target < 1.0:  # fixed: ceil(0.05 * 24) = 2; else nothing clears the threshold or is sampled
            assert mask.sum(1).tolist() == [2 if inference == "fixed" and not training else 1] * 3
        assert (mask.sum(1) >= 1).all()
    if training:
        losses = model.last_record.aux_losses
        assert all(torch.isfinite(v) for v in losses.values())
        (out.sum() + sum(losses.values())).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("img, n", [((64, 96), N), ((80, 80), 25)])
def test_fixed_mode_runs_exact_budget(img, n):
    model = make_model(inference="fixed")
    calibrate(model)  # calibrated thresholds must not matter in fixed mode
    model.record_tokens = True
    states = capture_states(model)
    with torch.no_grad():
        model(torch.randn(3, 3, *img))
    for block, target in zip(BLOCKS, TARGETS):
        assert states[0].masks[block].sum(1).tolist() == [math.ceil(target * n)] * 3
        assert model.last_record.token_counts[block].tolist() == [math.ceil(target * n)] * 3
        ids = model.last_record.token_maps[block]
        assert torch.equal(ids >= 0, states[0].masks[block])
    per_token = DIM * (DIM // 4) + (DIM // 4) * 2 + 9 * DIM
    assert model.last_record.extra_macs == len(BLOCKS) * n * per_token


def test_invalid_settings():
    with pytest.raises(ValueError, match="one value per reducing block"):
        TPCReducer(DIM, blocks=(2, 3), keep_targets=(0.7,))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        TPCReducer(DIM, blocks=(2,), keep_targets=(1.5,))
    with pytest.raises(ValueError, match="inference"):
        TPCReducer(DIM, inference="mode")
    with pytest.raises(ValueError, match="loss weights"):
        TPCReducer(DIM, smooth_loss_weight=-1)
    with pytest.raises(ValueError, match="depth 6"):
        make_model(blocks=(3, 6), keep_targets=(0.7, 0.5))
    with pytest.raises(ConfigError, match="invalid TPC reducer settings"):
        build_reducer({"type": "TPC", "min_keep": 0}, DIM)
