"""TPC and ToMe inside ViTDet's windowed and relative-position blocks, and the reducers refused there.

TPC runs each window on its active tokens as SViT does (tests/test_vitdet_svit.py has the references of that
path): every token active equals the dense windowed ViT, inference equals the slow masked model and one image
at a time, training and its refusal of sparse compute. ToMe merges, computes and unmerges inside each window
(reducers/tome.py): keep ratio 1.0 is the dense windowed ViT exactly, a merged block equals a reference written
here (the same assignment, attention among the merged tokens at their destinations with the padding keys and
log(size), unmerge, MLP on the merged inputs), batch equals one image at a time, odd grids, one token, FLOPs
counted by hand. EViT, DynamicViT, PPT and BAT are refused with why and what to use."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_vitdet_svit import DIM, HEADS, TINY, WINDOW, params, randomise, ref_rel_table

import tokenprune.models.reducers.tpc as tpc_module
from tokenprune.models import ViT
from tokenprune.models.flops import count_backbone_macs, dense_backbone_macs
from tokenprune.models.reducers import REDUCERS, ToMeReducer, TPCReducer, build_reducer
from tokenprune.models.reducers.merging import bipartite_soft_matching, token_ids
from tokenprune.models.reducers.tome import match_with_destinations, merge_in_windows
from tokenprune.models.reducers.windowed import run_block_on_kept, window_groups

# images -> grids 7x10 (no side a multiple of the window), 13x6, 3x2 (one padded window), 1x1 (one token), 8x8
SIZES = [(112, 160), (208, 96), (48, 32), (16, 16), (128, 128)]
size_id = "{0[0]}x{0[1]}".format


@pytest.fixture(scope="module")
def tiny() -> ViT:
    return randomise(ViT(**TINY))


def dense_of(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """The same model without its reducer."""
    reducer = model.reducer
    model.set_reducer(None)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.set_reducer(reducer)


def images_of(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# TPC: per-window pausing


def tpc(**kwargs) -> TPCReducer:
    return TPCReducer(DIM, **{"blocks": (0, 1, 2, 3), "keep_targets": (0.7, 0.5, 0.4, 0.3), **kwargs})


def tiny_tpc(reducer: TPCReducer, seed: int = 0) -> ViT:
    """Random weights, the controllers and stabilizers included (non-zero: paused tokens move)."""
    return randomise(ViT(**TINY, reducer=reducer), seed)


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_tpc_with_every_token_active_equals_the_dense_windowed_vit(size):
    reducer = tpc()
    reducer.thresholds.zero_()  # calibrated at 0: every s passes
    reducer.calibration_steps.fill_(1)
    model = tiny_tpc(reducer)
    images = images_of(size, seed=1)
    with torch.no_grad():
        got = model(images)
    assert (got - dense_of(model, images)).abs().max().item() < 1e-5


def masked_tpc(block, x, keep, hw, num_prefix):
    """TPC's gathered block the slow way: every token runs, the paused ones masked out as keys (per window)."""
    return torch.where(keep[..., None], block(x, keep[:, None, None, :], hw), x)


@pytest.mark.parametrize("size", [(112, 160), (208, 96)], ids=size_id)
def test_tpc_inference_equals_the_masked_model_and_one_image_at_a_time(size, monkeypatch):
    """Calibrated thresholds (different active counts per image), the stabilizer on: the batch equals one image
    at a time and the model whose controlled blocks run every token with the paused ones masked as keys; blocks 0
    and 2 are windowed, 1 and 3 global with relative positions."""
    reducer = tpc()
    model = tiny_tpc(reducer)
    images = images_of(size, batch=3, seed=2)
    with torch.no_grad(), reducer.calibration():
        model(images)
    model.record_tokens = True
    with torch.no_grad():
        got = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    counts = model.last_record.token_counts
    N = size[0] // 16 * (size[1] // 16)
    assert (counts < N).all()
    assert (got - single).abs().max().item() < 1e-5
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(tpc_module, "run_block_on_kept", masked_tpc)
        want = model(images)
    assert (got - want).abs().max().item() < 1e-5


def test_tpc_restarts_paused_tokens_in_windowed_blocks():
    model = tiny_tpc(tpc(blocks=(0, 2), keep_targets=(0.3, 0.6), inference="fixed"))
    model.record_tokens = True
    with torch.no_grad():
        model(images_of((112, 160), batch=1, seed=3))
    maps = model.last_record.token_maps
    assert ((maps[0] < 0) & (maps[2] >= 0)).any()


def test_tpc_flops_count_the_active_tokens_of_each_window():
    model = tiny_tpc(tpc(blocks=(0,), keep_targets=(0.3,), inference="fixed"))
    images = images_of((112, 160), seed=4)
    macs = count_backbone_macs(model, images)
    keep = (model.last_record.token_maps[0] >= 0).reshape(2, 7, 10)
    n_w = torch.stack([keep[:, r : r + WINDOW, c : c + WINDOW].sum(dim=(1, 2)) for r in (0, 4) for c in (0, 4, 8)], 1)
    n = keep.sum(dim=(1, 2)).double()
    assert n.tolist() == [21.0, 21.0]  # ceil(0.3 * 70)
    assert torch.allclose(macs.blocks[0], n * 12 * DIM * DIM + 2 * DIM * n_w.double().square().sum(dim=1))
    assert torch.equal(macs.blocks[1:], dense_backbone_macs(model, (112, 160), batch=2).blocks[1:])


def test_tpc_trains_on_the_windowed_backbone():
    model = tiny_tpc(tpc()).train()
    torch.manual_seed(0)
    out = model(images_of((112, 160), seed=5))
    losses = model.last_record.aux_losses
    assert {"loss_tpc_budget", "loss_tpc_smooth"} <= set(losses)
    (out.square().mean() + sum(losses.values())).backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    controllers = [p.grad for name, p in model.reducer.named_parameters() if name.startswith("controllers.")]
    assert all(g.abs().sum() > 0 for g in controllers)


def test_tpc_sparse_training_is_refused_in_windowed_blocks():
    model = tiny_tpc(tpc(train_compute="sparse")).train()
    with pytest.raises(ValueError, match="train_compute='masked'"):
        model(images_of((64, 64), batch=1, seed=6))
    model.eval()
    with torch.no_grad():  # inference gathers as with 'masked'
        assert torch.isfinite(model(images_of((64, 64), batch=1, seed=6))).all()


def test_run_block_on_kept_dispatches_on_the_grid(tiny):
    """A block that needs the grid runs per window; a plain global block gathers the image's kept tokens; both
    equal the block with the others masked out as keys."""
    plain = randomise(ViT(img_size=64, embed_dim=DIM, depth=1, num_heads=HEADS)).blocks[0]
    x = torch.randn(2, 70, DIM, generator=torch.Generator().manual_seed(7))
    keep = torch.rand(2, 70, generator=torch.Generator().manual_seed(8)) < 0.5
    with torch.no_grad():
        for block in (tiny.blocks[0], tiny.blocks[1], plain):
            got = run_block_on_kept(block, x, keep, (7, 10), 0)
            want = masked_tpc(block, x, keep, (7, 10), 0)
            assert (got - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# ToMe: merge, compute, unmerge inside each window


def tiny_tome(keep_ratio=0.5, seed: int = 0, **kwargs) -> ViT:
    return randomise(ViT(**TINY, reducer=ToMeReducer(DIM, keep_ratio=keep_ratio, **kwargs)), seed)


def test_window_groups_cover_the_grid_once():
    groups = window_groups(2, (7, 10), (WINDOW, WINDOW))
    assert [(g.content_hw, g.per_image) for g in groups] == [((4, 4), 2), ((4, 2), 1), ((3, 4), 2), ((3, 2), 1)]
    index = torch.cat([g.index.reshape(-1) for g in groups])
    assert torch.equal(index.sort().values, torch.arange(140))
    corner = groups[3]
    assert corner.positions.tolist() == [[48, 49, 58, 59, 68, 69]] and corner.coords[-1].tolist() == [2, 1]
    (whole,) = window_groups(1, (7, 10), (7, 10))
    assert whole.content_hw == (7, 10) and torch.equal(whole.index[0], torch.arange(70))


@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_tome_keep_ratio_one_is_the_dense_windowed_vit_exactly(size):
    model = tiny_tome(keep_ratio=1.0)
    images = images_of(size, seed=9)
    with torch.no_grad():
        got = model(images)
    assert torch.equal(got, dense_of(model, images))


def ref_merged_window(x, pos, assign, dest, p, window, hw, prop_attn):
    """One window of one image the slow way. x: (h*w, C) the image's tokens; pos: (n,) the window's real
    positions (row-major); assign: (n,) each one's merged token; dest: (m,) each merged token's destination slot.
    Returns the block's (n, C) outputs at pos."""
    h, w = hw
    C, d = x.shape[-1], x.shape[-1] // HEADS
    top, left = int(pos[0]) // w, int(pos[0]) % w
    rows, cols = pos // w - top, pos % w - left
    m = int(assign.max()) + 1
    members = F.one_hot(assign, m).T.double()  # (m, n)
    size = members.sum(dim=1)

    def merge(t):
        return ((members @ t.double()) / size[:, None]).to(t.dtype)

    y = F.layer_norm(x[pos], (C,), p["norm1.weight"], p["norm1.bias"], 1e-6)
    # keys: the merged tokens at their destinations, then every padding position of the window (zero tokens)
    pad = [(r, c) for r in range(window[0]) for c in range(window[1]) if top + r >= h or left + c >= w]
    key_tokens = torch.cat([merge(y), torch.zeros(len(pad), C)])
    key_rows = torch.cat([rows[dest], torch.tensor([r for r, _ in pad], dtype=torch.long)])
    key_cols = torch.cat([cols[dest], torch.tensor([c for _, c in pad], dtype=torch.long)])
    qkv = F.linear(key_tokens, p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = (qkv[:, i * C : (i + 1) * C].reshape(-1, HEADS, d).transpose(0, 1) for i in range(3))
    q = q[:, :m]
    Rh, Rw = ref_rel_table(window[0], p["attn.rel_pos_h"]), ref_rel_table(window[1], p["attn.rel_pos_w"])
    rel = torch.einsum("hqc,qkc->hqk", q, Rh[rows[dest]][:, key_rows])
    rel = rel + torch.einsum("hqc,qkc->hqk", q, Rw[cols[dest]][:, key_cols])
    logits = (q / math.sqrt(d)) @ k.transpose(1, 2) + rel
    if prop_attn:
        logits = logits + torch.cat([size.log(), torch.zeros(len(pad), dtype=torch.float64)]).float()
    a = (logits.softmax(-1) @ v).transpose(0, 1).reshape(m, C)
    z = x[pos] + F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"])[assign]
    u = merge(F.layer_norm(z, (C,), p["norm2.weight"], p["norm2.bias"], 1e-6))
    mlp = F.linear(F.gelu(F.linear(u, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return z + mlp[assign]


@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop_attn", "plain"])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.3], ids=["one_round", "two_rounds"])
@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
@pytest.mark.parametrize("hw", [(7, 10), (13, 6), (3, 2)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_a_merged_window_equals_the_reference(tiny, index, hw, keep_ratio, prop_attn):
    """Every window (a global block: the grid) merged with the same assignment, attended among its merged tokens
    at their destinations with the padding keys, unmerged, the MLP on the merged inputs: the reference, per
    image and window, within 1e-5; a batch of two images."""
    block, p = tiny.blocks[index], params(tiny, index)
    N = hw[0] * hw[1]
    x = torch.randn(2, N, DIM, generator=torch.Generator().manual_seed(10))

    def removals(n):
        return n - math.ceil(keep_ratio * n)

    with torch.no_grad():
        got, result = merge_in_windows(block, x, hw, removals, prop_attn)
    window = (WINDOW, WINDOW) if index == 0 else hw
    checked = 0
    for merge in result.merges:
        k, n = merge.group.positions.shape
        assert merge.num_out == n - removals(n)
        for b in range(2):
            for j in range(k):
                pos, row = merge.group.positions[j], b * k + j
                assign = torch.arange(n) if merge.assign is None else merge.assign[row]
                dest = merge.dest[row]
                assert torch.equal(assign[dest], torch.arange(merge.num_out))  # a destination is its own token's
                with torch.no_grad():
                    want = ref_merged_window(x[b], pos, assign, dest, p, window, hw, prop_attn)
                assert (got[b, pos] - want).abs().max().item() < 1e-5
                checked += 1
    assert checked == 2 * sum(m.group.per_image for m in result.merges)


def test_one_round_is_tomes_matching_and_destinations_are_b_tokens():
    metric = torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(11))
    assign, m, dest, macs = match_with_destinations(metric, 6)
    assert torch.equal(assign, bipartite_soft_matching(metric, 6)) and m == 10 and macs == 8 * 8 * 8
    sizes = torch.zeros(5, m).scatter_add(1, assign, torch.ones(5, 16))
    assert ((dest % 2 == 1) | (sizes == 1)).all()  # a merged group sits at its B token (odd slot)
    assign, m, dest, _ = match_with_destinations(metric, 11)  # two rounds: 16 -> 8 -> 5
    assert m == 5 and torch.equal(assign.gather(1, dest), torch.arange(5).expand(5, 5))


def test_tome_batch_equals_one_image_at_a_time_and_odd_sizes_run():
    model = tiny_tome(keep_ratio=0.4)
    images = images_of((112, 160), batch=3, seed=12)
    with torch.no_grad():
        got = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    assert (got - single).abs().max().item() < 1e-5
    assert (got - dense_of(model, images)).abs().max().item() > 1e-3  # it merged
    for size in SIZES:
        with torch.no_grad():
            out = model(images_of(size, batch=1, seed=13))
        assert out.shape == (1, DIM, size[0] // 16, size[1] // 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("reducer", ["ToMe", "TPC"])
def test_windowed_reducers_run_under_bf16_autocast(reducer):
    """Autocast runs the attention in bf16 and the norms in float: the scatter back must not mix the two."""
    model = tiny_tome(keep_ratio=0.5) if reducer == "ToMe" else tiny_tpc(tpc(inference="fixed"))
    images = images_of((112, 160), batch=2, seed=14)
    with torch.no_grad():
        full = model.eval()(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert half.shape == full.shape and torch.isfinite(half).all()
    if reducer == "ToMe":  # TPC's top-k decisions flip on bf16 near-ties, so only ToMe's values stay close
        assert (half.float() - full).abs().mean().item() < 0.05 * full.abs().mean().item()


def test_tome_one_token_image_runs_densely():
    model = tiny_tome(keep_ratio=0.3)
    model.record_tokens = True
    images = images_of((16, 16), seed=14)
    with torch.no_grad():
        got = model(images)
    assert torch.equal(got, dense_of(model, images))
    assert model.last_record.token_counts.tolist() == [[1.0, 1.0]] * 4


def test_tome_counts_maps_and_flops_by_hand():
    """7x10 grid, 4x4 windows: real tokens per window 16, 16, 8 (top row), 12, 12, 6; keep 0.5 (ceil) merges them
    to 8, 8, 4, 6, 6, 3 = 35; the global block 1 merges its 70 to 35. Blocks 2 and 3 run densely."""
    model = tiny_tome(keep_ratio=0.5, blocks=(0, 1))
    images = images_of((112, 160), seed=15)
    macs = count_backbone_macs(model, images)
    record = model.last_record
    assert record.token_counts[:, 0].tolist() == [35.0, 35.0, 70.0, 70.0]
    assert record.stats["keep_rate.block0"].item() == 0.5
    C = DIM
    n_w = torch.tensor([8.0, 8, 4, 6, 6, 3], dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    assert torch.allclose(macs.blocks[0], torch.full((2,), 35 * 12 * C * C + 2 * C * n_w.square().sum().item(), **f64))
    assert torch.allclose(macs.blocks[1], torch.full((2,), 35 * 12 * C * C + 2 * C * 35.0**2, **f64))
    dense = dense_backbone_macs(model, (112, 160), batch=2)
    assert torch.equal(macs.blocks[2:], dense.blocks[2:])
    matching = C * (2 * 8 * 8 + 4 * 4 + 2 * 6 * 6 + 3 * 3 + 35 * 35)  # ceil(n/2) * floor(n/2) * C per window
    assert torch.allclose(macs.reducer, torch.full((2,), float(matching), **f64))
    # the maps: merged positions share the id of their first position, within one window
    ids = record.token_maps[0]
    assert torch.equal(ids, token_ids(ids, 0))
    owner = torch.arange(70) // 10 // WINDOW * 3 + torch.arange(70) % 10 // WINDOW
    assert torch.equal(owner[ids], owner.expand(2, 70))
    assert (ids == torch.arange(70)).sum(dim=1).tolist() == [35, 35]


def test_tome_on_windows_without_relative_positions():
    """Windows alone: the global blocks need no grid but merge inside themselves too, so the token set never
    shrinks before a windowed block."""
    model = randomise(ViT(**{**TINY, "use_rel_pos": False}, reducer=ToMeReducer(DIM, keep_ratio=0.5)))
    model.record_tokens = True
    images = images_of((112, 160), batch=2, seed=18)
    with torch.no_grad():
        got = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(2)])
    assert model.last_record.token_counts[:, 0].tolist() == [35.0] * 4
    assert (got - single).abs().max().item() < 1e-5 and torch.isfinite(got).all()


def test_tome_trains_on_the_windowed_backbone():
    model = tiny_tome(keep_ratio=0.5).train()
    out = model(images_of((112, 160), seed=16))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tome_modes_follow_the_backbone():
    reducer = ToMeReducer(DIM, keep_ratio=0.5)
    ViT(**TINY, reducer=reducer)
    assert reducer.on_grid and reducer.keep_schedule(4) == (0.5,) * 4
    ViT(img_size=64, embed_dim=DIM, depth=4, num_heads=HEADS, reducer=reducer)  # global: shrinks as ToMe
    assert not reducer.on_grid and reducer.keep_schedule(4) == (0.5, 0.25, 0.125, 0.0625)
    with pytest.raises(ValueError, match="ToMe with r=4 cannot run on a windowed .* give keep_ratio"):
        ViT(**TINY, reducer=ToMeReducer(DIM, r=4))
    rel_pos_only = {**TINY, "window_size": 0, "global_block_indexes": None}
    model = randomise(ViT(**rel_pos_only, reducer=ToMeReducer(DIM, keep_ratio=1.0)))
    images = images_of((112, 160), seed=17)
    with torch.no_grad():
        assert torch.equal(model(images), dense_of(model, images))


# ---------------------------------------------------------------------------------------------------------
# The reducers that cannot run in windows


REASONS = {
    "EViT": "fuses them into one extra token that has no place on the grid",
    "DynamicViT": "drops the pruned tokens from the token set for good",
    "PPT": "prunes or pools tokens out of the token set",
    "BAT": "clusters the inattentive tokens of the whole image",
}


def test_the_windowed_reducers_are_admitted():
    admitted = {name for name, cls in REDUCERS.items() if cls.runs_on_grid}
    assert admitted == {"SViT", "TPC", "ToMe"} and set(REASONS) == set(REDUCERS) - admitted


@pytest.mark.parametrize("name", sorted(REASONS))
def test_the_others_are_refused_with_why_and_what_to_use(name):
    reducer = build_reducer({"type": name}, DIM)  # its default blocks: the backbone refuses it before its checks
    with pytest.raises(ValueError, match=f"{name}Reducer cannot drive a backbone with window attention") as err:
        ViT(**TINY, reducer=reducer)
    message = str(err.value)
    assert REASONS[name] in message
    if name != "DynamicViT":
        assert "ViTDet has no class token" in message
    assert "Use SViT or TPC" in message and "ToMe (merges inside each window" in message
    assert "window_size=0, use_rel_pos=False" in message
    rel_pos_only = {**TINY, "window_size": 0, "global_block_indexes": None}
    with pytest.raises(ValueError, match=f"relative position embeddings .*{REASONS[name]}.* Use SViT or TPC"):
        ViT(**rel_pos_only, reducer=reducer)
