"""ViTDet's windowed ViT: the dense model against a reference written here from ViTDet's equations (detectron2's
``modeling/backbone/vit.py`` and ``utils.py``: zero-padded windows, decomposed relative positions with linear
interpolation of the tables, absolute positions resized bicubically), the default model unchanged, and the
MAE / detectron2 (.pkl) / MMDetection weight layouts."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenprune.errors import WeightsMismatchError
from tokenprune.models import UnsafeWeightsError, ViT, load_vitdet_vit, read_arrays_pickle, vitdet_base
from tokenprune.models.reducers.base import TokenReducer
from tokenprune.models.vit import Block

DIM, HEADS, DEPTH, WINDOW = 48, 3, 4, 4
GLOBAL = (1, 3)
TINY = dict(
    img_size=64,  # position embeddings stored at a 4x4 grid, resized to every input's grid
    embed_dim=DIM,
    depth=DEPTH,
    num_heads=HEADS,
    cls_token=False,
    final_norm=False,
    window_size=WINDOW,
    global_block_indexes=GLOBAL,
    use_rel_pos=True,
    rel_pos_input_size=6,  # global tables of 11 rows: interpolated for every grid but 6 x 6
)


# ---------------------------------------------------------------------------------------------------------
# The reference: one window at a time, relative positions from index tables, explicit softmax


def ref_rel_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """(size, size, d): entry [i, j] is the embedding of offset i - j, from a table interpolated linearly to
    2 * size - 1 rows when its length differs."""
    if table.shape[0] != 2 * size - 1:
        table = F.interpolate(table.T[None], size=2 * size - 1, mode="linear", align_corners=False)[0].T
    index = torch.tensor([[i - j + size - 1 for j in range(size)] for i in range(size)])
    return table[index]


def ref_attention(x: torch.Tensor, p: dict, use_rel_pos: bool) -> torch.Tensor:
    """Self-attention of one image's (or window's) token grid x (h, w, C)."""
    h, w, C = x.shape
    d = C // HEADS
    qkv = F.linear(x.reshape(h * w, C), p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = (qkv[:, i * C : (i + 1) * C].reshape(h * w, HEADS, d).transpose(0, 1) for i in range(3))
    logits = (q / math.sqrt(d)) @ k.transpose(1, 2)  # (heads, N, N)
    if use_rel_pos:
        Rh = ref_rel_table(h, p["attn.rel_pos_h"])  # (h, h, d)
        Rw = ref_rel_table(w, p["attn.rel_pos_w"])
        qg = q.reshape(HEADS, h, w, d)
        bias_h = torch.einsum("nyxc,ykc->nyxk", qg, Rh)  # query (y, x) with key row k
        bias_w = torch.einsum("nyxc,xkc->nyxk", qg, Rw)  # query (y, x) with key column k
        bias = bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]  # (heads, y, x, key row, key column)
        logits = logits + bias.reshape(HEADS, h * w, h * w)
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(h * w, C)
    return F.linear(out, p["attn.proj.weight"], p["attn.proj.bias"]).reshape(h, w, C)


def ref_block(x: torch.Tensor, p: dict, window: int, use_rel_pos: bool) -> torch.Tensor:
    """One block on one image's grid x (h, w, C)."""
    h, w, C = x.shape
    y = F.layer_norm(x, (C,), p["norm1.weight"], p["norm1.bias"], 1e-6)
    if window:
        hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
        padded = torch.zeros(hp, wp, C)
        padded[:h, :w] = y  # zero tokens right and bottom: they are keys (and queries) of their windows
        out = torch.empty(hp, wp, C)
        for top in range(0, hp, window):
            for left in range(0, wp, window):
                win = padded[top : top + window, left : left + window]
                out[top : top + window, left : left + window] = ref_attention(win, p, use_rel_pos)
        y = out[:h, :w]
    else:
        y = ref_attention(y, p, use_rel_pos)
    x = x + y
    y = F.layer_norm(x, (C,), p["norm2.weight"], p["norm2.bias"], 1e-6)
    return x + F.linear(
        F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
    )


def ref_vit(sd: dict, image: torch.Tensor, pos_side: int, windowed: set, use_rel_pos: bool) -> torch.Tensor:
    """One image (3, H, W), H and W multiples of 16 -> (C, H/16, W/16)."""
    x = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)[0]
    C, h, w = x.shape
    pos = sd["pos_embed"][0].T.reshape(1, C, pos_side, pos_side)
    if (h, w) != (pos_side, pos_side):
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    x = (x + pos[0]).permute(1, 2, 0)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        x = ref_block(x, p, WINDOW if i in windowed else 0, use_rel_pos)
    return x.permute(2, 0, 1)


def randomise(model: ViT, seed: int = 0) -> ViT:
    """Random non-trivial values for every tensor, the relative-position tables and norms included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "rel_pos" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> ViT:
    return randomise(ViT(**TINY))


# grids: 7x10 (neither a multiple of the window), 13x6, one window exactly (4x4), one padded window (3x2),
# one token (1x1), the rel-pos tables' own grid (6x6)
SIZES = [(112, 160), (208, 96), (64, 64), (48, 32), (16, 16), (96, 96)]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0] // 16}x{hw[1] // 16}")
def test_windowed_vit_equals_reference(tiny, hw):
    images = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    sd = tiny.state_dict()
    with torch.no_grad():
        got = tiny(images)
        want = torch.stack([ref_vit(sd, im, 4, set(tiny.window_block_indexes), True) for im in images])
    assert tiny.window_block_indexes == (0, 2)
    assert got.shape == want.shape == (2, DIM, hw[0] // 16, hw[1] // 16)
    assert (got - want).abs().max().item() < 1e-5


def test_windows_without_relative_positions_equal_reference():
    model = randomise(ViT(**{**TINY, "use_rel_pos": False}), seed=3)
    images = torch.randn(1, 3, 112, 160)
    with torch.no_grad():
        got = model(images)
        want = ref_vit(model.state_dict(), images[0], 4, {0, 2}, False)[None]
    assert not any("rel_pos" in k for k in model.state_dict())
    assert (got - want).abs().max().item() < 1e-5


def test_batch_equals_one_at_a_time(tiny):
    images = torch.randn(3, 3, 112, 160)
    with torch.no_grad():
        batched = tiny(images)
        single = torch.cat([tiny(images[i : i + 1]) for i in range(3)])
    assert (batched - single).abs().max().item() < 1e-6


def test_padding_stays_inside_windowed_blocks(tiny):
    """Global blocks and MLPs see exactly the h*w tokens; windowed attention sees whole padded windows."""
    seen = {}

    def record(index):
        def hook(module, args):
            seen[index] = tuple(args[0].shape)

        return hook

    hooks = [blk.attn.register_forward_pre_hook(record(i)) for i, blk in enumerate(tiny.blocks)]
    with torch.no_grad():
        tiny(torch.randn(2, 3, 112, 160))  # 7 x 10 grid -> 8 x 12 padded: 2 x 3 windows of 4 x 4 per image
    for h in hooks:
        h.remove()
    assert seen[0] == seen[2] == (2 * 6, 16, DIM)
    assert seen[1] == seen[3] == (2, 70, DIM)


def test_attention_runs_on_sdpa_with_the_bias_as_float_mask(tiny, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), None if attn_mask is None else attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        tiny(torch.randn(1, 3, 64, 64))
    assert len(calls) == DEPTH and all(dtype == torch.float32 for _, dtype in calls)


def test_relative_positions_learn():
    model = ViT(**TINY).train()
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "rel_pos" in n)  # zero init
    model(torch.randn(2, 3, 112, 160)).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "rel_pos" in n}
    assert len(grads) == 2 * DEPTH and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_key_mask_inside_windows_equals_masked_reference(tiny):
    """The hook for token reduction inside windows: a key mask (B, 1, 1, N) applies per window."""
    block = tiny.blocks[0]
    x = torch.randn(1, 7 * 10, DIM)
    keep = torch.rand(1, 70, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[:, ::4] = True  # every window keeps a key
    with torch.no_grad():
        got = block(x, keep[:, None, None, :], hw=(7, 10))
        free = block(x, torch.ones_like(keep)[:, None, None, :], hw=(7, 10))
        plain = block(x, None, hw=(7, 10))
        # reference: masked keys get -inf inside their window
        p = {k[len("blocks.0.") :]: v for k, v in tiny.state_dict().items() if k.startswith("blocks.0.")}
        masked = x.clone()
        y = F.layer_norm(x, (DIM,), p["norm1.weight"], p["norm1.bias"], 1e-6).reshape(7, 10, DIM)
        padded, allowed = torch.zeros(8, 12, DIM), torch.ones(8, 12, dtype=torch.bool)
        padded[:7, :10], allowed[:7, :10] = y, keep.reshape(7, 10)
        out = torch.empty(8, 12, DIM)
        d = DIM // HEADS
        for top in range(0, 8, 4):
            for left in range(0, 12, 4):
                win = padded[top : top + 4, left : left + 4]
                qkv = F.linear(win.reshape(16, DIM), p["attn.qkv.weight"], p["attn.qkv.bias"])
                q, k, v = (qkv[:, i * DIM : (i + 1) * DIM].reshape(16, HEADS, d).transpose(0, 1) for i in range(3))
                logits = (q / math.sqrt(d)) @ k.transpose(1, 2)
                Rh, Rw = ref_rel_table(4, p["attn.rel_pos_h"]), ref_rel_table(4, p["attn.rel_pos_w"])
                qg = q.reshape(HEADS, 4, 4, d)
                bias = (
                    torch.einsum("nyxc,ykc->nyxk", qg, Rh)[..., None]
                    + torch.einsum("nyxc,xkc->nyxk", qg, Rw)[..., None, :]
                )
                logits = logits + bias.reshape(HEADS, 16, 16)
                logits = logits.masked_fill(~allowed[top : top + 4, left : left + 4].reshape(1, 1, 16), -math.inf)
                a = (logits.softmax(-1) @ v).transpose(0, 1).reshape(16, DIM)
                out[top : top + 4, left : left + 4] = F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"]).reshape(
                    4, 4, DIM
                )
        masked = x + out[:7, :10].reshape(1, 70, DIM)
        y = F.layer_norm(masked, (DIM,), p["norm2.weight"], p["norm2.bias"], 1e-6)
        masked = masked + F.linear(
            F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
    assert (got - masked).abs().max().item() < 1e-5
    assert (free - plain).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="mask over keys"):
        block(x, torch.ones(1, 1, 70, 70, dtype=torch.bool), hw=(7, 10))


# ---------------------------------------------------------------------------------------------------------
# The default model is unchanged


def old_block_forward(block: Block, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """The block and attention as they were before the ViTDet options (global attention on SDPA)."""
    attn = block.attn
    B, N, C = x.shape
    y = block.norm1(x)
    q, k, v = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(B, N, C)))
    x = x + block.drop_path1(block.ls1(y))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def test_default_blocks_compute_exactly_as_before():
    torch.manual_seed(0)
    model = ViT(img_size=64, embed_dim=48, depth=2, num_heads=3, cls_token=True).eval()
    assert model.window_block_indexes == () and not model.use_rel_pos
    assert not any("rel_pos" in k for k in model.state_dict())
    x = torch.randn(2, 17, 48)
    mask = torch.rand(2, 1, 1, 17) > 0.2
    mask[..., 0] = True
    with torch.no_grad():
        for blk in model.blocks:
            assert torch.equal(blk(x), old_block_forward(blk, x))
            assert torch.equal(blk(x, mask), old_block_forward(blk, x, mask))
            assert torch.equal(blk(x, mask, (4, 4)), old_block_forward(blk, x, mask))


def test_default_model_output_unchanged():
    """Values computed with the ViT of before the ViTDet options, same seed and input."""
    torch.manual_seed(0)
    model = ViT(img_size=64, embed_dim=48, depth=2, num_heads=3, cls_token=True, final_norm=False).eval()
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 48, 3, 4)
    assert out.double().sum().item() == pytest.approx(0.9993911385536194, abs=1e-4)
    assert out.double().abs().sum().item() == pytest.approx(447.84583506546915, rel=1e-6)
    want0 = [-0.48095911741256714, -0.28916189074516296, 0.5722342729568481, 0.01499941200017929]
    want1 = [0.32708150148391724, 0.028634199872612953, 0.10240013897418976]
    assert out[0, :4, 0, 0].tolist() == pytest.approx(want0, abs=1e-6)
    assert out[1, -3:, -1, -1].tolist() == pytest.approx(want1, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Options


def test_vitdet_base_is_vitdets_vit_b():
    model = vitdet_base()
    assert (model.embed_dim, model.depth, model.num_heads, model.window_size) == (768, 12, 12, 14)
    assert model.window_block_indexes == (0, 1, 3, 4, 6, 7, 9, 10)
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 196, 768) and "cls_token" not in sd and "norm.weight" not in sd
    assert sd["blocks.0.attn.rel_pos_h"].shape == (27, 64) and sd["blocks.2.attn.rel_pos_w"].shape == (127, 64)
    assert model.blocks[0].norm1.eps == 1e-6
    assert max(b.drop_path1.drop_prob for b in model.blocks if hasattr(b.drop_path1, "drop_prob")) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window_size=4, window_block_indexes=[0], global_block_indexes=[1]), "not both"),
        (dict(window_size=4), "needs the windowed blocks"),
        (dict(global_block_indexes=[1]), "window_size=0"),
        (dict(window_size=4, global_block_indexes=[4]), "within 0..3"),
        (dict(window_size=4, global_block_indexes=[1], cls_token=True), "cls_token=False"),
        (dict(use_rel_pos=True, cls_token=True), "cls_token=False"),
    ],
)
def test_invalid_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViT(**{**dict(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS), **kwargs})


class KeepAll(TokenReducer):
    embed_dim = DIM
    blocks = None

    def begin(self, x, hw, num_prefix):
        return x, None

    def run_block(self, index, block, x, state):
        return block(x)

    def finish(self, x, state):
        return x

    def token_counts(self, state, depth):
        return torch.zeros(depth, 1)

    def keep_schedule(self, depth=None, num_patches=None):
        return ()


def test_reducers_are_refused_on_windowed_and_rel_pos_backbones():
    """Only a reducer that keeps every token at its grid place (``runs_on_grid``: SViT) drives windowed or
    relative-position blocks (tests/test_vitdet_svit.py); the others are refused with the reason."""
    with pytest.raises(ValueError, match="KeepAll cannot drive a backbone with window attention .* window grid"):
        ViT(**TINY, reducer=KeepAll())
    with pytest.raises(ValueError, match="KeepAll cannot drive a backbone with relative position embeddings"):
        ViT(**{**TINY, "window_size": 0, "global_block_indexes": None}, reducer=KeepAll())
    ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, reducer=KeepAll())  # global: fine


def test_a_windowed_block_needs_the_grid(tiny):
    with pytest.raises(ValueError, match="needs the token grid"):
        tiny.blocks[0](torch.randn(1, 16, DIM))
    with pytest.raises(ValueError, match="exactly the h\\*w patch tokens"):
        tiny.blocks[1](torch.randn(1, 17, DIM), hw=(4, 4))


def test_mmdet_registration_passes_the_options():
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS

    import tokenprune  # noqa: F401

    backbone = MODELS.build(dict(type="TokenPruneViT", **TINY, norm_eps=1e-5))
    assert backbone.window_block_indexes == (0, 2) and backbone.blocks[0].window_size == WINDOW
    assert backbone.blocks[1].window_size == 0 and backbone.blocks[1].attn.rel_pos_h.shape == (11, 16)
    assert backbone.blocks[3].norm2.eps == 1e-5
    (out,) = backbone(torch.randn(1, 3, 112, 160))
    assert out.shape == (1, DIM, 7, 10) and out.is_contiguous()
    ln = MODELS.build(dict(type="ViTDetLN2d", channels=8))
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6


# ---------------------------------------------------------------------------------------------------------
# Weights: MAE, detectron2 (.pkl), MMDetection


def with_class_row(sd: dict) -> dict:
    """ViTDet's checkpoints keep the pre-training class row in pos_embed (pretrain_use_cls_token)."""
    out = dict(sd)
    out["pos_embed"] = torch.cat([torch.randn(1, 1, DIM), sd["pos_embed"]], dim=1)
    return out


def mae_file(tmp_path, model: ViT) -> str:
    sd = {k: v for k, v in with_class_row(model.state_dict()).items() if "rel_pos" not in k}
    sd.update(
        {
            "cls_token": torch.randn(1, 1, DIM),
            "norm.weight": torch.ones(DIM),
            "norm.bias": torch.zeros(DIM),
            "head.weight": torch.randn(10, DIM),
            "head.bias": torch.zeros(10),
        }
    )
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    return str(path)


def detectron2_file(tmp_path, model: ViT, protocol: int) -> str:
    arrays = {f"backbone.net.{k}": v.numpy().copy() for k, v in with_class_row(model.state_dict()).items()}
    arrays.update(
        {
            "backbone.simfp_2.0.weight": np.zeros((DIM, DIM // 2, 2, 2), np.float32),
            "backbone.simfp_5.2.norm.weight": np.ones(8, np.float32),
            "proposal_generator.rpn_head.conv.conv0.weight": np.zeros((8, 8, 3, 3), np.float32),
            "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 16), np.float32),
        }
    )
    path = tmp_path / f"model_final_p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol)
    return str(path)


def mmdet_file(tmp_path, model: ViT) -> str:
    sd = {f"backbone.{k}": v for k, v in with_class_row(model.state_dict()).items()}
    sd.update(
        {
            "neck.lateral_convs.0.conv.weight": torch.zeros(8, DIM, 1, 1),
            "rpn_head.rpn_conv.weight": torch.zeros(8, 8, 3, 3),
            "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 16),
        }
    )
    path = tmp_path / "vitdet_mask-rcnn_vit-tiny.pth"
    torch.save({"meta": {"epoch": 100, "mmdet_version": "3.3.0"}, "state_dict": sd}, path)
    return str(path)


def test_detectron2_pkl_and_mmdet_weights_load_completely(tiny, tmp_path):
    images = torch.randn(1, 3, 112, 160)
    with torch.no_grad():
        want = tiny(images)
    for path in (detectron2_file(tmp_path, tiny, 2), detectron2_file(tmp_path, tiny, 4), mmdet_file(tmp_path, tiny)):
        model = ViT(**TINY).eval()
        report = load_vitdet_vit(model, path)
        assert report.missing == [] and report.unexpected == [] and report.resized == []
        assert report.initialised == [] and len(report.loaded) == len(tiny.state_dict())
        assert any(k.endswith("pos_embed[:, 0] (class-token row)") for k in report.dropped)
        outside = [k for k in report.dropped if "pos_embed" not in k]
        assert len(outside) == (4 if path.endswith(".pkl") else 3)  # neck and heads of the detector
        with torch.no_grad():
            assert torch.equal(model(images), want)


def test_mae_weights_load_with_relative_positions_at_zero(tiny, tmp_path):
    report = load_vitdet_vit(model := ViT(**TINY).eval(), mae_file(tmp_path, tiny))
    assert report.missing == [] and report.unexpected == []
    assert report.initialised == sorted(k for k in tiny.state_dict() if "rel_pos" in k)
    assert {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(report.dropped)
    assert "not in this kind of file, by design" in str(report)
    reference = ViT(**TINY).eval()
    reference.load_state_dict({k: torch.zeros_like(v) if "rel_pos" in k else v for k, v in tiny.state_dict().items()})
    images = torch.randn(1, 3, 112, 160)
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


def test_weights_of_another_size_are_refused(tmp_path):
    wider = ViT(**{**TINY, "embed_dim": 64, "num_heads": 4})
    with pytest.raises(WeightsMismatchError, match="different model size.*embed_dim=48"):
        load_vitdet_vit(ViT(**TINY), detectron2_file_of(tmp_path, wider))
    deeper = ViT(**{**TINY, "depth": 6})
    with pytest.raises(WeightsMismatchError, match="has 6 blocks, this backbone has depth=4"):
        load_vitdet_vit(ViT(**TINY), detectron2_file_of(tmp_path, deeper))
    more_heads = ViT(**{**TINY, "num_heads": 4})  # same width: only the tables' head width tells
    with pytest.raises(WeightsMismatchError, match="different model size"):
        load_vitdet_vit(ViT(**TINY), {f"backbone.{k}": v for k, v in more_heads.state_dict().items()})
    with pytest.raises(WeightsMismatchError, match="not an MAE, detectron2 or MMDetection ViTDet ViT"):
        load_vitdet_vit(ViT(**TINY), {"conv1.weight": torch.zeros(3)})


def detectron2_file_of(tmp_path, model: ViT) -> str:
    arrays = {f"backbone.net.{k}": v.numpy().copy() for k, v in model.state_dict().items()}
    path = tmp_path / f"other_{len(os.listdir(tmp_path))}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays}, f)
    return str(path)


def test_tables_of_another_window_are_interpolated_as_detectron2_does(tmp_path):
    """A file with 8x8-window tables (15 rows) in a 4x4-window model: resampled at load exactly as
    detectron2's get_rel_pos resamples them at run time."""
    source = randomise(ViT(**{**TINY, "window_size": 8}), seed=5)
    model = ViT(**TINY).eval()
    report = load_vitdet_vit(model, detectron2_file_of(tmp_path, source))
    assert report.resized == [f"backbone.net.blocks.{i}.attn.rel_pos_{a}: 15 -> 7 rows" for i in (0, 2) for a in "hw"]
    images = torch.randn(1, 3, 112, 160)
    with torch.no_grad():
        got = model(images)
    want = ref_vit(source.state_dict(), images[0], 4, {0, 2}, True)[None]  # 15-row tables, WINDOW = 4
    assert (got - want).abs().max().item() < 1e-5


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pkl_with_another_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.net.pos_embed": Payload(str(marker))}}, f)
    with pytest.raises(UnsafeWeightsError, match="system.*could run arbitrary code"):
        read_arrays_pickle(path)
    with pytest.raises(UnsafeWeightsError):
        load_vitdet_vit(ViT(**TINY), str(path))
    assert not marker.exists()
    with open(path, "wb") as f:  # an array of Python objects is no array of numbers
        pickle.dump({"model": {"x": np.array([None, 1], dtype=object)}}, f)
    with pytest.raises(WeightsMismatchError, match="not a numeric numpy array"):
        read_arrays_pickle(path)


def test_init_cfg_loads_a_detectron2_pkl(tiny, tmp_path):
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS

    import tokenprune  # noqa: F401

    path = detectron2_file(tmp_path, tiny, 4)
    backbone = MODELS.build(dict(type="TokenPruneViT", **TINY, init_cfg=dict(type="Pretrained", checkpoint=path)))
    backbone.init_weights()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(images)[0], tiny(images))


def test_coco_config_layer_decay_and_weight_decay(repo_root):
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    import tokenprune  # noqa: F401

    register_all_modules()
    cfg = Config.fromfile(str(repo_root / "configs/vitdet/mask-rcnn_vitdet-b_simplefpn_lsj-100e_coco.py"))
    assert cfg.optim_wrapper.type == "AmpOptimWrapper"
    cfg.model.backbone.update(embed_dim=48, num_heads=3, init_cfg=None)  # ViT-B's 12 blocks at a small width
    cfg.model.neck.in_channels = 48
    model = MODELS.build(cfg.model)
    optim_cfg = cfg.optim_wrapper.to_dict()
    optim_cfg["type"] = "OptimWrapper"  # AMP needs a GPU
    groups = build_optim_wrapper(model, optim_cfg).optimizer.param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())

    def lr_wd(name):
        g = by_param[id(params[name])]
        return g["lr"] / 1e-4, g["weight_decay"]

    assert lr_wd("backbone.pos_embed") == pytest.approx((0.7**13, 0.0))
    assert lr_wd("backbone.patch_embed.proj.weight") == pytest.approx((0.7**13, 0.1))
    assert lr_wd("backbone.blocks.0.attn.qkv.weight") == pytest.approx((0.7**12, 0.1))
    assert lr_wd("backbone.blocks.1.mlp.fc1.bias") == pytest.approx((0.7**11, 0.1))
    assert lr_wd("backbone.blocks.10.norm1.weight") == pytest.approx((0.7**2, 0.0))
    assert lr_wd("backbone.blocks.11.attn.rel_pos_h") == pytest.approx((0.7, 0.1))
    assert lr_wd("neck.lateral_convs.0.0.weight") == pytest.approx((1.0, 0.1))
    assert lr_wd("neck.lateral_convs.0.1.weight") == pytest.approx((1.0, 0.0))  # the pyramid's LayerNorm
    norms = [n for n in params if n.startswith("roi_head.bbox_head.shared_convs.0.") and "ln" in n]
    assert norms and all(lr_wd(n) == pytest.approx((1.0, 0.0)) for n in norms)  # LN heads
