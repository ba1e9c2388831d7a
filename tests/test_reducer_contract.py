"""The contract every registered reducer keeps (reducers/base.py), one row per method: its vocabulary (blocks,
reduced_blocks, keep_schedule), the three backbone calls, token counts (equal to what the blocks saw), stats,
valid token maps, odd and one-token grids, batch against single images, all-keep against dense, extreme budgets
and hard inputs without NaN or inf, the class-token refusal, a state-dict round trip, and its renamed config keys
refused. A registered reducer without a row fails; a case a reducer cannot run asserts its documented refusal.

The reducers are driven here through their interface (begin / run_block / finish), on a tiny ViT's embedding
and blocks, so the contract does not depend on how a backbone keeps its record; the token counts and extreme
budgets are read from the backbone's record as well."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from reducer_checks import (
    DEPTH,
    DIM,
    HARD_INPUTS,
    IMG,
    assert_extreme_budget_is_safe,
    assert_finite,
    assert_valid_token_maps,
    dense_twin,
    identical_zero_tokens,
    images,
    make_vit,
)

from tokenprune.errors import ConfigError
from tokenprune.models import ViT
from tokenprune.models.reducers import (
    REDUCERS,
    BATReducer,
    DynamicViTReducer,
    EViTReducer,
    PPTReducer,
    SViTReducer,
    ToMeReducer,
    TPCReducer,
    build_reducer,
)

BLOCKS = (1, 3, 4)
TARGETS = (0.7, 0.5, 0.3)
SMALLEST, LARGEST = 0.01, 1.0  # the extreme budgets every reducer accepts
# token grids (h, w): the 6 x 8 default, odd ones (not square, not a multiple of anything), one token
GRIDS = {"6x8": (6, 8), "3x5": (3, 5), "7x2": (7, 2), "1x1": (1, 1)}


@dataclass(frozen=True)
class Row:
    """A registered reducer's settings in the contract.

    Attributes:
        budget: Its budget's config key: ``'keep_targets'`` (one cumulative target per block) or ``'keep_ratio'``
            (one ratio for every reducing block).
        reducing: A budget that reduces the tiny model's tokens.
        blocks: Whether it is configured with ``BLOCKS`` (False: its default, e.g. ToMe's every block).
        cls_free: Settings that let it run on a backbone without a class token; its defaults, used with one,
            score by the class token's attention and refuse a backbone without (the contract asserts the
            refusal, naming these settings). Empty: it needs no class token.
    """

    budget: str
    reducing: float | tuple[float, ...]
    blocks: bool = True
    cls_free: dict = field(default_factory=dict)

    def settings(self, budget: float | tuple[float, ...] | None = None, cls_token: bool = False) -> dict:
        """The reducer's config (without ``type``).

        Args:
            budget: The budget (a single value is repeated per block for ``keep_targets``); None: ``reducing``.
            cls_token: Whether the backbone has a class token (else ``cls_free`` applies).
        """
        value = self.reducing if budget is None else budget
        if self.budget == "keep_targets" and isinstance(value, float):
            value = (value,) * len(BLOCKS)
        out = {self.budget: value, **({"blocks": BLOCKS} if self.blocks else {})}
        return out if cls_token else {**out, **self.cls_free}


ROWS = {
    SViTReducer: Row("keep_targets", TARGETS),
    TPCReducer: Row("keep_targets", TARGETS),
    DynamicViTReducer: Row("keep_targets", TARGETS),
    EViTReducer: Row("keep_ratio", 0.6, cls_free=dict(score="mean_attention")),
    ToMeReducer: Row("keep_ratio", 0.8, blocks=False),
    PPTReducer: Row("keep_ratio", 0.6, cls_free=dict(importance="mean")),
    BATReducer: Row("keep_ratio", 0.6, cls_free=dict(importance="mean")),
}
OLD_KEYS = {"gated_blocks", "controlled_blocks", "prune_blocks", "reduce_blocks", "keep_ratios", "keep_rate"}
NAMES = sorted(REDUCERS)
N_PATCHES = IMG[0] * IMG[1] // 256


def build(name: str, budget: float | tuple[float, ...] | None = None, cls_token: bool = False) -> ViT:
    """The tiny ViT driven by reducer ``name`` with its row's settings (``budget`` instead of its reducing one)."""
    settings = ROWS[REDUCERS[name]].settings(budget, cls_token)  # a registered reducer without a row fails here
    return make_vit(build_reducer(dict(type=name, **settings), DIM), cls_token=cls_token)


def grid_images(batch: int, grid: str, seed: int = 1) -> torch.Tensor:
    """Images whose token grid is ``GRIDS[grid]``."""
    h, w = GRIDS[grid]
    return images(batch, (16 * h, 16 * w), seed)


@contextmanager
def blocks_seen(model: ViT) -> Iterator[dict[int, list[int]]]:
    """Block index -> the token counts (queries per image, padding included) its attention received (its first
    LayerNorm's input), one entry per call, while the context is open."""
    seen: dict[int, list[int]] = {}
    hooks = [
        blk.norm1.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0].shape[1]))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def drive(model: ViT, x: torch.Tensor) -> dict:
    """One forward through the reducer's three calls; what it reports, and the tokens each block's attention
    received."""
    reducer = model.reducer
    with blocks_seen(model) as seen:
        tokens, hw = model.embed(x)
        n = tokens.shape[1]
        t, state = reducer.begin(tokens, hw, model.num_prefix_tokens)
        for i, blk in enumerate(model.blocks):
            t = reducer.run_block(i, blk, t, state)
        out = reducer.finish(t, state)
    return dict(
        out=out,
        n=n,
        hw=hw,
        seen=seen,
        aux=reducer.aux_losses(state),
        stats=reducer.stats(state),
        counts=reducer.token_counts(state, model.depth),
        maps=reducer.token_maps(state),
        macs=reducer.extra_macs(state),
    )


def test_every_registered_reducer_has_a_row():
    assert set(ROWS) == set(REDUCERS.values())


def test_the_renamed_keys_are_the_old_vocabulary():
    assert {old for cls in REDUCERS.values() for old in cls.renamed_keys} == OLD_KEYS


@pytest.mark.parametrize("name", NAMES)
def test_vocabulary(name):
    cls = REDUCERS[name]
    assert list(inspect.signature(cls).parameters)[:2] == ["embed_dim", "blocks"]
    reducer = build(name).reducer
    blocks = reducer.reduced_blocks(DEPTH)
    assert isinstance(blocks, tuple) and blocks and list(blocks) == sorted(set(blocks))
    assert 0 <= blocks[0] and blocks[-1] < DEPTH
    assert reducer.blocks is None or reducer.blocks == blocks
    schedule = reducer.keep_schedule(DEPTH)
    assert len(schedule) == len(blocks) and all(0.0 < f <= 1.0 for f in schedule)
    assert reducer.keep_schedule(DEPTH, N_PATCHES) == schedule  # ratios and targets need no token count
    keep_all = build(name, LARGEST).reducer
    assert keep_all.keep_schedule(DEPTH) == (1.0,) * len(keep_all.reduced_blocks(DEPTH))


@pytest.mark.parametrize("name", NAMES)
def test_renamed_keys_are_refused_with_the_new_name(name):
    cls = REDUCERS[name]
    for old, new in cls.renamed_keys.items():
        with pytest.raises(ConfigError, match=f"{cls.__name__}: '{old}' was renamed to '{new}'"):
            build_reducer({"type": name, old: [1]}, DIM)
        with pytest.raises(ConfigError, match=f"'{old}' was renamed to '{new}'"):
            cls(DIM, **{old: [1]})
        assert new in inspect.signature(cls).parameters


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_calls_counts_stats_and_maps(name, training, cls_token, grid):
    model = build(name, cls_token=cls_token).train(training)
    reducer = model.reducer
    x = grid_images(3, grid)
    torch.manual_seed(0)
    with torch.set_grad_enabled(training):
        r = drive(model, x)
    B, P, n = 3, model.num_prefix_tokens, GRIDS[grid][0] * GRIDS[grid][1]
    blocks = reducer.reduced_blocks(DEPTH)
    # finish() returns every token position
    assert r["out"].shape == (B, P + n, DIM) and r["n"] == P + n and torch.isfinite(r["out"]).all()
    # token counts: (depth, B), within [P + 1, N], and what each block's attention ran (a padded batch runs its
    # largest count); the blocks before the first reduced one run everything
    counts = r["counts"]
    assert counts.shape == (DEPTH, B) and counts.is_floating_point()
    assert (counts >= P + 1).all() and (counts <= P + n).all()
    assert all(len(r["seen"][i]) == 1 for i in range(DEPTH))
    assert counts.max(dim=1).values.tolist() == [float(r["seen"][i][0]) for i in range(DEPTH)]
    assert (counts[: blocks[0]] == P + n).all()
    # stats: a keep rate per reduced block, per image, and their mean
    stats = r["stats"]
    for b in blocks:
        rate, per_image = stats[f"keep_rate.block{b}"], stats[f"keep_rate_per_image.block{b}"]
        assert rate.dim() == 0 and per_image.shape == (B,) and not per_image.requires_grad
        assert ((per_image > 0) & (per_image <= 1)).all()
        assert rate.item() == pytest.approx(per_image.mean().item())
    means = torch.stack([stats[f"keep_rate.block{b}"] for b in blocks]).mean()
    assert stats["keep_rate.mean"].item() == pytest.approx(means.item())
    # token maps: reduced blocks only, (B, h*w) ids, PRUNED or a position that carries its own id
    assert_valid_token_maps(r["maps"], B, n, blocks)
    # losses are named as losses and finite; the method's own MACs are non-negative
    assert all("loss" in k and torch.isfinite(v) for k, v in r["aux"].items())
    assert float(torch.as_tensor(r["macs"]).min()) >= 0
    if not training:  # the realised keep rate follows the nominal schedule (rounding and extra tokens aside)
        schedule = reducer.keep_schedule(DEPTH, n)
        for i, (b, nominal) in enumerate(zip(blocks, schedule)):
            assert abs(stats[f"keep_rate.block{b}"].item() - nominal) <= (2 * (i + 1) + 1) / n, (b, nominal)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_token_counts_are_what_the_blocks_saw(name, cls_token, grid):
    """The backbone's record (``record_tokens``) at inference: one image at a time, the queries each block
    received; a batch (padded to its largest count where counts differ) counts what each image needs, at most
    what the block ran and, for one of its images, exactly that."""
    model = build(name, cls_token=cls_token).eval()
    model.record_tokens = True
    x = torch.cat([grid_images(2, grid), torch.zeros_like(grid_images(1, grid))])  # a constant image too
    for i in range(len(x)):
        with blocks_seen(model) as seen:
            model(x[i : i + 1])
        assert all(len(seen[b]) == 1 for b in range(DEPTH))
        assert model.last_record.token_counts[:, 0].tolist() == [float(seen[b][0]) for b in range(DEPTH)]
    with blocks_seen(model) as seen:
        model(x)
    ran = torch.tensor([float(seen[b][0]) for b in range(DEPTH)])
    counts = model.last_record.token_counts
    assert counts.shape == (DEPTH, len(x))
    assert (counts <= ran[:, None]).all() and torch.equal(counts.max(dim=1).values, ran)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_batch_equals_one_image_at_a_time(name, grid):
    model = build(name).eval()
    x = torch.cat([grid_images(2, grid), torch.zeros_like(grid_images(1, grid))])  # a constant image: tokens alike
    batched = drive(model, x)
    singles = [drive(model, x[i : i + 1]) for i in range(len(x))]
    assert (batched["out"] - torch.cat([s["out"] for s in singles])).abs().max().item() < 1e-5
    assert torch.equal(batched["counts"], torch.cat([s["counts"] for s in singles], dim=1))
    for b, ids in batched["maps"].items():
        assert torch.equal(ids, torch.cat([s["maps"][b] for s in singles]))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_keeping_every_token_is_the_dense_backbone(name, cls_token, grid):
    model = build(name, LARGEST, cls_token=cls_token).eval()
    x = grid_images(2, grid)
    assert (model(x) - dense_twin(model)(x)).abs().max().item() < 1e-5
    r = drive(model, x)
    assert (r["counts"] == model.num_prefix_tokens + GRIDS[grid][0] * GRIDS[grid][1]).all()
    assert all(v.item() == 1.0 for k, v in r["stats"].items() if k.startswith("keep_rate."))


@pytest.mark.parametrize("keep", [SMALLEST, LARGEST])
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_budgets_are_safe(name, cls_token, keep):
    assert_extreme_budget_is_safe(build(name, keep, cls_token=cls_token), keep)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(HARD_INPUTS))
@pytest.mark.parametrize("cls_token", [False, True], ids=["no_cls", "cls"])
@pytest.mark.parametrize("name", NAMES)
def test_hard_inputs_are_finite(name, cls_token, case, training):
    """Black, constant and huge images, identical zero tokens, one token, one row or column, very wide and
    non-divisible sizes (docs/reliability.md): the map, the losses and every gradient are finite."""
    model = build(name, cls_token=cls_token)
    x, zero_tokens = HARD_INPUTS[case]
    if zero_tokens:
        identical_zero_tokens(model)
    assert_finite(model, x, training)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["constant", "one_token_row", "very_wide_16x1024"])
@pytest.mark.parametrize("cls_token", [False, True], ids=["no_cls", "cls"])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_hard_inputs_are_finite_under_cpu_autocast(name, cls_token, case, dtype):
    model = build(name, cls_token=cls_token).eval()
    with torch.autocast("cpu", dtype=dtype):
        out = model(HARD_INPUTS[case][0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_a_class_token_score_without_a_class_token_is_refused(name):
    """A reducer whose defaults score by the class token's attention refuses a backbone without one, naming its
    CLS-free settings; a reducer that needs no class token runs without one."""
    cls, row = REDUCERS[name], ROWS[REDUCERS[name]]
    model = make_vit(build_reducer(dict(type=name, **row.settings(cls_token=True)), DIM), cls_token=False).eval()
    if not row.cls_free:
        assert torch.isfinite(model(images(1))).all()
        return
    defaults = inspect.signature(cls).parameters
    assert all(defaults[k].default != v for k, v in row.cls_free.items())  # the defaults need the class token
    with pytest.raises(ValueError, match="class token") as info:
        model(images(1))
    assert all(f"{k}={v!r}" in str(info.value) for k, v in row.cls_free.items()), str(info.value)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_state_dict_round_trip(name):
    model = build(name).eval()
    x = images(2)
    want = drive(model, x)["out"]
    fresh = build(name).eval()
    torch.manual_seed(123)
    for p in fresh.parameters():
        p.add_(torch.randn_like(p))  # nothing of the original survives but what the state dict carries
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(drive(fresh, x)["out"], want)
