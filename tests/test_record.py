"""The reduction record both backbones keep after a forward (tokenprune.models.record): what the reducer
reported, one merged record for ViT-Adapter's per-stage runs, all tokens when dense."""

import pytest
import torch

from tokenprune.models import ViT
from tokenprune.models.record import ReductionRecord, merge_records
from tokenprune.models.reducers import REDUCERS, build_reducer
from tokenprune.models.vit_adapter import ViTAdapter

DIM, DEPTH = 48, 12  # 12 blocks: every reducer's default blocks fit, so the reducers are built with defaults
ADAPTER = dict(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=3, deform_num_heads=3, conv_inplane=8)


def vit(reducer=None) -> ViT:
    torch.manual_seed(0)
    return ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=3, cls_token=True, reducer=reducer)


def adapter(reducer=None) -> ViTAdapter:
    torch.manual_seed(0)
    return ViTAdapter(**ADAPTER, reducer=reducer)


def images(batch: int = 2, size: tuple[int, int] = (96, 128)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *size, generator=g) * (torch.rand(batch, 1, 1, 1, generator=g) * 2 + 0.2)


def capture_states(model) -> list:
    """The reducer's state of every begin/finish span of the coming forwards, in order."""
    states, finish = [], model.reducer.finish

    def recording_finish(x, state):
        states.append(state)
        return finish(x, state)

    model.reducer.finish = recording_finish
    return states


def assert_same(got, want, where: str = "record") -> None:
    """Exactly equal: dicts key by key, tensors with torch.equal, other values with ==."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want)), where
    else:
        assert got == want, where


@pytest.mark.parametrize("make", [vit, adapter], ids=["vit", "adapter"])
def test_dense_record_counts_every_token(make):
    model = make().eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images())
    record = model.last_record
    n = 6 * 8 + (1 if isinstance(model, ViT) and model.cls_token is not None else 0)
    assert torch.equal(record.token_counts, torch.full((DEPTH, 2), float(n)))
    assert (record.aux_losses, record.stats, record.extra_macs, record.token_maps) == ({}, {}, 0.0, {})
    model.record_tokens = False
    with torch.no_grad():
        model(images())
    assert model.last_record == ReductionRecord()


@pytest.mark.parametrize("name", sorted(REDUCERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vit_record_is_what_the_reducer_reported(name, training):
    model = vit(build_reducer(dict(type=name), DIM)).train(training)
    states = capture_states(model)
    model.record_tokens = True
    with torch.set_grad_enabled(training):
        model(images())
    (state,) = states
    reducer, record = model.reducer, model.last_record
    assert_same(record.aux_losses, reducer.aux_losses(state), "aux_losses")
    assert_same(record.stats, reducer.stats(state), "stats")
    assert_same(record.token_counts, reducer.token_counts(state, DEPTH), "token_counts")
    assert_same(record.extra_macs, reducer.extra_macs(state), "extra_macs")
    assert_same(record.token_maps, reducer.token_maps(state), "token_maps")
    assert record.token_counts.shape == (DEPTH, 2)

    model.record_tokens = False  # losses and stats only
    with torch.set_grad_enabled(training):
        model(images())
    record = model.last_record
    assert_same(record.stats, reducer.stats(states[-1]), "stats")
    assert (record.token_counts, record.extra_macs, record.token_maps) == (None, 0.0, {})


def test_adapter_backbone_scope_record_is_the_one_run():
    model = adapter(build_reducer(dict(type="SViT"), DIM)).eval()
    assert model.scope == "backbone"
    states = capture_states(model)
    model.record_tokens = True
    with torch.no_grad():
        model(images())
    (state,) = states  # one begin/finish over the four stages
    record = model.last_record
    assert_same(record.token_counts, model.reducer.token_counts(state, DEPTH), "token_counts")
    assert_same(record.stats, model.reducer.stats(state), "stats")
    assert_same(record.token_maps, model.reducer.token_maps(state), "token_maps")
    assert record.token_counts[:, 0].min() < 6 * 8  # it pruned


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_adapter_stage_record_merges_the_stages(training):
    """ToMe shrinks the token set, so it runs once per stage: each stage's rows of the token counts, its maps,
    the sum of the stages' MACs and the mean of their stats."""
    model = adapter(build_reducer(dict(type="ToMe"), DIM)).train(training)
    assert model.scope == "stage"
    states = capture_states(model)
    model.record_tokens = True
    with torch.set_grad_enabled(training):
        model(images())
    reducer, record = model.reducer, model.last_record
    stages = [range(first, last + 1) for first, last in model.interaction_indexes]
    assert len(states) == len(stages) == 4
    counts = torch.cat([reducer.token_counts(s, DEPTH)[blocks] for s, blocks in zip(states, stages)])
    assert_same(record.token_counts, counts, "token_counts")
    assert record.token_counts[:, 0].tolist() == [48, 42, 37] * 4  # every stage starts from all tokens
    assert_same(record.extra_macs, sum(reducer.extra_macs(s) for s in states), "extra_macs")
    assert_same(record.token_maps, {b: m for s in states for b, m in reducer.token_maps(s).items()}, "token_maps")
    assert record.token_maps.keys() == set(range(DEPTH))
    per_stage = [reducer.stats(s) for s in states]
    assert record.stats.keys() == set().union(*per_stage)
    for key, value in record.stats.items():
        values = [stats[key] for stats in per_stage if key in stats]
        assert_same(value, values[0] if len(values) == 1 else sum(values) / len(values), f"stats.{key}")


def test_merge_records():
    """Losses and stats several spans report are averaged, counts fill each span's rows (dense elsewhere),
    MACs add up, maps unite; a single span over every block is the record itself."""
    a = ReductionRecord(
        aux_losses={"loss_x": torch.tensor(1.0)},
        stats={"keep_rate.block1": torch.tensor(0.5), "keep_rate.mean": torch.tensor(0.5)},
        token_counts=torch.tensor([[9.0], [5.0], [7.0], [7.0]]),
        extra_macs=torch.tensor([10.0]),
        token_maps={1: torch.zeros(1, 9, dtype=torch.long)},
    )
    b = ReductionRecord(
        aux_losses={"loss_x": torch.tensor(3.0)},
        stats={"keep_rate.block3": torch.tensor(0.25), "keep_rate.mean": torch.tensor(0.25)},
        token_counts=torch.tensor([[1.0], [1.0], [9.0], [3.0]]),
        extra_macs=2.0,
        token_maps={3: torch.ones(1, 9, dtype=torch.long)},
    )
    merged = merge_records([(range(0, 2), a), (range(3, 4), b)], 4, 1, 9, torch.device("cpu"), True)
    assert_same(merged.aux_losses, {"loss_x": torch.tensor(2.0)})
    assert_same(
        merged.stats,
        {"keep_rate.block1": torch.tensor(0.5), "keep_rate.mean": torch.tensor(0.375), "keep_rate.block3": 0.25},
    )
    assert merged.token_counts[:, 0].tolist() == [9.0, 5.0, 9.0, 3.0]  # block 2: no span, all 9 tokens
    assert_same(merged.extra_macs, torch.tensor([12.0]))
    assert merged.token_maps.keys() == {1, 3}
    without = merge_records([(range(0, 2), a), (range(3, 4), b)], 4, 1, 9, torch.device("cpu"), False)
    assert (without.token_counts, without.extra_macs, without.token_maps) == (None, 0.0, {})
    assert merge_records([(range(4), a)], 4, 1, 9, torch.device("cpu"), True) is a
