"""The contract every registered reducer keeps (reducers/base.py), one row per method: its vocabulary (blocks,
reduced_blocks, keep_schedule), the three backbone calls, token counts, stats, token maps, batch against single
images, all-keep against dense, and its renamed config keys refused. A registered reducer without a row fails.

The reducers are driven here through their interface (begin / run_block / finish), on a tiny ViT's embedding
and blocks, so the contract does not depend on how a backbone keeps its record."""

from __future__ import annotations

import inspect

import pytest
import torch
from reducer_checks import DEPTH, DIM, IMG, dense_twin, images, make_vit

from tokenprune.errors import ConfigError
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
from tokenprune.models.reducers.base import PRUNED

BLOCKS = (1, 3, 4)
TARGETS = (0.7, 0.5, 0.3)

# reducer class -> (settings of a reducing tiny model, settings that keep every token)
ROWS = {
    SViTReducer: (dict(blocks=BLOCKS, keep_targets=TARGETS), dict(blocks=BLOCKS, keep_targets=(1.0,) * 3)),
    TPCReducer: (dict(blocks=BLOCKS, keep_targets=TARGETS), dict(blocks=BLOCKS, keep_targets=(1.0,) * 3)),
    DynamicViTReducer: (dict(blocks=BLOCKS, keep_targets=TARGETS), dict(blocks=BLOCKS, keep_targets=(1.0,) * 3)),
    EViTReducer: (
        dict(blocks=BLOCKS, keep_ratio=0.6, score="mean_attention"),
        dict(blocks=BLOCKS, keep_ratio=1.0, score="mean_attention"),
    ),
    ToMeReducer: (dict(keep_ratio=0.8), dict(keep_ratio=1.0)),
    PPTReducer: (
        dict(blocks=BLOCKS, keep_ratio=0.6, importance="mean"),
        dict(blocks=BLOCKS, keep_ratio=1.0, importance="mean"),
    ),
    BATReducer: (
        dict(blocks=BLOCKS, keep_ratio=0.6, importance="mean"),
        dict(blocks=BLOCKS, keep_ratio=1.0, importance="mean"),
    ),
}
OLD_KEYS = {"gated_blocks", "controlled_blocks", "prune_blocks", "reduce_blocks", "keep_ratios", "keep_rate"}
NAMES = sorted(REDUCERS)
N_PATCHES = IMG[0] * IMG[1] // 256


def build(name: str, keep_all: bool = False, cls_token: bool = False):
    """The tiny ViT driven by reducer ``name`` with its row's settings."""
    settings = ROWS[REDUCERS[name]][int(keep_all)]  # a registered reducer without a row fails here
    return make_vit(build_reducer(dict(type=name, **settings), DIM), cls_token=cls_token)


def drive(model, x: torch.Tensor) -> dict:
    """One forward through the reducer's three calls; what it reports, and the tokens each block's attention
    received (its first LayerNorm's input)."""
    reducer, seen = model.reducer, {}
    hooks = [
        blk.norm1.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0].shape[1]))
        for i, blk in enumerate(model.blocks)
    ]
    try:
        tokens, hw = model.embed(x)
        n = tokens.shape[1]
        t, state = reducer.begin(tokens, hw, model.num_prefix_tokens)
        for i, blk in enumerate(model.blocks):
            t = reducer.run_block(i, blk, t, state)
        out = reducer.finish(t, state)
    finally:
        for h in hooks:
            h.remove()
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
    keep_all = build(name, keep_all=True).reducer
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


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_calls_counts_stats_and_maps(name, training, cls_token):
    model = build(name, cls_token=cls_token).train(training)
    reducer = model.reducer
    x = images(3)
    torch.manual_seed(0)
    with torch.set_grad_enabled(training):
        r = drive(model, x)
    B, P, n = 3, model.num_prefix_tokens, N_PATCHES
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
    maps = r["maps"]
    assert set(maps) <= set(blocks)
    for ids in maps.values():
        assert ids.shape == (B, n) and ids.dtype == torch.long
        assert ((ids == PRUNED) | ((ids >= 0) & (ids < n))).all()
        alive = ids != PRUNED
        assert (ids.clamp(min=0).gather(1, ids.clamp(min=0)) == ids.clamp(min=0))[alive].all()
    # losses are named as losses and finite; the method's own MACs are non-negative
    assert all("loss" in k and torch.isfinite(v) for k, v in r["aux"].items())
    assert float(torch.as_tensor(r["macs"]).min()) >= 0
    if not training:  # the realised keep rate follows the nominal schedule (rounding and extra tokens aside)
        schedule = reducer.keep_schedule(DEPTH, n)
        for i, (b, nominal) in enumerate(zip(blocks, schedule)):
            assert abs(stats[f"keep_rate.block{b}"].item() - nominal) <= (2 * (i + 1) + 1) / n, (b, nominal)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_batch_equals_one_image_at_a_time(name):
    model = build(name).eval()
    x = torch.cat([images(2), torch.zeros(1, 3, *IMG)])  # a constant image too: all tokens alike
    batched = drive(model, x)
    singles = [drive(model, x[i : i + 1]) for i in range(len(x))]
    assert (batched["out"] - torch.cat([s["out"] for s in singles])).abs().max().item() < 1e-5
    assert torch.equal(batched["counts"], torch.cat([s["counts"] for s in singles], dim=1))
    for b, ids in batched["maps"].items():
        assert torch.equal(ids, torch.cat([s["maps"][b] for s in singles]))


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_keeping_every_token_is_the_dense_backbone(name, cls_token):
    model = build(name, keep_all=True, cls_token=cls_token).eval()
    x = images(2)
    assert (model(x) - dense_twin(model)(x)).abs().max().item() < 1e-5
    r = drive(model, x)
    assert (r["counts"] == model.num_prefix_tokens + N_PATCHES).all()
    assert all(v.item() == 1.0 for k, v in r["stats"].items() if k.startswith("keep_rate."))


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
