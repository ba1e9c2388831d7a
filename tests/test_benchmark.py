"""tools/analysis_tools/benchmark.py and get_flops.py on tiny models: they run, emit valid JSON with the
expected fields and sane relations (no timing assertions)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools/analysis_tools"))

import benchmark  # noqa: E402  (the command line: tools/analysis_tools/benchmark.py)
import get_flops  # noqa: E402

from tokenprune import benchmarking as bench  # noqa: E402
from tokenprune.mmdet_plugin import benchmarking as det_bench  # noqa: E402
from tokenprune.models.flops import backbone_macs, macs_from_counts, window_token_counts  # noqa: E402
from tokenprune.models.reducers import REDUCERS, build_reducer  # noqa: E402
from tokenprune.models.vit import vitdet_base  # noqa: E402

SVIT_TINY = 'svit=SViT:{"blocks": [1, 2, 3], "keep_targets": [0.7, 0.5, 0.3], "inference": "fixed"}'
TINY_BACKBONE = ["--arch", "deit-t", "--depth", "4", "--size", "64", "64", "--threads", "1"]
# the windowed ViT-T at 256 x 256: a 16 x 16 token grid, four 14 x 14 windows (three of them reaching into the
# padding), so per-window token counts differ from window to window
TINY_WINDOWED = ["--arch", "vitdet-t", "--size", "256", "256", "--threads", "1"]
ON_GRID = [name for name, cls in REDUCERS.items() if cls.runs_on_grid]
SHAPES_CFG = ROOT / "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"
SVIT_CFG = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"


def check_spread(stats: dict) -> None:
    assert 0 < stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]


def test_backbone_benchmark_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(
        ["backbone", *TINY_BACKBONE, "--batch", "1", "2", "--runs", "3", "--warmup", "1"]
        + ["--reducer", "none", SVIT_TINY, "--json-out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["mode"] == "backbone" and result["environment"]["threads"] == 1
    assert result["settings"]["depth"] == 4 and result["settings"]["runs"] == 3
    assert [m["label"] for m in result["models"]] == ["dense", "svit"]
    assert [r["batch"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        dense, svit = r["models"]["dense"], r["models"]["svit"]
        for m in (dense, svit):
            check_spread(m["latency_ms"])
            assert m["images_per_s"] == pytest.approx(r["batch"] / m["latency_ms"]["median"] * 1e3)
            assert m["measured_over_bound"] == pytest.approx(m["speedup"] / m["flop_bound"])
            assert len(m["keep_rate"]) == len(m["block_macs"]) == 4
        assert dense["speedup"] == dense["speedup_best"] == 1.0 and dense["flop_bound"] == 1.0
        assert dense["keep_rate"] == [1.0] * 4
        assert svit["speedup_best"] == pytest.approx(dense["latency_ms"]["min"] / svit["latency_ms"]["min"])
        assert svit["keep_rate"] == [1.0] + [math.ceil(t * 16) / 16 for t in (0.7, 0.5, 0.3)]
        assert svit["flop_bound"] > 1.0 and svit["backbone_macs"] < dense["backbone_macs"]
        assert svit["flop_bound_padded"] == pytest.approx(svit["flop_bound"])  # fixed budget: no padding
        assert svit["stats"]["keep_rate.block3"] == pytest.approx(math.ceil(0.3 * 16) / 16)


def test_backbone_benchmark_runs_with_torch_and_timm_alone(tmp_path):
    """As on the GPU machine: mmdet, mmengine and mmcv cannot be imported."""
    out = tmp_path / "bench.json"
    code = (
        "import runpy, sys\n"
        "for m in ('mmdet', 'mmengine', 'mmcv'): sys.modules[m] = None\n"
        f"sys.argv = ['benchmark.py', 'backbone', *{TINY_BACKBONE!r}, '--batch', '1', '--runs', '1', "
        f"'--warmup', '0', '--reducer', 'none', {SVIT_TINY!r}, '--json-out', {str(out)!r}]\n"
        "runpy.run_path('tools/analysis_tools/benchmark.py', run_name='__main__')\n"
        "assert not any(sys.modules.get(m) for m in ('mmdet', 'mmengine', 'mmcv'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["results"][0]["models"]["svit"]["flop_bound"] > 1.0


def test_every_registered_reducer_runs_with_its_defaults():
    result = benchmark.main(
        ["backbone", "--arch", "deit-t", "--cls-token", "--size", "128", "128", "--threads", "1"]
        + ["--batch", "1", "--runs", "1", "--warmup", "0", "--reducer", "all"]
    )
    models = result["results"][0]["models"]
    assert list(models) == ["dense", *REDUCERS]
    for label, m in models.items():
        assert all(0 < k <= 1 for k in m["keep_rate"]), label
        if label != "dense":
            assert m["flop_bound"] > 1.0, label


def test_windowed_archs_are_vitdet_at_three_widths():
    """vitdet-b is ViTDet-B as vit.py builds it (same tensors, windows, global blocks); -s and -t are its narrower
    versions; fewer blocks keep the global blocks that remain; a class token is refused."""
    parser = benchmark.build_parser()
    for arch, (dim, heads) in bench.WINDOWED_ARCHS.items():
        vit = bench.build_backbone(parser.parse_args(["backbone", "--arch", arch]))
        assert (vit.embed_dim, vit.num_heads, vit.depth, vit.window_size) == (dim, heads, 12, 14)
        assert vit.window_block_indexes == (0, 1, 3, 4, 6, 7, 9, 10) and vit.use_rel_pos
        assert vit.num_prefix_tokens == 0 and vit.pos_embed_hw == (14, 14) and vit.rel_pos_input_size == (64, 64)
        if arch == "vitdet-b":
            reference = {k: v.shape for k, v in vitdet_base().state_dict().items()}
            assert {k: v.shape for k, v in vit.state_dict().items()} == reference
    short = bench.build_backbone(parser.parse_args(["backbone", "--arch", "vitdet-t", "--depth", "4"]))
    assert short.window_block_indexes == (0, 1, 3)
    with pytest.raises(ValueError, match="no class token"):
        bench.build_backbone(parser.parse_args(["backbone", "--arch", "vitdet-t", "--cls-token"]))


def test_all_on_a_windowed_backbone_skips_the_refused_reducers_with_the_reason(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["backbone", *TINY_WINDOWED, "--batch", "1", "--runs", "1", "--warmup", "0", "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert result["settings"]["window_size"] == 14 and result["settings"]["use_rel_pos"]
    assert "SViT" in ON_GRID
    assert [m["label"] for m in result["models"]] == ["dense", *ON_GRID]
    assert result["models"][1]["settings"] == {"inference": "fixed"}  # SViT at its fixed budget
    refused = [name for name in REDUCERS if name not in ON_GRID]
    assert [s["label"] for s in result["skipped"]] == refused
    vit = vitdet_base(embed_dim=192, num_heads=3)
    for entry in result["skipped"]:
        with pytest.raises(ValueError) as refusal:
            vit.set_reducer(build_reducer({"type": entry["label"]}, 192))
        assert entry["reason"] == str(refusal.value) and "window" in entry["reason"]
    printed = capsys.readouterr().out
    assert all(f"skipped {name} (from 'all'): " in printed for name in refused)
    models = result["results"][0]["models"]
    assert list(models) == ["dense", *ON_GRID] and models["SViT"]["flop_bound"] > 1.0


def test_windowed_flop_bound_counts_the_tokens_of_each_window():
    """SViT's FLOP bound on the windowed ViT-T is backbone_macs' dense / pruned ratio computed here directly,
    with the windowed blocks counted from the kept tokens of each window (which differ from window to window),
    not as dense windows; get_flops.py gives the same."""
    svit = 'svit=SViT:{"inference": "fixed"}'
    argv = ["backbone", *TINY_WINDOWED, "--batch", "2", "--reducer", "none", svit]
    result = benchmark.main([*argv, "--runs", "1", "--warmup", "0"])
    bound = result["results"][0]["models"]["svit"]["flop_bound"]

    args = benchmark.build_parser().parse_args(argv)
    setup = bench.setup_backbone_models(args, torch.device("cpu"))
    vit = setup.backbone
    images = bench.backbone_batches(args, 2, torch.device("cpu"))[0]
    vit.record_tokens = True
    macs = {}
    for label, reducer in setup.reducers.items():
        vit.set_reducer(reducer)
        with torch.inference_mode():
            vit(images)
        macs[label] = backbone_macs(vit, (256, 256))
    record = vit.last_record  # SViT's
    windows = window_token_counts(vit, record.token_counts, record.token_maps, (256, 256))
    gated_windowed = [i for i in setup.reducers["svit"].blocks if i in vit.window_block_indexes]
    assert sorted(windows) == gated_windowed
    assert all(w.shape == (2, 4) and len(set(w.flatten().tolist())) > 1 for w in windows.values())
    assert bound == pytest.approx(macs["dense"].total.mean().item() / macs["svit"].total.mean().item(), rel=1e-9)
    as_dense_windows = macs_from_counts(vit, record.token_counts, (256, 256), record.extra_macs)
    assert as_dense_windows.total.mean().item() > macs["svit"].total.mean().item() * 1.05
    flops = get_flops.main([*argv, "--batch", "2"])
    assert flops["results"][0]["models"]["svit"]["flop_bound"] == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize(
    "reducer, message",
    [
        ("NoSuch", "unknown reducer 'NoSuch'"),
        ("SViT:{inference: fixed}", "not valid JSON"),
        ('SViT:{"keep_targets": [2.0]}', "invalid SViT reducer settings: keep_targets needs one value per reducing"),
    ],
)
def test_bad_reducer_gives_one_clear_message(capsys, reducer, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["backbone", *TINY_BACKBONE, "--runs", "1", "--reducer", reducer])
    assert exit_info.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


def test_get_flops_backbone_per_block(tmp_path):
    out = tmp_path / "flops.json"
    get_flops.main(["backbone", *TINY_BACKBONE, "--reducer", "none", SVIT_TINY, "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert result["unit"].startswith("MACs")
    dense, svit = (result["results"][0]["models"][k] for k in ("dense", "svit"))
    assert svit["tokens"] == [16.0] + [math.ceil(t * 16) for t in (0.7, 0.5, 0.3)]
    for m in (dense, svit):
        parts = m["patch_embed_macs"] + sum(m["block_macs"]) + m["reducer_macs"]
        assert m["backbone_macs"] == pytest.approx(parts)
    assert svit["block_macs"][0] == dense["block_macs"][0] and svit["block_macs"][3] < dense["block_macs"][3]
    assert dense["flop_bound"] == 1.0 and svit["flop_bound"] == pytest.approx(
        dense["backbone_macs"] / svit["backbone_macs"]
    )


def tiny_detector_configs(folder: Path) -> tuple[Path, Path]:
    """Dense and SViT (gates at blocks 1-3) detectors with a 4-block ViT-T, test data: 2 shapes images."""
    common = f"""
data_root = '{folder}/shapes/'
generate = dict(seed=0, num_train=2, num_val=2, image_size=(96, 96))
test_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, generate=generate))
"""
    dense = folder / "dense.py"
    dense.write_text(f"_base_ = '{SHAPES_CFG}'\n{common}model = dict(backbone=dict(depth=4))\n")
    svit = folder / "svit.py"
    svit.write_text(
        f"_base_ = '{SVIT_CFG}'\n{common}"
        "model = dict(backbone=dict(depth=4, reducer=dict(blocks=[1, 2, 3], keep_targets=[0.7, 0.5, 0.3])))\n"
    )
    return dense, svit


def test_detector_benchmark_on_tiny_configs(tmp_path):
    dense_cfg, svit_cfg = tiny_detector_configs(tmp_path)
    out = tmp_path / "bench.json"
    benchmark.main(
        ["detector", str(dense_cfg), str(svit_cfg), "--size", "64", "96", "--batch", "1", "--runs", "2"]
        + ["--warmup", "0", "--threads", "1", "--json-out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["mode"] == "detector" and [m["label"] for m in result["models"]] == ["dense", "svit"]
    r = result["results"][0]
    dense, svit = r["models"]["dense"], r["models"]["svit"]
    for m in (dense, svit):
        for part in ("detector", "backbone"):
            check_spread(m[part]["latency_ms"])
            assert m[part]["measured_over_bound"] == pytest.approx(m[part]["speedup"] / m[part]["flop_bound"])
        assert m["detector_macs"] == pytest.approx(m["backbone_macs"] + m["rest_macs"])
        assert set(m["rest_macs_by_part"]) >= {"neck", "rpn_head", "roi_head"}
        assert m["backbone_other_macs"] == 0.0  # a plain ViT has no layers outside its blocks and patch embedding
    assert dense["detector"]["speedup"] == 1.0 and dense["backbone"]["flop_bound"] == 1.0
    assert svit["keep_rate"] == [1.0] + [math.ceil(t * 24) / 24 for t in (0.7, 0.5, 0.3)]
    assert svit["backbone"]["flop_bound"] > svit["detector"]["flop_bound"] > 1.0
    assert svit["rest_macs_by_part"]["neck"] == dense["rest_macs_by_part"]["neck"]
    # random weights: the heads' workload is fixed, so both models' heads do the same work
    assert result["settings"]["head_work"] == "fixed" and r["head_work_warning"] is None
    for part in ("rpn_head", "roi_head"):
        assert svit["rest_macs_by_part"][part] == pytest.approx(dense["rest_macs_by_part"][part], rel=1e-9)


def test_fixed_head_work_gives_every_image_the_same_proposals_and_detections(tmp_path):
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import tokenprune  # noqa: F401

    dense_cfg, _ = tiny_detector_configs(tmp_path)
    rois, dets = {}, {}
    for mode in ("configured", "fixed"):
        cfg = Config.fromfile(dense_cfg)
        cfg.model.test_cfg.rpn.update(nms_pre=4000, max_per_img=2000)  # more proposals than NMS lets through
        if mode == "fixed":
            det_bench.fix_head_work(cfg.model)
        init_default_scope("mmdet")
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()
        seen = []
        model.roi_head.bbox_roi_extractor.register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[1].shape[0]))
        images = [torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8) for _ in range(2)]
        meta = {"img_shape": (96, 96), "ori_shape": (96, 96), "scale_factor": (1.0, 1.0)}
        samples = [DetDataSample(metainfo=dict(meta)) for _ in images]
        data = model.data_preprocessor({"inputs": images, "data_samples": samples})
        with torch.no_grad():
            preds = model(data["inputs"], data["data_samples"], mode="predict")
        rois[mode], dets[mode] = seen[0], [len(p.pred_instances) for p in preds]
    assert rois["fixed"] == 2 * 2000  # every image hands on all its proposals
    assert dets["fixed"] == [Config.fromfile(dense_cfg).model.test_cfg.rcnn.max_per_img] * 2
    assert rois["configured"] < rois["fixed"]  # NMS removes a random RPN's overlapping proposals


def test_head_work_warning_names_the_models():
    same = {k: {"rest_macs_by_part": {"roi_head": 5e9}} for k in ("dense", "svit")}
    assert det_bench.head_work_note(same) is None
    differ = {"dense": {"rest_macs_by_part": {"roi_head": 5e9}}, "svit": {"rest_macs_by_part": {"roi_head": 2e9}}}
    note = det_bench.head_work_note(differ)
    assert note.startswith("WARNING") and "dense 5.00" in note and "svit 2.00" in note
    assert det_bench.resolve_head_work("auto", ["a.pth", None]) == "fixed"
    assert det_bench.resolve_head_work("auto", ["a.pth", "b.pth"]) == "configured"
    with pytest.raises(ValueError, match="two-stage"):
        det_bench.fix_head_work({"test_cfg": {}})


def test_get_flops_detector_on_dataset_images(tmp_path):
    dense_cfg, svit_cfg = tiny_detector_configs(tmp_path)
    result = get_flops.main(
        ["detector", str(dense_cfg), str(svit_cfg), "--dataset", "--num-images", "2", "--threads", "1"]
    )
    r = result["results"][0]
    assert r["num_images"] == 2 and r["input_hw"] == [[256, 256]]  # the test pipeline resizes to 256 x 256
    dense, svit = r["models"]["dense"], r["models"]["svit"]
    assert dense["tokens"] == [256.0] * 4 and svit["tokens"][3] == math.ceil(0.3 * 256)
    assert svit["detector_flop_bound"] > 1.0 and dense["detector_flop_bound"] == 1.0


def test_backbone_on_real_images_with_checkpoint(tmp_path):
    """--images resizes and pads real images to --size; --checkpoint loads the backbone and the reducer's
    calibrated thresholds (here 0: every token passes, unlike the fixed-budget fallback)."""
    from PIL import Image

    from tokenprune.models import SViTReducer, ViT

    for i, size in enumerate([(40, 64), (64, 30), (50, 50)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(tmp_path / f"img{i}.png")
    reducer = SViTReducer(192, blocks=(1, 2, 3), keep_targets=(0.7, 0.5, 0.3))
    reducer.calibration_steps.fill_(1)
    vit = ViT(embed_dim=192, depth=4, num_heads=3, reducer=reducer)
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "model.pth")
    threshold = 'svit=SViT:{"blocks": [1, 2, 3], "keep_targets": [0.7, 0.5, 0.3]}'
    result = get_flops.main(
        ["backbone", *TINY_BACKBONE, "--images", str(tmp_path), "--batch", "2", "--reducer", "none", threshold]
        + ["--checkpoint", str(tmp_path / "model.pth")]
    )
    assert len(result["settings"]["images"]) == 3 and result["results"][0]["num_images"] == 2
    assert f"svit: {len(reducer.state_dict())} reducer tensors from the checkpoint" in result["notes"]
    assert result["results"][0]["models"]["svit"]["keep_rate"] == [1.0] * 4


def test_windowed_backbone_loads_a_vitdet_checkpoint_with_its_reducer(tmp_path):
    """--checkpoint on a windowed arch: ViTDet's loader for the backbone (here an MMDetection layout, the neck
    reported as dropped) and the reducer's tensors."""
    from tokenprune.models import SViTReducer

    reducer = SViTReducer(192, blocks=(1, 2, 3), keep_targets=(0.7, 0.5, 0.3))
    vit = vitdet_base(embed_dim=192, num_heads=3, depth=4, global_block_indexes=(2,), reducer=reducer)
    state = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"state_dict": {**state, "neck.conv.weight": torch.zeros(1)}}, tmp_path / "vitdet.pth")
    threshold = 'svit=SViT:{"blocks": [1, 2, 3], "keep_targets": [0.7, 0.5, 0.3]}'
    result = get_flops.main(
        ["backbone", "--arch", "vitdet-t", "--depth", "4", "--size", "64", "64", "--threads", "1"]
        + ["--checkpoint", str(tmp_path / "vitdet.pth"), "--reducer", "none", threshold]
    )
    backbone_line, reducer_line = result["notes"]
    backbone_tensors = [k for k in vit.state_dict() if not k.startswith("reducer.")]
    assert f"loaded {len(backbone_tensors)} tensors" in backbone_line and "neck.conv.weight" in backbone_line
    assert reducer_line == f"svit: {len(reducer.state_dict())} reducer tensors from the checkpoint"


def test_svit_gate_cost_replays_the_gates_without_computing_them(tmp_path):
    import svit_gate_cost

    calls = []

    class CountingGate(torch.nn.Module):
        def forward(self, x, policy=None):
            calls.append(1)
            return x * 2

    replay = svit_gate_cost.ReplayGate(CountingGate())
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    recorded = [replay(first), replay(second)]
    replay.record = False
    assert len(calls) == 2
    assert torch.equal(replay(first), recorded[0]) and torch.equal(replay(second), recorded[1])
    assert len(calls) == 2  # replaying computes nothing

    out = tmp_path / "gates.json"
    result = svit_gate_cost.main(
        ["--arch", "deit-t", "--size", "64", "64", "--batch", "1", "2", "--threads", "1", "--runs", "2"]
        + ["--warmup", "0", "--json-out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    assert set(result["batches"]) == {"1", "2"}
    for row in result["batches"].values():
        assert set(row["ms"]) == {"dense", "svit", "svit_no_gates"}
        assert math.isfinite(row["gates_share_of_dense"]) and math.isfinite(row["gates_share_of_svit"])


def test_gpu_benchmark_script_on_cpu_without_mmdetection(tmp_path):
    """The GPU run's script, with its device switched to the CPU and tiny settings: torch + timm only, every
    model of every setting in results.json and table.md, a setting past the budget named as skipped."""
    out = tmp_path / "gpu"
    code = (
        "import runpy, sys\n"
        "for m in ('mmdet', 'mmengine', 'mmcv'): sys.modules[m] = None\n"
        "sys.argv = ['gpu_benchmark.py', '--device', 'cpu', '--arch', 'deit-t', '--depth', '4', '--sizes', "
        f"'64x64', '32x48', '--batches', '1', '2', '--amp', 'none', 'bf16', '--runs', '1', '--warmup', '0', "
        f"'--models', 'none', {SVIT_TINY!r}, 'ToMe', '--windowed-arch', 'vitdet-t', '--windowed-sizes', '64x64', "
        f"'--windowed-batches', '1', '--windowed-models', 'none', {SVIT_TINY!r}, '--out-dir', {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_path('tools/analysis_tools/gpu_benchmark.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert not any(sys.modules.get(m) for m in ('mmdet', 'mmengine', 'mmcv'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    settings = [(r["arch"], tuple(r["size"]), r["amp"]) for r in result["runs"]]
    windowed = [("vitdet-t", (64, 64), "none"), ("vitdet-t", (64, 64), "bf16")]
    assert settings == windowed + [("deit-t", s, a) for s in ((64, 64), (32, 48)) for a in ("none", "bf16")]
    for run in result["runs"][:2]:  # the windowed ViT first
        assert [r["batch"] for r in run["result"]["results"]] == [1]
        assert list(run["result"]["results"][0]["models"]) == ["dense", "svit"]
        assert run["result"]["settings"]["window_size"] == 14
    for run in result["runs"][2:]:
        assert [r["batch"] for r in run["result"]["results"]] == [1, 2]
        assert list(run["result"]["results"][0]["models"]) == ["dense", "svit", "ToMe"]
    table = (out / "table.md").read_text()
    assert table.count("| svit |") == 6 and "## deit-t 32x48, bf16" in table and "## vitdet-t 64x64, none" in table

    gpu_benchmark = __import__("gpu_benchmark")
    note = gpu_benchmark.markdown(result["runs"][:1], ["800x1344 fp16: budget of 1 s spent"], "cpu")
    assert "Skipped (time budget or error): 800x1344 fp16: budget of 1 s spent" in note
    result["runs"][0]["result"]["skipped"] = [{"label": "EViT", "reason": "..."}, {"label": "PPT", "reason": "..."}]
    note = gpu_benchmark.markdown(result["runs"][:1], [], "cpu")
    assert "Cannot run this backbone (reasons in results.json): EViT, PPT." in note
    default_plan = gpu_benchmark.plan(gpu_benchmark.build_parser().parse_args([]))
    assert [(s.arch, s.size, s.batches) for s in default_plan][0] == ("vitdet-b", (1024, 1024), [1, 2])
