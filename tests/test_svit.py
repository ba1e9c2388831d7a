"""SViT token pruning (tokenprune.models.reducers.svit) in the ViT backbone, on tiny models."""

import math

import pytest
import torch

from tokenprune.models import SViTReducer, ViT
from tokenprune.models.reducers.toolkit import keep_target_loss

DIM, DEPTH, HEADS = 48, 6, 3
GATED = (2, 3, 4, 5)
TARGETS = (0.7, 0.7, 0.49, 0.343)
IMG = (64, 96)  # a 4 x 6 token grid
N = 24


def make_model(cls_token: bool = True, seed: int = 0, **reducer_kwargs) -> ViT:
    torch.manual_seed(seed)
    kwargs = {"blocks": GATED, "keep_targets": TARGETS, **reducer_kwargs}
    reducer = SViTReducer(DIM, **kwargs)
    return ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, cls_token=cls_token, reducer=reducer)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    """Images of different content: each has its own brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(batch, 1, 1, 1, generator=g)
    return torch.randn(batch, 3, *IMG, generator=g) * scale + shift


def force_gates(model: ViT, keep: bool, blocks=GATED) -> None:
    """Gates whose decision ignores the input: keep (or prune) every token, Gumbel noise or not."""
    for b in blocks:
        fc2 = model.reducer.gates[model.reducer.gate_index[b]].fc2
        with torch.no_grad():
            fc2.weight.zero_()
            fc2.bias.copy_(torch.tensor([50.0, -50.0]) * (1 if keep else -1))


def noise_free(model: ViT) -> None:
    """Training-mode decisions by argmax (straight-through) instead of Gumbel samples."""

    def sample_keep(log_p):
        hard = (log_p[..., 0] >= log_p[..., 1]).float()
        soft = log_p[..., 0].exp()
        return hard - soft.detach() + soft

    model.reducer.sample_keep = sample_keep


def capture_states(model: ViT) -> list:
    """Record the reducer's per-forward state at each forward's finish()."""
    states, finish = [], model.reducer.finish

    def recording_finish(x, state):
        states.append(state)
        return finish(x, state)

    model.reducer.finish = recording_finish
    return states


@torch.no_grad()
def calibrate(model: ViT, steps: int = 3, batch: int = 4) -> None:
    model.train()
    for i in range(steps):
        model(images(batch, seed=100 + i))
    model.eval()


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_keep_all_matches_dense(cls_token, training):
    model = make_model(cls_token, keep_targets=(1.0,) * 4)
    dense = ViT(img_size=64, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, cls_token=cls_token)
    result = dense.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and all(k.startswith("reducer.") for k in result.unexpected_keys)
    if training:
        force_gates(model, keep=True)  # keep target 1.0 does not stop Gumbel sampling from pruning
    model.train(training)
    dense.train(training)
    x = images(2)
    with torch.no_grad():
        got, want = model(x), dense(x)
    assert (got - want).abs().max().item() < 1e-5
    assert all(v.item() == 1.0 for k, v in model.last_record.stats.items() if k.startswith("keep_rate."))


@torch.no_grad()
def assert_batch_equals_singles(model: ViT, x: torch.Tensor) -> None:
    """The batch's output equals running its images one at a time (the batch runs first)."""
    batched = model(x)
    singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert (batched - singles).abs().max().item() < 1e-5


@pytest.mark.parametrize("gate", ["mlp", "local_global"])
@pytest.mark.parametrize("inference", ["threshold", "fixed"])
def test_batch_equals_one_at_a_time_eval(inference, gate):
    model = make_model(inference=inference, gate=gate)
    calibrate(model)
    states = capture_states(model)
    assert_batch_equals_singles(model, images(3))
    counts = torch.stack([m.sum(1) for m in states[0].masks.values()])  # (blocks, images)
    assert (counts < N).any(1).all()  # every gated block gathered
    if inference == "threshold":  # images kept different numbers of tokens: padding was exercised
        assert (counts != counts[:, :1]).any()


def test_batch_equals_one_at_a_time_train():
    model = make_model()
    noise_free(model)
    model.train()
    states = capture_states(model)
    assert_batch_equals_singles(model, images(3))
    kept = torch.stack([m.float().mean() for m in states[0].masks.values()])
    assert ((kept > 0) & (kept < 1)).any()  # the gates pruned some tokens, not all


@pytest.mark.parametrize(
    "settings",
    [
        {"reactivation": True},
        {"reactivation": False},
        {"reactivation": True, "gate": "local_global"},
        {"reactivation": False, "keep_pruned": False},
    ],
)
def test_train_masking_matches_eval_gathering(settings):
    # same decisions (p_keep >= 0.5) both ways: masking pruned keys == running the block on the kept tokens
    model = make_model(**settings)
    noise_free(model)
    with torch.no_grad():
        model.reducer.thresholds.fill_(0.5)
        model.reducer.calibration_steps.fill_(1)
    states = capture_states(model)
    x = images(3)
    with torch.no_grad():
        inferred = model.eval()(x)
        trained = model.train()(x)  # (moves the thresholds, so second)
    for block in GATED:
        assert torch.equal(states[0].masks[block], states[1].masks[block])
    assert not all(m.all() for m in states[0].masks.values())
    assert (trained - inferred).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "settings",
    [
        {"reactivation": True},
        {"reactivation": False},
        {"gate": "local_global"},
        {"keep_pruned": False, "reactivation": False},
    ],
)
def test_gradients_reach_every_gate(settings):
    model = make_model(**settings).train()
    out = model(images(2))
    # through the straight-through decision alone, then together with the ratio loss
    out.sum().backward(retain_graph=True)
    for gate in model.reducer.gates:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    model.zero_grad()
    (out.sum() + model.last_record.aux_losses["loss_svit_ratio"]).backward()
    for gate in model.reducer.gates:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


def test_ratio_loss_zero_at_target_and_grows_away():
    targets = torch.tensor([0.7, 0.49])
    losses = [keep_target_loss(targets[:, None] + d, targets).item() for d in (0.0, 0.1, -0.2, 0.3)]
    assert losses[0] == 0.0 and 0 < losses[1] < losses[2] < losses[3]
    # per image: images above and below the target cancel in the batch mean only
    spread = targets[:, None] + torch.tensor([[-0.1, 0.1]])
    assert keep_target_loss(spread, targets, "batch").item() < 1e-12
    assert keep_target_loss(spread, targets, "image").item() == pytest.approx(0.01)


@pytest.mark.parametrize("targets, want", [((1.0,) * 4, 0.0), ((0.5,) * 4, 4.0 * 0.25)])
def test_ratio_loss_in_the_model(targets, want):
    model = make_model(keep_targets=targets).train()
    force_gates(model, keep=True)
    model(images(2))
    assert model.last_record.aux_losses["loss_svit_ratio"].item() == pytest.approx(want)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_pruning_everything_is_guarded(min_keep, training):
    model = make_model(cls_token=False, min_keep=min_keep)
    force_gates(model, keep=False)
    with torch.no_grad():
        model.reducer.thresholds.fill_(1.0)  # p_keep < 1: the threshold rule keeps nothing
        model.reducer.calibration_steps.fill_(1)
    model.train(training)
    states = capture_states(model)
    out = model(images(3))
    assert torch.isfinite(out).all()
    for mask in states[0].masks.values():
        assert mask.sum(1).tolist() == [min_keep] * 3
    if training:
        assert torch.isfinite(model.last_record.aux_losses["loss_svit_ratio"])


@pytest.mark.parametrize("reactivation", [True, False])
def test_reactivation_eval(reactivation):
    # block 2 keeps half the tokens; block 3 wants all of them back
    model = make_model(blocks=(2, 3), keep_targets=(0.5, 1.0), inference="fixed", reactivation=reactivation).eval()
    states = capture_states(model)
    with torch.no_grad():
        model(images(2))
    first, second = states[0].masks[2], states[0].masks[3]
    assert first.sum(1).tolist() == [N // 2] * 2
    assert second.all() if reactivation else torch.equal(second, first)


@pytest.mark.parametrize("reactivation", [True, False])
def test_reactivation_train(reactivation):
    model = make_model(blocks=(2, 3), keep_targets=(0.5, 0.5), reactivation=reactivation).train()
    noise_free(model)
    force_gates(model, keep=True, blocks=(3,))
    states = capture_states(model)
    with torch.no_grad():
        model(images(2))
    first, second = states[0].masks[2], states[0].masks[3]
    assert not first.all() and first.any()
    assert second.all() if reactivation else torch.equal(second, first)


@pytest.mark.parametrize("inference", ["threshold", "fixed"])
def test_inference_is_deterministic(inference):
    model = make_model(inference=inference)
    calibrate(model)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("img, n", [(IMG, N), ((80, 80), 25)])
def test_fixed_mode_keeps_exact_budget(img, n):
    targets = (0.7, 0.5, 0.49, 0.343)
    model = make_model(keep_targets=targets, inference="fixed").eval()
    calibrate(model)  # calibrated thresholds must not matter in fixed mode
    states = capture_states(model)
    with torch.no_grad():
        model(torch.randn(3, 3, *img))
    for block, target in zip(GATED, targets):
        assert states[0].masks[block].sum(1).tolist() == [math.ceil(target * n)] * 3


def test_uncalibrated_threshold_mode_falls_back_to_fixed():
    model = make_model().eval()
    assert not model.reducer.calibration_steps.any()
    states = capture_states(model)
    with torch.no_grad():
        model(images(2))
    for block, target in zip(GATED, TARGETS):
        assert states[0].masks[block].sum(1).tolist() == [math.ceil(target * N)] * 2


@pytest.mark.parametrize("cls_token", [True, False])
def test_pruned_tokens_keep_last_value(cls_token):
    # ceil(0.1 * 24) = 3 tokens per gated block: at least 12 of 24 are never updated after block 1
    model = make_model(cls_token, keep_targets=(0.1,) * 4, inference="fixed").eval()
    states = capture_states(model)
    after_dense = []
    model.blocks[GATED[0] - 1].register_forward_hook(lambda m, i, o: after_dense.append(o))
    x = images(2)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        want = model.norm(after_dense[0])
    P = model.num_prefix_tokens
    never = ~torch.stack(list(states[0].masks.values())).any(0)  # (B, N)
    assert never.sum(1).min() >= N - 4 * 3
    got_patch, want_patch = tokens[:, P:], want[:, P:]
    assert torch.allclose(got_patch[never], want_patch[never], atol=1e-6, rtol=0)
    assert (got_patch[~never] - want_patch[~never]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_discarded_tokens_are_zero_in_the_map(training):
    # keep_pruned=False (finding 1's ablation): same decisions as keeping them, but a token pruned by the
    # last gate is zero in the output tokens instead of carrying its last value
    kept = make_model(reactivation=False, inference="fixed")
    discarded = make_model(reactivation=False, inference="fixed", keep_pruned=False)
    discarded.load_state_dict(kept.state_dict())
    outputs = {}
    for name, model in (("kept", kept), ("discarded", discarded)):
        noise_free(model)
        states, finish = capture_states(model), model.reducer.finish
        model.reducer.finish = lambda x, state, finish=finish, name=name: outputs.setdefault(name, finish(x, state))
        with torch.no_grad():
            model.train(training)(images(2))
        outputs[name + "_keep"] = states[0].masks[GATED[-1]]
    assert torch.equal(outputs["kept_keep"], outputs["discarded_keep"])
    keep = outputs["kept_keep"]
    assert keep.any() and not keep.all()
    patch_kept, patch_discarded = outputs["kept"][:, 1:], outputs["discarded"][:, 1:]
    assert (patch_discarded[~keep] == 0).all() and (patch_kept[~keep].abs().sum(-1) > 0).all()
    assert torch.allclose(patch_discarded[keep], patch_kept[keep], atol=1e-6)
    assert torch.allclose(outputs["discarded"][:, :1], outputs["kept"][:, :1], atol=1e-6)  # the CLS token


def test_invalid_arguments():
    with pytest.raises(ValueError, match="gate must be one of"):
        SViTReducer(DIM, gate="attention")
    with pytest.raises(ValueError, match="set reactivation=False"):
        SViTReducer(DIM, keep_pruned=False)
    with pytest.raises(ValueError, match="one value per reducing block"):
        SViTReducer(DIM, blocks=(2, 3), keep_targets=(0.7,))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        SViTReducer(DIM, blocks=(2, 3), keep_targets=(0.7, 1.5))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        SViTReducer(DIM, blocks=(2,), keep_targets=(0.0,))
    with pytest.raises(ValueError, match="ratio_loss"):
        SViTReducer(DIM, ratio_loss="tokens")
    with pytest.raises(ValueError, match="depth 6"):
        make_model(blocks=(3, 6), keep_targets=(0.5, 0.5))
    with pytest.raises(ValueError, match="embed_dim"):
        ViT(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, reducer=SViTReducer(96))


@pytest.mark.parametrize("cls_token", [True, False])
def test_token_counts_and_maps_follow_the_kept_tokens(cls_token):
    model = make_model(cls_token=cls_token, inference="fixed").eval()
    model.record_tokens = True
    with torch.no_grad():
        model(images(2))
    P = int(cls_token)
    counts, maps = model.last_record.token_counts, model.last_record.token_maps
    assert counts.shape == (DEPTH, 2)
    for block in range(DEPTH):
        if block in GATED:
            want = math.ceil(TARGETS[GATED.index(block)] * N) + P
            assert counts[block].tolist() == [want, want]
            kept = maps[block] >= 0
            assert kept.sum(dim=1).tolist() == [want - P] * 2
            ids = torch.arange(N).expand(2, -1)
            assert torch.equal(maps[block][kept], ids[kept])  # kept tokens carry their own index
        else:
            assert counts[block].tolist() == [N + P] * 2
            assert block not in maps
    gate_macs = len(GATED) * N * (DIM * (DIM // 4) + (DIM // 4) * 2)
    assert model.last_record.extra_macs == gate_macs
    model.train()
    model(images(2))  # training masks instead of gathering: every block runs every token
    assert torch.equal(model.last_record.token_counts, torch.full((DEPTH, 2), float(N + P)))


# the inference rules: threshold (default), fixed, official (p_keep > 0.5), sample (hard Gumbel draw)


def capture_gate_outputs(model: ViT) -> dict[int, list[torch.Tensor]]:
    """Gated block -> the (keep, prune) log-probabilities its gate gave in each forward."""
    outputs = {block: [] for block in GATED}
    for block in GATED:
        gate = model.reducer.gates[model.reducer.gate_index[block]]
        gate.register_forward_hook(lambda m, i, o, block=block: outputs[block].append(o.detach()))
    return outputs


def test_unknown_inference_rule_names_the_rules():
    with pytest.raises(ValueError, match="'threshold', 'fixed', 'official', 'sample'"):
        SViTReducer(DIM, inference="argmax")


def test_official_rule_keeps_tokens_with_p_keep_above_half():
    model = make_model(inference="official").eval()
    states, log_ps = capture_states(model), capture_gate_outputs(model)
    with torch.no_grad():
        model(images(3))
    for block in GATED:
        log_p = log_ps[block][0]
        want = log_p[..., 1] < log_p[..., 0]  # the official argmin over (keep, prune)
        top = log_p[..., 0].argmax(dim=1)
        want[torch.arange(3), top] = True  # min_keep
        assert torch.equal(states[0].masks[block], want)
    rates = torch.stack([states[0].fractions[b] for b in GATED])
    assert ((rates > 0) & (rates < 1)).any()
    assert model.reducer.inference_rules() == {b: "official" for b in GATED}
    assert model.reducer.inference_fallbacks() == {}


def test_official_rule_prunes_ties():
    model = make_model(cls_token=False, inference="official").eval()
    for gate in model.reducer.gates:  # p_keep = p_prune = 0.5 everywhere
        with torch.no_grad():
            gate.fc2.weight.zero_()
            gate.fc2.bias.zero_()
    states = capture_states(model)
    with torch.no_grad():
        model(images(2))
    assert all(m.sum(1).tolist() == [1, 1] for m in states[0].masks.values())  # min_keep only


def test_sample_rule_draws_as_the_official_gumbel_softmax():
    from tokenprune.models.reducers.svit import gumbel_keep

    log_p = torch.randn(3, 50, 2).log_softmax(-1)
    torch.manual_seed(5)
    ours = gumbel_keep(log_p)
    torch.manual_seed(5)
    official = torch.nn.functional.gumbel_softmax(log_p, tau=1.0, hard=True)[..., 0] > 0.5
    assert torch.equal(ours, official)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(gumbel_keep(log_p, g.manual_seed(3)), gumbel_keep(log_p, torch.Generator().manual_seed(3)))


def test_sample_rule_keeps_at_the_gate_probability_per_image():
    # every gate says p_keep = 0.3: a hard draw keeps 30% of the tokens on average, each image its own share
    model = make_model(cls_token=False, inference="sample").eval()
    for gate in model.reducer.gates:
        with torch.no_grad():
            gate.fc2.weight.zero_()
            gate.fc2.bias.copy_(torch.tensor([math.log(0.3), math.log(0.7)]))
    with torch.no_grad():
        model(torch.randn(6, 3, 160, 192))  # 120 tokens per image
    stats = model.last_record.stats
    for block in GATED:
        per_image = stats[f"keep_rate_per_image.block{block}"]
        assert per_image.shape == (6,) and per_image.std() > 0
        assert abs(stats[f"keep_rate.block{block}"].item() - 0.3) < 0.06
    assert model.reducer.inference_rules() == {b: "sample" for b in GATED}


def test_sample_rule_is_seeded():
    model = make_model(inference="sample").eval()
    states = capture_states(model)
    x = images(3)
    with torch.no_grad():
        first, second = model(x), model(x)
        model.reducer.sample_seed = 1
        third = model(x)
    assert torch.equal(first, second)  # every forward draws from a generator seeded with sample_seed
    assert all(torch.equal(states[0].masks[b], states[1].masks[b]) for b in GATED)
    assert not all(torch.equal(states[0].masks[b], states[2].masks[b]) for b in GATED)
    assert not torch.equal(first, third)
    model.reducer.sample_seed = None  # torch's global generator, as the official code
    with torch.no_grad():
        torch.manual_seed(7)
        a = model(x)
        torch.manual_seed(7)
        b = model(x)
        c = model(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rules_and_fallbacks():
    model = make_model(keep_targets=(0.7, 0.7, 0.49, 1.0)).eval()
    reducer = model.reducer
    assert reducer.inference_rules() == {b: "fixed" for b in GATED}
    fallbacks = reducer.inference_fallbacks()
    assert fallbacks == {2: "never calibrated", 3: "never calibrated", 4: "never calibrated", 5: fallbacks[5]}
    assert "1.0" in fallbacks[5]
    calibrate(model)
    assert reducer.inference_rules() == {2: "threshold", 3: "threshold", 4: "threshold", 5: "fixed"}
    assert list(reducer.inference_fallbacks()) == [5]
    for rule in ("fixed", "official", "sample"):
        reducer.inference = rule
        assert reducer.inference_rules() == {b: rule for b in GATED} and reducer.inference_fallbacks() == {}


def test_calibration_context_recalibrates_from_scratch():
    model = make_model(inference="sample").eval()
    calibrate(model)  # training-time EMA thresholds, to be replaced
    reducer = model.reducer
    log_ps = capture_gate_outputs(model)
    batches = [images(4, seed=s) for s in (11, 12, 13)]
    with torch.no_grad(), reducer.calibration() as r:
        assert r is reducer and reducer.calibrating and reducer.inference == "threshold"
        assert not reducer.calibration_steps.any()  # reset on entry
        for x in batches:
            model(x)
    assert (reducer.inference, reducer.threshold_momentum, reducer.calibrating) == ("sample", 0.1, False)
    assert reducer.calibration_steps.tolist() == [3] * len(GATED)
    # the first gate sees the input alone: its threshold is the equal-weight mean of the batches' quantiles
    first = GATED[0]
    quantiles = []
    for log_p in log_ps[first]:
        flat = log_p[..., 0].exp().flatten()
        k = round(TARGETS[0] * flat.numel())
        quantiles.append(torch.kthvalue(flat, flat.numel() - k + 1).values)
    assert reducer.thresholds[0].item() == pytest.approx(torch.stack(quantiles).mean().item(), abs=1e-6)
