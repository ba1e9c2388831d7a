"""Checks the reducers' tests share (tests/test_reducer_contract.py and the method tests): tiny ViTs, images,
dense twins, hard inputs, and the dense-safe properties every reducer must show. A helper module, not collected
by pytest."""

from __future__ import annotations

import torch

from tokenprune.models import ViT
from tokenprune.models.reducers.base import PRUNED

DIM, DEPTH, HEADS = 48, 6, 3
ODD_SIZES = [(50, 83), (33, 33), (17, 100)]  # non-square and not multiples of 16: grids 4x6, 3x3, 2x7
IMG = (96, 128)  # a 6 x 8 grid, 48 patch tokens


def make_vit(reducer, cls_token: bool = False, seed: int = 0, img_size: int = 64, **kwargs) -> ViT:
    """A tiny ViT (48 channels, 6 blocks, 3 heads unless ``kwargs`` say otherwise) driven by ``reducer``;
    weights fixed by ``seed``."""
    torch.manual_seed(seed)
    shape = {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, **kwargs}
    return ViT(img_size=img_size, cls_token=cls_token, reducer=reducer, **shape)


def dense_twin(model: ViT) -> ViT:
    """The same backbone without its reducer, with the same weights, in the same mode."""
    dense = ViT(
        img_size=model.pos_embed_hw[0] * model.patch_size,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        cls_token=model.cls_token is not None,
    )
    result = dense.load_state_dict(model.state_dict(), strict=False)  # the reducer's own weights stay behind
    assert result.missing_keys == [] and all(k.startswith("reducer.") for k in result.unexpected_keys)
    return dense.train(model.training)


def images(batch: int, size: tuple[int, int] = IMG, seed: int = 1) -> torch.Tensor:
    """Images of different content: each has its own brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(batch, 1, 1, 1, generator=g)
    return torch.randn(batch, 3, *size, generator=g) * scale + shift


def capture_states(model: ViT) -> list:
    """Record the reducer's per-forward state, and the tokens handed to finish(), at each forward."""
    states, finish = [], model.reducer.finish

    def recording_finish(x, state):
        state.finish_input = x
        states.append(state)
        return finish(x, state)

    model.reducer.finish = recording_finish
    return states


@torch.no_grad()
def assert_shapes_match_dense(model: ViT) -> None:
    """Odd and non-square inputs (and a one-token image) give the dense backbone's map shape, finite."""
    dense = dense_twin(model)
    for size in ODD_SIZES + [(16, 16)]:
        x = images(2, size)
        out = model(x)
        assert out.shape == dense(x).shape == (2, model.embed_dim, -(-size[0] // 16), -(-size[1] // 16))
        assert torch.isfinite(out).all()


@torch.no_grad()
def assert_zero_budget_is_dense(model: ViT, training: bool) -> None:
    """With nothing to reduce the backbone's output equals the dense backbone's, and nothing was merged."""
    model.train(training)
    dense = dense_twin(model)
    for size in [IMG, ODD_SIZES[0]]:
        x = images(3, size)
        got, want = model(x), dense(x)
        assert (got - want).abs().max().item() < 1e-5
    assert all(v.item() == 1.0 for k, v in model.last_record.stats.items() if k.startswith("keep_rate."))


@torch.no_grad()
def assert_restored_from_tokens(model: ViT, x: torch.Tensor) -> dict:
    """Every position of the output holds the final token carrying it (identical at all positions of a merged
    token), or its frozen value if dropped or pinned (a merging reducer's ``restore='last'``); some tokens were
    merged. Returns the group sizes seen (over the positions restored from their tokens)."""
    states = capture_states(model)
    tokens, _ = model.forward_features(x)
    state = states[-1]
    pre_norm = model.norm  # the backbone normalises finish()'s output
    source, final = state.source, state.finish_input
    alive = source >= 0
    if getattr(state, "pinned", None) is not None:
        alive = alive & ~state.pinned
    expect = pre_norm(final.gather(1, source.clamp(min=0).unsqueeze(-1).expand(-1, -1, DIM)))
    assert torch.equal(tokens[alive], expect[alive])
    if (~alive).any():
        assert torch.equal(tokens[~alive], pre_norm(state.frozen)[~alive])
    sizes = {}
    for b in range(x.shape[0]):
        for t in source[b][alive[b]].unique().tolist():
            rows = tokens[b][source[b] == t]
            assert (rows == rows[0]).all()  # exact copies
            sizes[len(rows)] = sizes.get(len(rows), 0) + 1
    assert max(sizes) > 1, "nothing was merged"
    return sizes


@torch.no_grad()
def assert_batch_equals_singles(model: ViT, x: torch.Tensor) -> None:
    """The batch's output equals running its images one at a time (the batch runs first)."""
    batched = model(x)
    singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert (batched - singles).abs().max().item() < 1e-5


@torch.no_grad()
def assert_matches_dense(model: ViT, x: torch.Tensor, atol: float = 1e-5) -> None:
    """The reduced backbone's output equals its dense twin's."""
    got, want = model(x), dense_twin(model)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < atol


def assert_valid_token_maps(
    maps: dict[int, torch.Tensor], batch: int, num_patches: int, blocks: tuple[int, ...]
) -> None:
    """Token maps as :meth:`TokenReducer.token_maps` promises: reduced blocks only, (B, h*w) long ids, each
    ``PRUNED`` or a patch position that carries its own id, and at least one carried position per image."""
    assert set(maps) <= set(blocks), (sorted(maps), blocks)
    for ids in maps.values():
        assert ids.shape == (batch, num_patches) and ids.dtype == torch.long
        assert ((ids == PRUNED) | ((ids >= 0) & (ids < num_patches))).all()
        alive = ids != PRUNED
        assert (alive.sum(dim=1) >= 1).all()
        assert (ids.clamp(min=0).gather(1, ids.clamp(min=0)) == ids.clamp(min=0))[alive].all()


def assert_extreme_budget_is_safe(model: ViT, keep: float) -> None:
    """No NaN or inf and never an empty token set at an extreme budget, in inference and in training (losses and
    gradients finite too), on images that include a constant one (all tokens alike); valid token maps; at
    inference every block runs every token at ``keep`` 1.0, some block fewer below it."""
    model.record_tokens = True
    x = torch.cat([images(2), torch.zeros(1, 3, *IMG)])
    P, n = model.num_prefix_tokens, IMG[0] * IMG[1] // 256
    blocks = model.reducer.reduced_blocks(model.depth)
    for training in (False, True):
        model.train(training)
        model.zero_grad()
        out = model(x)
        record = model.last_record
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(loss).all() for loss in record.aux_losses.values())
        assert (record.token_counts >= P + 1).all()
        assert_valid_token_maps(record.token_maps, len(x), n, blocks)
        if training:
            (out.square().mean() + sum(record.aux_losses.values())).backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
        elif keep == 1.0:
            assert (record.token_counts == P + n).all()
        else:
            assert record.token_counts.min() < P + n


def hard_inputs() -> dict[str, tuple[torch.Tensor, bool]]:
    """Inputs that break careless numerics, by name: (images, whether the tokens are made identical and zero by
    :func:`identical_zero_tokens`)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "black": (torch.zeros(2, 3, 64, 64), False),
        "constant": (torch.full((2, 3, 64, 64), 0.5), False),
        "black_identical_zero_tokens": (torch.zeros(2, 3, 64, 64), True),
        "one_token": (randn(2, 3, 16, 16), False),
        "one_token_row": (randn(2, 3, 16, 128), False),
        "one_token_column": (randn(2, 3, 128, 16), False),
        "very_wide_16x1024": (randn(1, 3, 16, 1024), False),
        "not_divisible_37x53": (randn(2, 3, 37, 53), False),
        "huge_values": (randn(2, 3, 64, 64) * 1e4, False),
    }


HARD_INPUTS = hard_inputs()


def identical_zero_tokens(model: ViT) -> None:
    """Make a black image embed to identical all-zero tokens: every key is the zero vector, every similarity
    0/0 unless a method guards it."""
    with torch.no_grad():
        model.pos_embed.zero_()
        model.patch_embed.proj.bias.zero_()


def assert_finite(model: ViT, x: torch.Tensor, training: bool) -> None:
    """The backbone's map of images x has the dense shape and no NaN or inf, nor have its auxiliary losses; in
    training, nor has any gradient of the map's square mean plus the losses."""
    model.train(training)
    out = model(x)
    h, w = -(-x.shape[-2] // 16), -(-x.shape[-1] // 16)
    assert out.shape == (x.shape[0], model.embed_dim, h, w)
    assert torch.isfinite(out).all(), "NaN/inf in the backbone output"
    for name, loss in model.last_record.aux_losses.items():
        assert torch.isfinite(loss).all(), f"NaN/inf in {name}"
    if training:
        total = out.float().square().mean() + sum(model.last_record.aux_losses.values())
        total.backward()
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"NaN/inf gradient of {pname}"
