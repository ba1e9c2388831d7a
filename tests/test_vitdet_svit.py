"""SViT inside ViTDet's windowed blocks (tokenprune.models.reducers.windowed): the kept tokens of every window
gathered and run at their original places, against references written here from the equations (one window at
a time, the pruned tokens masked out as keys, relative positions from index tables), the dense windowed model
with every token kept, one image at a time, empty windows, training, and FLOPs. TPC and ToMe in windows, and the
reducers refused there: tests/test_vitdet_reducers.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_vitdet import DEPTH, DIM, GLOBAL, HEADS, TINY, WINDOW, randomise, ref_rel_table  # noqa: F401 (re-exported)

from tokenprune.models import SViTReducer, ViT
from tokenprune.models.flops import backbone_macs, count_backbone_macs, dense_backbone_macs
from tokenprune.models.reducers.windowed import kept_windows, run_gathered, run_on_kept_windowed, window_counts

# grids: 7x10 (neither side a multiple of the window), 13x6, one padded window (3x2), one token (1x1), 8x8
GRIDS = [(7, 10), (13, 6), (3, 2), (1, 1), (8, 8)]


@pytest.fixture(scope="module")
def tiny() -> ViT:
    return randomise(ViT(**TINY))


def svit(targets=(0.6, 0.5, 0.4), blocks=(1, 2, 3), **kwargs) -> SViTReducer:
    return SViTReducer(DIM, blocks, targets, **kwargs)


def tiny_svit(reducer: SViTReducer, seed: int = 0) -> ViT:
    return randomise(ViT(**TINY, reducer=reducer), seed)


def random_keep(batch: int, hw: tuple[int, int], p: float, seed: int) -> torch.Tensor:
    keep = torch.rand(batch, hw[0] * hw[1], generator=torch.Generator().manual_seed(seed)) < p
    keep[:, 0] = True
    return keep


# ---------------------------------------------------------------------------------------------------------
# The reference: the block on one image, one window at a time, pruned keys masked out, outputs restored


def params(model: ViT, i: int) -> dict:
    return {k[len(f"blocks.{i}.") :]: v for k, v in model.state_dict().items() if k.startswith(f"blocks.{i}.")}


def ref_masked_attention(y: torch.Tensor, allowed: torch.Tensor, p: dict) -> torch.Tensor:
    """Attention over a grid y (gh, gw, C) of normalised tokens, keys where ``allowed`` (gh, gw) is False
    masked out, decomposed relative positions of the grid's rows and columns."""
    gh, gw, C = y.shape
    d = C // HEADS
    qkv = F.linear(y.reshape(gh * gw, C), p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = (qkv[:, i * C : (i + 1) * C].reshape(gh * gw, HEADS, d).transpose(0, 1) for i in range(3))
    logits = (q / math.sqrt(d)) @ k.transpose(1, 2)
    Rh, Rw = ref_rel_table(gh, p["attn.rel_pos_h"]), ref_rel_table(gw, p["attn.rel_pos_w"])
    qg = q.reshape(HEADS, gh, gw, d)
    bias = torch.einsum("nyxc,ykc->nyxk", qg, Rh)[..., None] + torch.einsum("nyxc,xkc->nyxk", qg, Rw)[..., None, :]
    logits = (logits + bias.reshape(HEADS, gh * gw, gh * gw)).masked_fill(~allowed.reshape(1, 1, -1), -math.inf)
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(gh * gw, C)
    return F.linear(out, p["attn.proj.weight"], p["attn.proj.bias"]).reshape(gh, gw, C)


def ref_pruned_block(x: torch.Tensor, keep: torch.Tensor, p: dict, window: int) -> torch.Tensor:
    """One image's tokens x (h, w, C), keep (h, w) -> the block's output at kept tokens, x at pruned ones. The
    grid is zero-padded to whole windows (padding keys take part, as in the dense block); a window runs on all
    its tokens with the pruned ones masked out as keys."""
    h, w, C = x.shape
    y = F.layer_norm(x, (C,), p["norm1.weight"], p["norm1.bias"], 1e-6)
    wh, ww = (window, window) if window else (h, w)
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    padded, allowed = torch.zeros(hp, wp, C), torch.ones(hp, wp, dtype=torch.bool)
    padded[:h, :w], allowed[:h, :w] = y, keep
    out = torch.zeros(hp, wp, C)
    for top in range(0, hp, wh):
        for left in range(0, wp, ww):
            rows, cols = slice(top, top + wh), slice(left, left + ww)
            if allowed[rows, cols].any():
                out[rows, cols] = ref_masked_attention(padded[rows, cols], allowed[rows, cols], p)
    z = x + out[:h, :w]
    y = F.layer_norm(z, (C,), p["norm2.weight"], p["norm2.bias"], 1e-6)
    z = z + F.linear(
        F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
    )
    return torch.where(keep[..., None], z, x)


def ref_tokens_at(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, p: dict) -> torch.Tensor:
    """Tokens t (n, C) attending to each other only, at the given (rows, cols) of a window: the block's (n, C)
    outputs."""
    C = t.shape[-1]
    d = C // HEADS
    y = F.layer_norm(t, (C,), p["norm1.weight"], p["norm1.bias"], 1e-6)
    qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = (qkv[:, i * C : (i + 1) * C].reshape(-1, HEADS, d).transpose(0, 1) for i in range(3))
    Rh, Rw = ref_rel_table(WINDOW, p["attn.rel_pos_h"]), ref_rel_table(WINDOW, p["attn.rel_pos_w"])
    bias = torch.einsum("nqc,qkc->nqk", q, Rh[rows][:, rows]) + torch.einsum("nqc,qkc->nqk", q, Rw[cols][:, cols])
    a = (((q / math.sqrt(d)) @ k.transpose(1, 2) + bias).softmax(-1) @ v).transpose(0, 1).reshape(-1, C)
    z = t + F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"])
    y = F.layer_norm(z, (C,), p["norm2.weight"], p["norm2.bias"], 1e-6)
    return z + F.linear(
        F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
    )


# ---------------------------------------------------------------------------------------------------------
# Gathered kept tokens against the references


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
@pytest.mark.parametrize("hw", GRIDS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_gathered_kept_tokens_equal_masked_reference(tiny, index, hw):
    """Each window (a global block: the grid) on its kept tokens at their original rows and columns equals the
    window run on all its tokens with the pruned ones masked out as keys; batch of 2 with different counts."""
    block, p = tiny.blocks[index], params(tiny, index)
    N = hw[0] * hw[1]
    x = torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(3))
    keep = random_keep(2, hw, 0.5, seed=4)
    keep[1] = torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.2  # fewer, windows without any
    keep[1, -1] = True
    with torch.no_grad():
        got = run_on_kept_windowed(block, x, keep, hw)
        masked = torch.where(keep[..., None], block(x, keep[:, None, None, :], hw), x)  # how SViT trains
    for b in range(2):
        want = ref_pruned_block(x[b].reshape(*hw, DIM), keep[b].reshape(hw), p, block.window_size)
        assert (got[b] - want.reshape(N, DIM)).abs().max().item() < 1e-5
    assert (got - masked).abs().max().item() < 1e-5
    assert torch.equal(got[~keep], x[~keep])  # pruned tokens keep their value


def test_a_pruned_window_equals_that_window_run_on_its_kept_tokens(tiny):
    """An interior window equals its kept tokens run alone at their original rows and columns in the window,
    not at their places in the gathered set."""
    block, p = tiny.blocks[0], params(tiny, 0)
    x = torch.randn(1, 64, DIM, generator=torch.Generator().manual_seed(6))
    keep = torch.zeros(8, 8, dtype=torch.bool)
    pattern = [[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]]
    keep[4:8, 0:4] = torch.tensor(pattern, dtype=torch.bool)  # window 2 (bottom left)
    with torch.no_grad():
        got = run_on_kept_windowed(block, x, keep.reshape(1, 64), (8, 8)).reshape(8, 8, DIM)
        rows, cols = keep[4:8, 0:4].nonzero(as_tuple=True)
        kept = x.reshape(8, 8, DIM)[4 + rows, cols]
        want = ref_tokens_at(kept, rows, cols, p)
        slots = torch.arange(len(rows))
        packed = ref_tokens_at(kept, slots // WINDOW, slots % WINDOW, p)  # as if at the gathered places
    assert (got[4:8, 0:4][keep[4:8, 0:4]] - want).abs().max().item() < 1e-5
    assert (want - packed).abs().max().item() > 1e-3
    assert torch.equal(got[~keep], x.reshape(8, 8, DIM)[~keep])


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
@pytest.mark.parametrize("hw", GRIDS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_gathering_every_token_equals_the_dense_block(tiny, index, hw):
    """Forced through the gathered path, every token kept: the dense block, the grid padding included."""
    block = tiny.blocks[index]
    x = torch.randn(2, hw[0] * hw[1], DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, plan = run_gathered(block, x, torch.ones(2, hw[0] * hw[1], dtype=torch.bool), hw)
        want = block(x, None, hw)
    assert (got - want).abs().max().item() < 1e-5
    windows = math.ceil(hw[0] / WINDOW) * math.ceil(hw[1] / WINDOW) if index == 0 else 1
    assert plan.counts.shape == (2, windows) and plan.counts.sum().item() == 2 * hw[0] * hw[1]


def test_windows_without_kept_tokens_are_left_out(tiny):
    block = tiny.blocks[0]
    hw = (8, 12)  # 2 x 3 windows
    x = torch.randn(2, 96, DIM, generator=torch.Generator().manual_seed(8))
    keep = torch.zeros(2, 8, 12, dtype=torch.bool)
    keep[0, 0, 0] = keep[0, 5, 9] = keep[0, 6, 10] = True  # image 0: windows 0 (1 token) and 5 (2 tokens)
    keep[1, 4:8, 4:8] = True  # image 1: window 4, all 16
    keep = keep.reshape(2, 96)
    plan = kept_windows(keep, hw, (WINDOW, WINDOW))
    assert plan.counts.tolist() == [[1, 0, 0, 0, 0, 2], [0, 0, 0, 0, 16, 0]]
    assert plan.coords.shape == (3, 16, 2) and plan.key_mask.sum(dim=1).tolist() == [1, 2, 16]
    assert torch.equal(window_counts(keep, hw, (WINDOW, WINDOW)), plan.counts)
    with torch.no_grad():
        got = run_on_kept_windowed(block, x, keep, hw)
    assert torch.isfinite(got).all()
    for b in range(2):
        want = ref_pruned_block(x[b].reshape(8, 12, DIM), keep[b].reshape(8, 12), params(tiny, 0), WINDOW)
        assert (got[b] - want.reshape(96, DIM)).abs().max().item() < 1e-5
    # no kept token at all: nothing runs
    nothing = torch.zeros(2, 96, dtype=torch.bool)
    assert torch.equal(run_on_kept_windowed(block, x, nothing, hw), x)


def test_training_mask_applies_per_window_and_empty_windows_stay_finite(tiny):
    """SViT's training runs every token with a key mask (B, 1, 1, N): inside a windowed block it masks per
    window (window_key_mask), equal to the reference at the kept tokens, and a window that keeps nothing gives
    finite values (its outputs are discarded)."""
    block, p = tiny.blocks[0], params(tiny, 0)
    hw = (7, 10)
    x = torch.randn(2, 70, DIM, generator=torch.Generator().manual_seed(9))
    keep = random_keep(2, hw, 0.4, seed=10)
    keep[:, :40] &= False  # the top windows (rows 0-3) keep nothing
    keep[:, 0] = False
    keep[:, 69] = True
    with torch.no_grad():
        y = block(x, keep[:, None, None, :], hw)
    assert torch.isfinite(y).all()
    for b in range(2):
        want = ref_pruned_block(x[b].reshape(7, 10, DIM), keep[b].reshape(7, 10), p, WINDOW).reshape(70, DIM)
        assert (torch.where(keep[b, :, None], y[b], x[b]) - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# SViT on the windowed backbone


def keep_everything(reducer: SViTReducer) -> SViTReducer:
    """Calibrated thresholds of 0: every p_keep passes."""
    reducer.thresholds.zero_()
    reducer.calibration_steps.fill_(1)
    return reducer


@pytest.mark.parametrize("size", [(112, 160), (48, 32), (16, 16), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_svit_keeping_every_token_equals_the_dense_windowed_vit(size):
    model = tiny_svit(keep_everything(svit(blocks=(0, 1, 2, 3), targets=(0.5,) * 4)))
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        got = model(images)
        reducer = model.reducer
        model.set_reducer(None)
        want = model(images)
        model.set_reducer(reducer)
    assert (got - want).abs().max().item() < 1e-5


def masked_reference(model: ViT, images: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The model with SViT's gated blocks at inference run the slow way: all tokens, pruned keys masked."""
    import tokenprune.models.reducers.svit as svit_module

    def masked(block, x, keep, hw, num_prefix):
        return torch.where(keep[..., None], block(x, keep[:, None, None, :], hw), x)

    with monkeypatch.context() as m:
        m.setattr(svit_module, "run_block_on_kept", masked)
        with torch.no_grad():
            return model(images)


def test_svit_inference_equals_the_masked_model_and_one_image_at_a_time(monkeypatch):
    """Different kept counts per image (calibrated thresholds): the batch equals one image at a time and the
    slow masked model; gated blocks 1 and 3 are global with relative positions, 0 and 2 windowed."""
    reducer = svit(blocks=(0, 1, 2, 3), targets=(0.7, 0.5, 0.4, 0.3))
    model = tiny_svit(reducer)
    images = torch.randn(3, 3, 112, 160, generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), reducer.calibration():
        model(images)
    model.record_tokens = True
    with torch.no_grad():
        got = model(images)
    counts = model.last_record.token_counts
    assert (counts < 70).all() and len({tuple(c) for c in counts.T.tolist()}) == 3  # every image its own counts
    with torch.no_grad():
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    assert (got - single).abs().max().item() < 1e-5
    assert (got - masked_reference(model, images, monkeypatch)).abs().max().item() < 1e-5


def test_svit_reactivates_tokens_in_windowed_blocks():
    """A token pruned at one windowed block may be kept again by a later gate, and pruned ones keep their value."""
    model = tiny_svit(svit(blocks=(0, 2), targets=(0.3, 0.6), inference="fixed"))
    model.record_tokens = True
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 160, generator=torch.Generator().manual_seed(13)))
    maps = model.last_record.token_maps
    assert ((maps[0] < 0) & (maps[2] >= 0)).any()


def test_svit_trains_on_the_windowed_backbone():
    model = tiny_svit(svit(blocks=(0, 1, 2, 3), targets=(0.7, 0.5, 0.4, 0.3))).train()
    images = torch.randn(2, 3, 112, 160, generator=torch.Generator().manual_seed(14))
    torch.manual_seed(0)
    out = model(images)
    losses = model.last_record.aux_losses
    (out.square().mean() + sum(losses.values())).backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    gates = [p.grad for name, p in model.reducer.named_parameters() if name.startswith("gates.")]
    assert all(g.abs().sum() > 0 for g in gates)


# ---------------------------------------------------------------------------------------------------------
# FLOPs from the tokens each window ran


def test_flops_count_the_kept_tokens_of_each_window():
    """Block 0 (windowed) gated with a fixed budget: its MACs are n * 12 C^2 + 2 C * sum_w n_w^2 per image;
    the padded count runs every non-empty window as long as the batch's longest."""
    model = tiny_svit(svit(blocks=(0,), targets=(0.3,), inference="fixed"))
    images = torch.randn(2, 3, 112, 160, generator=torch.Generator().manual_seed(15))
    macs = count_backbone_macs(model, images)
    keep = model.last_record.token_maps[0] >= 0  # (2, 70) on the 7 x 10 grid
    n_w = window_counts(keep, (7, 10), (WINDOW, WINDOW)).double()  # (2, 6)
    C = DIM
    want = keep.sum(dim=1).double() * 12 * C * C + 2 * C * n_w.square().sum(dim=1)
    assert torch.allclose(macs.blocks[0], want)
    dense = dense_backbone_macs(model, (112, 160), batch=2)
    assert torch.equal(macs.blocks[1:], dense.blocks[1:])
    assert (macs.total < dense.total).all()
    padded = backbone_macs(model, (112, 160), padded=True)
    longest = torch.where(n_w > 0, n_w.max(), n_w)
    n_pad = keep.sum(dim=1).max().double()
    want_padded = n_pad * 8 * C * C + longest.sum(dim=1) * 4 * C * C + 2 * C * longest.square().sum(dim=1)
    assert torch.allclose(padded.blocks[0], want_padded)
    # training runs every token (masked): dense windows
    model.train()
    trained = count_backbone_macs(model, images)
    assert torch.equal(trained.blocks, dense.blocks)


def test_windows_without_relative_positions():
    """Window attention alone (no tables): the padding keys folded into one key still count as many keys."""
    model = randomise(ViT(**{**TINY, "use_rel_pos": False}))
    block = model.blocks[0]
    x = torch.randn(2, 70, DIM, generator=torch.Generator().manual_seed(16))
    keep = random_keep(2, (7, 10), 0.5, seed=17)
    with torch.no_grad():
        got = run_gathered(block, x, keep, (7, 10))[0]
        masked = torch.where(keep[..., None], block(x, keep[:, None, None, :], (7, 10)), x)
        every = run_gathered(block, x, torch.ones_like(keep), (7, 10))[0]
    assert (got - masked).abs().max().item() < 1e-5
    assert (every - block(x, None, (7, 10))).abs().max().item() < 1e-5
