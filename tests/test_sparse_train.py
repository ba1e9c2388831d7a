"""Sparse training of gated blocks (tokenprune.models.reducers.sparse_train): the same forward values and the
same gradients as masked training, in float64; the probe's unbiased gate gradient; refused arguments."""

import math

import pytest
import torch

from tokenprune.models import ViT
from tokenprune.models.reducers import SViTReducer, TPCReducer
from tokenprune.models.reducers.sparse_train import (
    check_sparse_block,
    check_train_compute,
    probe_counts,
    run_gated_sparse,
    sparse_block_outputs,
)
from tokenprune.models.vit import Block

DIM, HEADS = 24, 3
IMG = (64, 96)  # a 4 x 6 token grid
TOL = 1e-10


def aux_losses(model: ViT) -> dict:
    return model.last_record.aux_losses


def make_block(drop_path: float = 0.0, init_values: float | None = 0.5, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block(DIM, HEADS, init_values=init_values, drop_path=drop_path).double().train()


def decisions(batch: int, n: int, seed: int, keep_rate: float = 0.5) -> torch.Tensor:
    """(B, n) {0, 1} keep decisions, different counts per image, at least one kept token each, as a leaf."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.2, 0.9, batch)[:, None] if batch > 1 else torch.tensor([[keep_rate]])
    d = (torch.rand(batch, n, generator=g) < rates).double()
    d[:, 0] = 1.0
    return d.requires_grad_(True)


def masked_gated(block: Block, x: torch.Tensor, d: torch.Tensor, num_prefix: int, rest=None) -> torch.Tensor:
    """Today's masked training of a gated block: every token through the block, pruned ones masked as keys."""
    B, P = x.shape[0], num_prefix
    keep = torch.cat([torch.ones(B, P, dtype=torch.bool), d.detach() > 0.5], dim=1)
    y = block(x, keep[:, None, None, :])
    d_full = torch.cat([d.new_ones(B, P), d], dim=1).unsqueeze(-1)
    rest = x if rest is None else rest
    return d_full * y + (1.0 - d_full) * rest


def forward_backward(fn, leaves, block, seed: int = 0):
    """Output and the gradients of a fixed random linear loss w.r.t. the leaves and the block's parameters."""
    for t in [*leaves, *block.parameters()]:
        t.grad = None
    torch.manual_seed(seed)  # the same stochastic-depth draws in both paths
    out = fn()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [t.grad.clone() for t in leaves], [p.grad.clone() for p in block.parameters()]


def assert_close(a, b, tol: float = TOL) -> None:
    if isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_close(u, v, tol)
        return
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


@pytest.mark.parametrize("num_prefix", [0, 1])
@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_block_matches_masked_training(num_prefix, batch, drop_path):
    block = make_block(drop_path)
    n, gate_grads = 20, []
    for seed in range(3):
        x = torch.randn(batch, num_prefix + n, DIM, dtype=torch.float64, requires_grad=True)
        d = decisions(batch, n, seed)
        masked = forward_backward(lambda x=x, d=d: masked_gated(block, x, d, num_prefix), [x, d], block, seed)
        sparse = forward_backward(lambda x=x, d=d: run_gated_sparse(block, x, d, num_prefix), [x, d], block, seed)
        for a, b in zip(masked, sparse):
            assert_close(a, b)
        gate_grads.append(masked[1][1].abs().sum())
    assert max(gate_grads) > 0  # the gate got a gradient (stochastic depth may drop a whole image's block)


def test_rest_value_matches_masked_training():
    # TPC's form: a pruned token holds rest (its stabilised value, with gradients), not x
    block = make_block()
    x = torch.randn(3, 1 + 20, DIM, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(DIM, dtype=torch.float64, requires_grad=True)
    d = decisions(3, 20, seed=1)

    def rest():
        return x + torch.tanh(x) * shift

    masked = forward_backward(lambda: masked_gated(block, x, d, 1, rest()), [x, d, shift], block)
    sparse = forward_backward(lambda: run_gated_sparse(block, x, d, 1, rest=rest()), [x, d, shift], block)
    for a, b in zip(masked, sparse):
        assert_close(a, b)


def test_all_kept_and_single_kept():
    block = make_block()
    x = torch.randn(2, 12, DIM, dtype=torch.float64, requires_grad=True)
    for d in (torch.ones(2, 12, dtype=torch.float64), torch.eye(12, dtype=torch.float64)[:2]):
        d.requires_grad_(True)
        masked = forward_backward(lambda d=d: masked_gated(block, x, d, 0), [x, d], block)
        sparse = forward_backward(lambda d=d: run_gated_sparse(block, x, d, 0), [x, d], block)
        for a, b in zip(masked, sparse):
            assert_close(a, b)


def test_pruned_tokens_get_no_gradient_through_the_block():
    # the observation the sparse path rests on: in masked training a pruned token's input gets its gradient
    # from (1 - d) * x and the gate only, never from the block
    block = make_block()
    x = torch.randn(2, 16, DIM, dtype=torch.float64, requires_grad=True)
    d = decisions(2, 16, seed=3)
    y = block(x, (d.detach() > 0.5)[:, None, None, :])
    weights = torch.randn(y.shape, dtype=torch.float64)
    (d.unsqueeze(-1) * y * weights).sum().backward()
    pruned = d.detach() < 0.5
    assert pruned.any()
    assert x.grad[pruned].abs().max().item() == 0.0


def probe_run(block, x, d, probe, seed):
    g = torch.Generator().manual_seed(seed)
    return forward_backward(lambda: run_gated_sparse(block, x, d, 1, probe=probe, generator=g), [x, d], block)


@pytest.mark.parametrize("probe", [0.25, 0.5])
def test_probe_scales_the_probed_gate_gradients(probe):
    block = make_block()
    batch, n = 4, 20
    x = torch.randn(batch, 1 + n, DIM, dtype=torch.float64, requires_grad=True)
    d = decisions(batch, n, seed=2)
    out, (gx, gd), gp = forward_backward(lambda: masked_gated(block, x, d, 1), [x, d], block)
    p_out, (p_gx, p_gd), p_gp = probe_run(block, x, d, probe, seed=5)
    # forward, block parameters and inputs: exact
    assert_close(out, p_out)
    assert_close(gx, p_gx)
    assert_close(gp, p_gp)
    # the gate: the kept tokens' terms exact; ceil(probe * P_b) pruned ones scaled by 1 / pi_b, the others 0
    kept = d.detach() > 0.5
    assert_close(gd[kept], p_gd[kept])
    for b in range(batch):
        pruned = ~kept[b]
        P = int(pruned.sum())
        m = math.ceil(probe * P - 1e-9)
        probed = pruned & (p_gd[b] != 0)
        assert int(probed.sum()) == m
        assert_close(p_gd[b][probed], gd[b][probed] * P / m)


def test_probe_gate_gradient_is_unbiased():
    block = make_block()
    batch, n = 2, 16
    x = torch.randn(batch, 1 + n, DIM, dtype=torch.float64, requires_grad=True)
    d = decisions(batch, n, seed=4)
    _, (_, gd), _ = forward_backward(lambda: masked_gated(block, x, d, 1), [x, d], block)
    draws = 600
    mean = sum(probe_run(block, x, d, 0.3, seed=s)[1][1] for s in range(draws)) / draws
    pruned = d.detach() < 0.5
    # per pruned token: the estimate is gd / pi with probability pi, else 0; its mean over draws has standard
    # error |gd| sqrt((1 - pi) / (pi * draws)), under 0.06 |gd| here: 5 standard errors of slack
    counts = pruned.sum(1, keepdim=True).expand_as(pruned)
    pi = torch.ceil(0.3 * counts - 1e-9) / counts
    se = gd.abs() * torch.sqrt((1 - pi) / (pi * draws))
    assert ((mean - gd).abs()[pruned] <= 5 * se[pruned] + 1e-12).all()
    # and the probe did vary: not every draw probed the same tokens
    assert not torch.equal(probe_run(block, x, d, 0.3, seed=0)[1][1], probe_run(block, x, d, 0.3, seed=1)[1][1])


def test_probe_counts():
    pruned = torch.tensor([0, 1, 10, 7])
    assert probe_counts(pruned, 1.0).tolist() == [0, 1, 10, 7]
    assert probe_counts(pruned, 0.7).tolist() == [0, 1, 7, 5]
    assert probe_counts(pruned, 0.1).tolist() == [0, 1, 1, 1]


# the whole backbone: SViT trained masked vs sparse


def make_vit(cls_token: bool, seed: int = 0, **reducer_kwargs) -> ViT:
    torch.manual_seed(seed)
    reducer = SViTReducer(DIM, **reducer_kwargs)  # default gated blocks 3-11 and keep targets
    model = ViT(img_size=64, embed_dim=DIM, depth=12, num_heads=HEADS, cls_token=cls_token, reducer=reducer)
    return model.double().train()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 2 + 0.2
    return (torch.randn(batch, 3, *IMG, generator=g) * scale).double()


def model_step(model: ViT, x: torch.Tensor, seed: int, weights: torch.Tensor | None = None, ratio_loss: bool = True):
    """Output, ratio loss and every parameter's gradient of one training forward (Gumbel noise from ``seed``)
    under the loss ``sum(out * weights)`` (default weights: random) plus, with ``ratio_loss``, the ratio loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    loss = aux_losses(model)["loss_svit_ratio"]
    if weights is None:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=out.dtype)
    ((out * weights).sum() + (loss if ratio_loss else 0.0)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads


@pytest.mark.parametrize(
    "settings",
    [
        {"cls_token": True},
        {"cls_token": False},
        {"cls_token": False, "reactivation": False},
        {"cls_token": False, "reactivation": False, "keep_pruned": False},
        {"cls_token": True, "gate": "local_global"},
    ],
)
def test_svit_sparse_training_matches_masked(settings):
    settings = dict(settings)
    cls_token = settings.pop("cls_token")
    masked = make_vit(cls_token, **settings)
    sparse = make_vit(cls_token, train_compute="sparse", **settings)
    sparse.load_state_dict(masked.state_dict())
    x = images(3)
    for seed in range(2):
        out_m, loss_m, grads_m = model_step(masked, x, seed)
        out_s, loss_s, grads_s = model_step(sparse, x, seed)
        assert_close(out_m, out_s)
        assert_close(loss_m, loss_s)
        assert grads_m.keys() == grads_s.keys()
        assert any(k.startswith("reducer.gates") for k in grads_m)
        for k in grads_m:
            assert_close(grads_m[k], grads_s[k])
    keep = torch.stack([v for k, v in sparse.last_record.stats.items() if k.startswith("keep_rate_per_image")])
    assert ((keep > 0) & (keep < 1)).all() and (keep != keep[:, :1]).any()  # pruned, counts differ per image


def noise_free(model: ViT) -> None:
    """Training decisions by argmax (straight-through) instead of Gumbel samples: the same per image, and
    independent of the random numbers the probe draws."""

    def sample_keep(log_p):
        hard = (log_p[..., 0] >= log_p[..., 1]).double()
        soft = log_p[..., 0].exp()
        return hard - soft.detach() + soft

    model.reducer.sample_keep = sample_keep
    with torch.no_grad():  # gates that keep about half of the tokens, a different half per image
        for gate in model.reducer.gates:
            gate.fc2.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(3))


def test_svit_sparse_batch_equals_one_at_a_time():
    model = make_vit(False, train_compute="sparse")
    noise_free(model)
    x = images(3)
    w = torch.randn(3, DIM, 4, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    batched = model_step(model, x, 0, w, ratio_loss=False)
    singles = [model_step(model, x[i : i + 1], 0, w[i : i + 1], ratio_loss=False) for i in range(3)]
    assert_close(batched[0], torch.cat([s[0] for s in singles]))
    # the gradients of a loss summed over images (not the ratio loss, a batch mean) add up over images (to 1e-6
    # relative: the decisions' straight-through path has float32 steps, in masked training as well)
    assert batched[2].keys() == singles[0][2].keys()
    for k, v in batched[2].items():
        assert_close(v, sum(s[2][k] for s in singles), 1e-6 * v.abs().max().item())


def test_svit_probe_keeps_forward_and_exact_gradients_after_the_last_gate():
    masked = make_vit(False)
    probed = make_vit(False, train_compute="sparse", probe=0.5)
    probed.load_state_dict(masked.state_dict())
    noise_free(masked)
    noise_free(probed)
    x = images(2)
    out_m, loss_m, grads_m = model_step(masked, x, 0)
    out_p, loss_p, grads_p = model_step(probed, x, 0)
    assert_close(out_m, out_p)
    assert_close(loss_m, loss_p)
    # what no gate's gradient reaches (the last gated block's parameters, the final norm) is exact; every
    # gate gets a gradient (through earlier blocks the estimated gate gradients mix in)
    exact = [k for k in grads_m if k.startswith(("blocks.11.", "norm."))]
    assert exact
    for k in exact:
        assert_close(grads_m[k], grads_p[k])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probed.reducer.gates.parameters())


@pytest.mark.parametrize("stabilizer", [True, False])
def test_tpc_sparse_training_matches_masked(stabilizer):
    def make(**kwargs):
        torch.manual_seed(0)
        reducer = TPCReducer(DIM, stabilizer=stabilizer, **kwargs)
        model = ViT(img_size=64, embed_dim=DIM, depth=12, num_heads=HEADS, cls_token=True, reducer=reducer)
        return model.double().train()

    masked, sparse = make(), make(train_compute="sparse")
    if stabilizer:  # zero-initialised: make the paused tokens' values differ from x
        with torch.no_grad():
            for p in masked.reducer.stabilizers.parameters():
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(5))
    sparse.load_state_dict(masked.state_dict())
    x = images(3)
    for seed in range(2):
        results = []
        for model in (masked, sparse):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = model(x)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=out.dtype)
            ((out * weights).sum() + sum(aux_losses(model).values())).backward()
            results.append(
                (out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
            )
        (out_m, grads_m), (out_s, grads_s) = results
        assert_close(out_m, out_s)
        assert grads_m.keys() == grads_s.keys() and any(k.startswith("reducer.controllers") for k in grads_m)
        for k in grads_m:
            assert_close(grads_m[k], grads_s[k])


def test_eval_is_unaffected():
    masked = make_vit(True).eval()
    sparse = make_vit(True, train_compute="sparse", probe=0.5).eval()
    sparse.load_state_dict(masked.state_dict())
    with torch.no_grad():
        assert torch.equal(masked(images(2)), sparse(images(2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_compute": "gathered"}, "train_compute must be one of"),
        ({"train_compute": "sparse", "probe": 0.0}, "probe must be a number in"),
        ({"train_compute": "sparse", "probe": 1.5}, "probe must be a number in"),
        ({"train_compute": "sparse", "probe": True}, "probe must be a number in"),
        ({"train_compute": "masked", "probe": 0.5}, "set train_compute='sparse'"),
    ],
)
def test_bad_arguments_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_train_compute(kwargs.get("train_compute", "masked"), kwargs.get("probe", 1.0))
    with pytest.raises(ValueError, match=message):
        SViTReducer(DIM, **kwargs)
    with pytest.raises(ValueError, match=message):
        TPCReducer(DIM, **kwargs)


def test_unsupported_blocks_and_inputs_refused():
    with pytest.raises(ValueError, match="global attention"):
        check_sparse_block(Block(DIM, HEADS, window_size=2))
    with pytest.raises(ValueError, match="lacks"):
        check_sparse_block(torch.nn.Linear(DIM, DIM))
    block = make_block()
    x = torch.randn(2, 8, DIM, dtype=torch.float64)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(ValueError, match="needs a kept token"):
        sparse_block_outputs(block, x, keep)
    with pytest.raises(ValueError, match="bool mask"):
        sparse_block_outputs(block, x, keep.float())
    with pytest.raises(ValueError, match="probe must be in"):
        sparse_block_outputs(block, x, torch.ones(2, 8, dtype=torch.bool), probe=0.0)


# the training-speed tool's pieces


def test_training_macs_count():
    from tokenprune.mmdet_plugin.train_speed import backbone_train_macs, parse_model_spec, query_macs
    from tokenprune.models.flops import block_macs, patch_embed_macs

    dense = make_vit(False).float()
    dense.set_reducer(None)
    sparse = make_vit(False, train_compute="sparse", probe=0.5).float()
    hw, n = IMG, 24  # a 4 x 6 grid
    embed = 2.0 * patch_embed_macs(dense, hw)
    per_block = [block_macs(float(n), b).item() for b in dense.blocks]
    assert backbone_train_macs(dense, hw, {}, 2)["macs"] == pytest.approx(embed + 3 * sum(per_block))
    # block 3 keeps 12 and 6 of 24 tokens, the others all: probe 0.5 runs ceil(12 / 2) = 6 and 9 pruned queries
    got = backbone_train_macs(sparse, hw, {3: torch.tensor([0.5, 0.25])}, 2)
    gates = 3.0 * n * sparse.reducer.gates[0].macs_per_token()
    block3 = sparse.blocks[3]
    run = [
        3 * block_macs(float(k), block3) + query_macs(torch.tensor(float(q)), float(k), block3)
        for k, q in ((12, 6), (6, 9))
    ]
    want = embed + 3 * sum(per_block) - 3 * per_block[3] + gates + (run[0] + run[1]).item() / 2
    assert got["macs"] == pytest.approx(want)
    # padded: both images run 12 tokens with autograd, then positions 12 to max(12 + 6, 6 + 9) = 18 without
    padded = 3 * block_macs(12.0, block3) + query_macs(torch.tensor(6.0), 12.0, block3)
    assert got["macs_padded"] == pytest.approx(embed + 3 * sum(per_block) - 3 * per_block[3] + gates + padded.item())
    spec = parse_model_spec('sp=configs/svit/x.py:{"model.backbone.reducer.train_compute": "sparse"}')
    assert (spec.label, spec.config, spec.options) == (
        "sp",
        "configs/svit/x.py",
        {"model.backbone.reducer.train_compute": "sparse"},
    )
    assert parse_model_spec("configs/dense/y.py").label == "y"
