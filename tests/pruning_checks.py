"""Checks the pruning reducers' tests share (EViT, DynamicViT, TPC): tiny ViTs, images, dense twins."""

from __future__ import annotations

import math

import torch

from tokenprune.models import ViT

DIM, DEPTH, HEADS = 48, 6, 3
ODD_SIZES = [(50, 83), (33, 33), (17, 100)]  # non-square and not multiples of 16


def make_vit(reducer, cls_token: bool = False, seed: int = 0, img_size: int = 64, **kwargs) -> ViT:
    """A tiny ViT (48 channels, 6 blocks, 3 heads) driven by ``reducer``; weights fixed by ``seed``."""
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
    result = dense.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("reducer.") for k in result.unexpected_keys)
    return dense.train(model.training)


def images(batch: int, size: tuple[int, int] = (64, 96), seed: int = 1) -> torch.Tensor:
    """Images of different content: each has its own brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(batch, 1, 1, 1, generator=g)
    return torch.randn(batch, 3, *size, generator=g) * scale + shift


def capture_states(model: ViT) -> list:
    """Record the reducer's per-forward state (and the tokens handed to finish) at each forward's finish()."""
    states, finish = [], model.reducer.finish

    def recording_finish(x, state):
        state.finish_input = x
        states.append(state)
        return finish(x, state)

    model.reducer.finish = recording_finish
    return states


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


@torch.no_grad()
def assert_dense_shapes(model: ViT) -> None:
    """Odd and non-square inputs give the dense ceil(H/16) x ceil(W/16) map, finite."""
    dense = dense_twin(model)
    for h, w in ODD_SIZES:
        x = images(2, (h, w))
        out = model(x)
        assert out.shape == dense(x).shape == (2, model.embed_dim, math.ceil(h / 16), math.ceil(w / 16))
        assert torch.isfinite(out).all()
