"""tools/analysis_tools/study.py: a two-entry, few-iteration study run as a user runs it, then resumed; and its
statistics by hand."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_tools import ROOT, run, write_tiny_config

sys.path.insert(0, str(ROOT / "tools/analysis_tools"))

import study  # noqa: E402

SVIT = ROOT / "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"


def write_study(tmp_path: Path) -> Path:
    dense_dir, svit_dir = tmp_path / "dense_cfg", tmp_path / "svit_cfg"
    dense_dir.mkdir()
    svit_dir.mkdir()
    dense = write_tiny_config(dense_dir, max_iters=2)
    svit = write_tiny_config(
        svit_dir,
        base=SVIT,
        max_iters=2,
        extra=(
            "model = dict(backbone=dict(depth=4, reducer=dict(blocks=[2, 3], keep_targets=[0.7, 0.49])))\n"
            "custom_hooks = [dict(type='TokenStatsHook'), dict(type='SViTCalibrationHook', num_batches=2)]"
        ),
    )
    path = tmp_path / "study_file.py"
    path.write_text(f"""
seeds = [0]
reference = 'dense'
work_root = '{tmp_path}/runs'
out_dir = '{tmp_path}/out'
report = '{tmp_path}/report/study.md'
benchmark = dict(num_images=2, batch=[1], sizes=[None], runs=1, warmup=0)
entries = [
    dict(name='dense', config='{dense}'),
    dict(name='svit', config='{svit}', init='dense',
         cfg_options={{'model.backbone.reducer.keep_targets': [0.6, 0.4]}}),
]
targets = [dict(title='svit close to dense', a='svit', b='dense', max_drop=0.5)]
comparisons = [dict(title='svit vs dense', a='svit', b='dense')]
""")
    return path


def run_study(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "tools/analysis_tools/study.py", str(path), *extra)


def records_of(tmp_path: Path) -> dict:
    return {r["name"]: r for r in json.loads((tmp_path / "out/results.json").read_text())["records"]}


def drop_record(tmp_path: Path, name: str) -> None:
    path = tmp_path / "out/results.json"
    data = json.loads(path.read_text())
    data["records"] = [r for r in data["records"] if r["name"] != name]
    path.write_text(json.dumps(data))


def test_study_runs_collects_renders_and_resumes(tmp_path):
    path = write_study(tmp_path)
    log = run_study(path).stdout
    assert "train dense seed 0" in log and "train svit seed 0" in log
    assert "benchmark svit seed 0 against dense" in log

    records = records_of(tmp_path)
    assert set(records) == {"dense", "svit"}
    dense, svit = records["dense"], records["svit"]
    assert dense["reducer"] == "none" and svit["reducer"] == "SViT"
    for r in (dense, svit):
        for key in ("box_mAP", "mask_mAP", "keep_rate", "flop_bound", "speedup_b1"):
            assert isinstance(r[key], float), (r["name"], key)
        assert len(r["coco"]) == 24  # the 12 COCO figures of boxes and of masks
    # the fine-tune started from the dense run's checkpoint, with the study's cfg-options and seed
    resolved = (tmp_path / "runs/svit/seed0/svit.py").read_text()
    assert f"{tmp_path}/runs/dense/seed0/iter_2.pth" in resolved and "0.6" in resolved
    assert dense["keep_rate"] == 1.0 and dense["flop_bound"] == 1.0 and dense["speedup_b1"] == 1.0
    assert set(svit["keep_rate_per_block"]) == {"2", "3"}
    assert 0 < svit["keep_rate"] < 1 and svit["flop_bound"] > 1.0
    assert svit["speedup_b1"] > 0 and svit["bench_flop_bound_b1"] > 1.0  # timed against dense in one run

    report = (tmp_path / "report/study.md").read_text()
    assert "| dense | none | yes | 1 |" in report and "| svit | SViT | yes | 1 |" in report
    assert "svit close to dense" in report and "one seed each so far" in report
    assert (tmp_path / "out/pareto.png").stat().st_size > 1000

    # a second run finds everything recorded: nothing trained, tested or timed again
    done = tmp_path / "runs/svit/seed0/train_done.json"
    before = done.stat().st_mtime_ns
    log = run_study(path).stdout
    assert "train " not in log and "test " not in log and "benchmark " not in log
    assert done.stat().st_mtime_ns == before

    # a run killed between training and testing (no record, no metrics) is tested, not retrained
    drop_record(tmp_path, "svit")
    (tmp_path / "runs/svit/seed0/metrics.json").unlink()
    log = run_study(path).stdout
    assert "test svit seed 0" in log and "train " not in log
    assert records_of(tmp_path)["svit"]["box_mAP"] == svit["box_mAP"]

    # a fresh checkout: the run folders are gone, the committed records stand
    shutil.rmtree(tmp_path / "runs")
    log = run_study(path).stdout
    assert "train " not in log and "test " not in log and set(records_of(tmp_path)) == {"dense", "svit"}
    # ... and a pending fine-tune retrains its recorded (seeded) start first
    drop_record(tmp_path, "svit")
    log = run_study(path).stdout
    assert "dense seed 0 is recorded but its checkpoint is not here" in log and "train svit seed 0" in log
    assert set(records_of(tmp_path)) == {"dense", "svit"}


def test_study_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("entries = [dict(name='a', config='configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py', init='b')]")
    proc = run(sys.executable, "tools/analysis_tools/study.py", str(bad), ok=False)
    assert proc.returncode != 0 and "starts from unknown entry 'b'" in proc.stderr


def records(name: str, values: list[float], mask_shift: float = 0.0) -> list[dict]:
    return [
        {"name": name, "reducer": "none", "train": True, "seed": i, "box_mAP": v, "mask_mAP": v + mask_shift}
        for i, v in enumerate(values)
    ]


def test_summary_and_welch_comparison_by_hand():
    fake = {"entries": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    summary = study.summarise(
        fake, records("a", [0.300, 0.302, 0.304]) + records("b", [0.301, 0.303, 0.299]) + records("c", [0.2, 0.21, 0.2])
    )
    mean, sd, n = summary["a"]["box_mAP"]
    assert (mean, n) == (pytest.approx(0.302), 3) and sd == pytest.approx(0.002)
    close = study.compare(summary, "a", "b", "box_mAP")
    assert close["diff"] == pytest.approx(0.1) and close["beyond_noise"] is False
    far = study.compare(summary, "a", "c", "box_mAP")
    # diff 30.2 - 20.33 = 9.87 points, se = sqrt(0.2^2/3 + 0.577^2/3) = 0.353 -> t = 28 over ~2.5 df
    assert far["diff"] == pytest.approx(9.8667, abs=1e-3) and far["se"] == pytest.approx(0.3528, abs=1e-3)
    assert far["beyond_noise"] is True
    single = study.summarise(fake, records("a", [0.3]) + records("b", [0.2]))
    assert study.compare(single, "a", "b", "box_mAP")["beyond_noise"] is None
    assert math.isnan(single["a"]["box_mAP"][1])
