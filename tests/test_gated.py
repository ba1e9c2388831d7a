"""The learned-gate base (tokenprune.models.reducers.gated): calibrated inference thresholds, their checkpointing
and the calibration context, the same for every registered GatedReducer (SViT, TPC), on tiny models."""

import pytest
import torch
from reducer_checks import DIM, make_vit

from tokenprune.models import ViT
from tokenprune.models.reducers import REDUCERS
from tokenprune.models.reducers.gated import GatedReducer

NAMES = sorted(name for name, cls in REDUCERS.items() if issubclass(cls, GatedReducer))
BLOCKS = (2, 3, 4, 5)
TARGETS = (0.7, 0.7, 0.49, 0.343)
IMG = (64, 96)  # a 4 x 6 token grid
# the methods whose thresholds, calibrated by training forwards, meet the targets at inference as they are; the
# others are recalibrated by inference forwards first (as SViTCalibrationHook does after training): a TPC block's
# tokens depend on the earlier blocks' pause and restart decisions, which differ between sampling and inference
CALIBRATED_IN_TRAINING = {"SViT"}


def make_model(name: str, seed: int = 0, **kwargs) -> ViT:
    """The tiny ViT with reducer ``name`` deciding at ``BLOCKS`` with ``TARGETS`` (``kwargs`` override)."""
    return make_vit(REDUCERS[name](DIM, **{"blocks": BLOCKS, "keep_targets": TARGETS, **kwargs}), seed=seed)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *IMG, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def calibrate(model: ViT, steps: int = 3, batch: int = 4) -> None:
    """A few training forwards (which update the thresholds), then eval mode."""
    model.train()
    for i in range(steps):
        model(images(batch, seed=100 + i))
    model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_threshold_calibration_meets_target_on_average(name):
    model = make_model(name)
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(8, 3, 128, 192, generator=g))
    assert (model.reducer.calibration_steps == 20).all()
    model.eval()
    if name not in CALIBRATED_IN_TRAINING:
        with torch.no_grad(), model.reducer.calibration():
            for _ in range(10):
                model(torch.randn(8, 3, 128, 192, generator=g))
    rates = []
    with torch.no_grad():
        for _ in range(8):
            model(torch.randn(8, 3, 128, 192, generator=g))
            rates.append([model.last_record.stats[f"keep_rate.block{b}"].item() for b in BLOCKS])
    realised = torch.tensor(rates).mean(0)
    assert (realised - torch.tensor(TARGETS)).abs().max().item() < 0.05, realised
    per_image = model.last_record.stats[f"keep_rate_per_image.block{BLOCKS[-1]}"]
    assert per_image.shape == (8,) and per_image.std() > 0  # the rate is dynamic per image


@pytest.mark.parametrize("name", NAMES)
def test_eval_forwards_calibrate_only_while_calibrating(name):
    model = make_model(name).eval()
    with torch.no_grad():
        model(images(2))
        assert not model.reducer.calibration_steps.any()
        model.reducer.calibrating = True
        model(images(2))
        model(images(2, seed=2))
    assert (model.reducer.calibration_steps == 2).all() and (model.reducer.thresholds > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_thresholds_are_in_the_checkpoint_and_reset(name):
    model = make_model(name)
    calibrate(model)
    fresh = make_model(name, seed=1)
    fresh.load_state_dict(model.state_dict())
    assert fresh.reducer.calibration_steps.all() and torch.equal(fresh.reducer.thresholds, model.reducer.thresholds)
    fresh.reducer.reset_thresholds()
    assert not fresh.reducer.calibration_steps.any() and not fresh.reducer.thresholds.any()


@pytest.mark.parametrize("name", NAMES)
def test_calibration_context_and_rules(name):
    # reducer.calibration() is the recalibration SViTCalibrationHook and tools/analysis_tools/recalibrate.py run:
    # the same as resetting, weighting batches equally and updating in eval forwards by hand
    by_hand, context = make_model(name, inference="fixed"), make_model(name, inference="fixed")
    calibrate(by_hand)
    context.load_state_dict(by_hand.state_dict())
    batches = [torch.randn(4, 3, *IMG, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    by_hand.eval().reducer.reset_thresholds()
    by_hand.reducer.inference, by_hand.reducer.threshold_momentum, by_hand.reducer.calibrating = "threshold", 0.0, True
    context.eval()
    with torch.no_grad():
        for x in batches:
            by_hand(x)
        with context.reducer.calibration() as reducer:
            assert reducer is context.reducer and reducer.calibrating and reducer.inference == "threshold"
            assert not reducer.calibration_steps.any()  # reset on entry
            for x in batches:
                context(x)
    assert torch.equal(reducer.thresholds, by_hand.reducer.thresholds)
    assert reducer.calibration_steps.tolist() == [3] * len(BLOCKS)
    assert (reducer.inference, reducer.threshold_momentum, reducer.calibrating) == ("fixed", 0.1, False)
    with pytest.raises(RuntimeError), reducer.calibration():
        raise RuntimeError("interrupted")
    assert (reducer.inference, reducer.threshold_momentum, reducer.calibrating) == ("fixed", 0.1, False)
    # the rule each block follows: the configured one, or the fixed rule where 'threshold' has no threshold
    assert reducer.inference_rules() == {b: "fixed" for b in BLOCKS} and reducer.inference_fallbacks() == {}
    reducer.inference = "threshold"
    assert reducer.inference_rules() == {b: "fixed" for b in BLOCKS}  # reset by the interrupted calibration
    assert reducer.inference_fallbacks() == {b: "never calibrated" for b in BLOCKS}
    with torch.no_grad(), reducer.calibration():
        context(batches[0])
    assert reducer.inference_rules() == {b: "threshold" for b in BLOCKS} and reducer.inference_fallbacks() == {}
