"""Run a study: every entry of a study file trained and evaluated over seeds exactly as a user would (with
tools/train.py and tools/test.py), its backbone timed against the dense model side by side, the results
collected into one JSON file and rendered as a table and a Pareto figure.

    python tools/analysis_tools/study.py configs/study/shapes.py            # the whole study (resumes)
    python tools/analysis_tools/study.py configs/study/shapes.py --only svit --seeds 0   # one entry, one seed
    python tools/analysis_tools/study.py configs/study/shapes.py --render-only          # tables from results

A study file is an MMEngine config (Python) with:

- ``entries``: a list of ``dict(name=..., config=..., cfg_options={...}, train=True, init=None,
  init_seed=None, seeds=None)``. ``config`` is a detector config (relative to the repository root);
  ``cfg_options`` are applied on top (as ``--cfg-options``); ``init`` names the entry whose trained checkpoint
  this one starts from (``load_from``; for ``train=False`` the checkpoint that is evaluated as it is);
  ``init_seed`` is the seed of that entry's run to start from (default: 0 for a fine-tune, so every
  fine-tune starts from the same checkpoint; the entry's own seed for ``train=False``, so training-free
  rows show the spread of their starting points); ``seeds`` overrides the study's seeds for this entry.
- ``seeds``: the seeds of every entry (each run gets ``randomness.seed``).
- ``reference``: the entry that the speed-ups are measured against (the dense model).
- ``work_root`` (run folders, one per entry and seed), ``out_dir`` (``results.json`` and the figure) and
  ``report`` (the markdown page), relative to the repository root.
- ``benchmark``: ``dict(num_images=8, batch=[1, 4], sizes=[None, 512], runs=10, warmup=2)``; ``None`` in
  ``sizes`` is the data's own size, a number S resizes the test images to S x S.
- ``comparisons``: ``dict(title=..., a=entry, b=entry)`` pairs whose difference the report states against the
  seed-to-seed noise; ``targets``: ``dict(title=..., a=entry, b=entry, max_drop=0.5)``, a met when its mean
  box and mask mAP are at most ``max_drop`` points (mAP x 100) below b's.

Resuming: a run whose record is in ``results.json`` is done, whether or not its folder is still there, so a
study spans sessions and machines by committing ``results.json`` as records arrive. Inside a run every step
is skipped when its output exists (``train_done.json``, ``metrics.json``, ``bench_*.json``) and training
resumes from the last checkpoint (``--resume``), so a killed study continues where it stopped. A pending run
whose starting checkpoint is gone (a fresh checkout) retrains that start first: every run is seeded, so on
the same kind of machine it is the same checkpoint. Each run's resolved config is written to its folder as
``<name>.py``: that file alone reproduces the run.

Speed: each run's backbone is timed against its starting model (``init``; the dense model for a fine-tune
or a training-free entry), side by side in one run of ``benchmark.py detector --backbone-only`` on the test
images, so every record carries its own measured speed-ups (``speedup_b1``, ``speedup_b4``, ...). Entries
without ``init`` are the reference itself: speed-up 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PY = sys.executable

# two-sided 95% quantiles of Student's t by degrees of freedom (Welch's test of two means)
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13}
T975_INF = 1.96


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# the study file


def load_study(path: str) -> dict:
    from mmengine.config import Config

    if not osp.isfile(path):
        raise SystemExit(f"study: study file not found: {path}")
    cfg = Config.fromfile(path).to_dict()
    entries = cfg.get("entries")
    if not entries:
        raise SystemExit(f"study: {path} has no entries")
    names = [e.get("name") for e in entries]
    for e in entries:
        if not e.get("name") or not e.get("config"):
            raise SystemExit(f"study: every entry needs a name and a config, got {e}")
        if any(c in e["name"] for c in " /\\"):
            raise SystemExit(f"study: entry name {e['name']!r} must not contain spaces or slashes")
        if e.get("init") is not None and e["init"] not in names:
            raise SystemExit(f"study: entry {e['name']!r} starts from unknown entry {e['init']!r}")
        if not e.get("train", True) and e.get("init") is None:
            raise SystemExit(f"study: entry {e['name']!r} has train=False and no init checkpoint to evaluate")
        if not osp.isfile(osp.join(ROOT, e["config"])):
            raise SystemExit(f"study: entry {e['name']!r}: config not found: {e['config']}")
    if len(set(names)) != len(names):
        raise SystemExit(f"study: entry names must be unique: {names}")
    cfg.setdefault("seeds", [0])
    cfg.setdefault("reference", names[0])
    cfg.setdefault("work_root", "work_dirs/study")
    cfg.setdefault("out_dir", "docs/study")
    cfg.setdefault("report", "docs/study.md")
    cfg.setdefault("benchmark", dict(num_images=8, batch=[1, 4], sizes=[None], runs=10, warmup=2))
    cfg.setdefault("comparisons", [])
    cfg.setdefault("targets", [])
    for c in cfg["comparisons"] + cfg["targets"]:
        for k in ("a", "b"):
            if c.get(k) not in names:
                raise SystemExit(f"study: {c.get('title')!r} names unknown entry {c.get(k)!r}")
    cfg["path"] = path
    return cfg


def seeds_of(study: dict, entry: dict) -> list[int]:
    return list(entry.get("seeds") or study["seeds"])


def by_name(study: dict) -> dict[str, dict]:
    return {e["name"]: e for e in study["entries"]}


def run_dir(study: dict, name: str, seed: int) -> str:
    return osp.join(ROOT, study["work_root"], name, f"seed{seed}")


def init_seed(entry: dict, seed: int) -> int:
    if entry.get("init_seed") is not None:
        return int(entry["init_seed"])
    return seed if not entry.get("train", True) else 0


def final_checkpoint(study: dict, name: str, seed: int) -> str | None:
    """The checkpoint a finished run evaluates: its trained one, or its init's for a training-free entry."""
    entry = by_name(study)[name]
    if not entry.get("train", True):
        return final_checkpoint(study, entry["init"], init_seed(entry, seed))
    done = osp.join(run_dir(study, name, seed), "train_done.json")
    if not osp.isfile(done):
        return None
    with open(done) as f:
        return json.load(f)["checkpoint"]


# ---------------------------------------------------------------------------------------------------------
# one run


def resolved_config(study: dict, entry: dict, seed: int, wd: str) -> str:
    """Write the entry's config with its cfg-options, the seed and the init checkpoint to ``wd/<name>.py``."""
    from mmengine.config import Config

    path = osp.join(wd, f"{entry['name']}.py")
    if osp.isfile(path):
        return path
    cfg = Config.fromfile(osp.join(ROOT, entry["config"]))
    options = dict(entry.get("cfg_options") or {})
    options["randomness.seed"] = seed
    if entry.get("init") is not None:
        init = final_checkpoint(study, entry["init"], init_seed(entry, seed))
        if init is None:
            raise RuntimeError(f"{entry['name']} seed {seed}: {entry['init']} has not been trained yet")
        options["load_from"] = init
    cfg.merge_from_dict(options)
    os.makedirs(wd, exist_ok=True)
    tmp = osp.join(wd, f".{entry['name']}.tmp.py")
    cfg.dump(tmp)
    os.replace(tmp, path)
    return path


def call(args: list[str], log_path: str) -> None:
    """Run a tool with this interpreter from the repository root, its output appended to ``log_path``."""
    with open(log_path, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([PY, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited with {proc.returncode}; see {log_path}")


def last_checkpoint(wd: str) -> str:
    with open(osp.join(wd, "last_checkpoint")) as f:
        return f.read().strip()


def train_run(study: dict, entry: dict, seed: int) -> str:
    """Train one run unless it is done or training-free; returns its resolved config."""
    name, wd = entry["name"], run_dir(study, entry["name"], seed)
    os.makedirs(wd, exist_ok=True)
    config = resolved_config(study, entry, seed, wd)
    done_path = osp.join(wd, "train_done.json")
    if entry.get("train", True) and not osp.isfile(done_path):
        log(f"train {name} seed {seed}")
        start = time.perf_counter()
        call(["tools/train.py", config, "--work-dir", wd, "--resume"], osp.join(wd, "train.log"))
        done = {"checkpoint": last_checkpoint(wd), "seconds_last_session": time.perf_counter() - start}
        with open(done_path, "w") as f:
            json.dump(done, f, indent=2)
    return config


def run_one(study: dict, entry: dict, seed: int) -> dict:
    """Train (unless training-free), evaluate and time one entry at one seed, skipping what is done; returns
    its record."""
    name, wd = entry["name"], run_dir(study, entry["name"], seed)
    config = train_run(study, entry, seed)
    checkpoint = final_checkpoint(study, name, seed)
    metrics_path = osp.join(wd, "metrics.json")
    if not osp.isfile(metrics_path):
        log(f"test {name} seed {seed}")
        call(
            ["tools/test.py", config, checkpoint, "--work-dir", osp.join(wd, "test"), "--metrics-out", metrics_path],
            osp.join(wd, "test.log"),
        )
    if entry.get("init") is not None and not study.get("no_benchmark"):
        run_benchmark(study, entry, seed, config, checkpoint)
    return collect(study, entry, seed, config, checkpoint)


def reducer_type(config_path: str) -> str:
    from mmengine.config import Config

    reducer = Config.fromfile(config_path).model.get("backbone", {}).get("reducer")
    return reducer["type"] if reducer else "none"


def collect(study: dict, entry: dict, seed: int, config: str, checkpoint: str) -> dict:
    wd = run_dir(study, entry["name"], seed)
    with open(osp.join(wd, "metrics.json")) as f:
        result = json.load(f)
    m = result["metrics"]
    blocks = sorted(int(k[len("keep_rate/block") :]) for k in m if k.startswith("keep_rate/block"))
    record = {
        "name": entry["name"],
        "reducer": reducer_type(config),
        "seed": seed,
        "train": bool(entry.get("train", True)),
        "config": entry["config"],
        "cfg_options": entry.get("cfg_options") or {},
        "init": entry.get("init"),
        "checkpoint": osp.relpath(checkpoint, ROOT),
        "box_mAP": m["coco/bbox_mAP"],
        "mask_mAP": m["coco/segm_mAP"],
        "coco": {k[len("coco/") :]: v for k, v in m.items() if k.startswith("coco/")},
        "keep_rate": m.get("keep_rate/mean", 1.0),
        "keep_rate_per_block": {str(b): m[f"keep_rate/block{b}"] for b in blocks},
        "flop_bound": m.get("flops/flop_bound", 1.0),
        "backbone_gmacs": m.get("flops/backbone_gmacs"),
        "test_images_per_s": result["images_per_s"],
    }
    done = osp.join(wd, "train_done.json")
    if osp.isfile(done):
        with open(done) as f:
            record["train_seconds_last_session"] = json.load(f)["seconds_last_session"]
    add_speed(study, entry, seed, record)
    return record


# ---------------------------------------------------------------------------------------------------------
# speed: each run against its starting model, side by side in one run


def size_tag(size) -> str:
    return "data" if size is None else f"{size}"


def bench_path(study: dict, name: str, seed: int, size) -> str:
    return osp.join(run_dir(study, name, seed), f"bench_{size_tag(size)}.json")


def run_benchmark(study: dict, entry: dict, seed: int, config: str, checkpoint: str) -> None:
    """Time this run's backbone against its starting model's on the test images, once per size."""
    bench = study["benchmark"]
    init, iseed = entry["init"], init_seed(entry, seed)
    ref_config = osp.join(run_dir(study, init, iseed), f"{init}.py")
    ref_checkpoint = final_checkpoint(study, init, iseed)
    for size in bench.get("sizes", [None]):
        out = bench_path(study, entry["name"], seed, size)
        if osp.isfile(out):
            continue
        log(f"benchmark {entry['name']} seed {seed} against {init} at {size_tag(size)}")
        args = ["tools/analysis_tools/benchmark.py", "detector", ref_config, config]
        args += ["--checkpoints", ref_checkpoint, checkpoint, "--dataset", "--num-images", str(bench["num_images"])]
        args += ["--backbone-only", "--batch", *map(str, bench["batch"])]
        args += ["--runs", str(bench["runs"]), "--warmup", str(bench["warmup"])]
        if bench.get("threads"):
            args += ["--threads", str(bench["threads"])]
        if size is not None:
            args += ["--cfg-options", f"test_dataloader.dataset.pipeline.1.scale=({size},{size})"]
        call([*args, "--json-out", out + ".tmp"], out[: -len(".json")] + ".log")
        os.replace(out + ".tmp", out)


def add_speed(study: dict, entry: dict, seed: int, record: dict) -> None:
    """Put the run's measured backbone speed-ups into its record (1 for the reference entries)."""
    for size in study["benchmark"].get("sizes", [None]):
        suffix = "" if size is None else f"_{size}"
        if entry.get("init") is None:
            for b in study["benchmark"].get("batch", [1]):
                record[f"speedup_b{b}{suffix}"] = 1.0
            continue
        path = bench_path(study, entry["name"], seed, size)
        if not osp.isfile(path):
            continue
        with open(path) as f:
            result = json.load(f)
        label = entry["name"]
        for res in result["results"]:
            model = res["models"].get(label) or res["models"].get(f"{label}#1")
            if model is None:
                continue
            b = res["batch"]
            record[f"speedup_b{b}{suffix}"] = model["backbone"]["speedup"]
            record[f"speedup_best_b{b}{suffix}"] = model["backbone"]["speedup_best"]
            record[f"bench_flop_bound_b{b}{suffix}"] = model["backbone"]["flop_bound"]
            record[f"measured_over_bound_b{b}{suffix}"] = model["backbone"]["measured_over_bound"]
            record[f"bench_input_hw{suffix}"] = res["input_hw"]


# ---------------------------------------------------------------------------------------------------------
# summary and report


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan, 0
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), sd, len(values)


def summarise(study: dict, records: list[dict]) -> dict[str, dict]:
    """Entry name -> per-figure (mean, sd, n) over seeds, in the study's entry order."""
    groups = defaultdict(list)
    for r in records:
        groups[r["name"]].append(r)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "seed"})
    out = {}
    for e in study["entries"]:
        rs = groups.get(e["name"])
        if rs:
            out[e["name"]] = {k: mean_sd([r.get(k) for r in rs]) for k in keys}
            out[e["name"]]["reducer"] = rs[0]["reducer"]
            out[e["name"]]["train"] = rs[0]["train"]
    return out


def t_quantile(df: float) -> float:
    if df < 1:
        return T975[1]
    known = [d for d in T975 if d <= df]
    return T975[max(known)] if df < 30 else T975_INF


def compare(summary: dict, a: str, b: str, key: str) -> dict | None:
    """Welch's comparison of the means of ``key`` (x 100 for mAP) of entries a and b over their seeds."""
    if a not in summary or b not in summary:
        return None
    (ma, sa, na), (mb, sb, nb) = summary[a][key], summary[b][key]
    if na < 2 or nb < 2:
        return {"diff": 100 * (ma - mb), "se": math.nan, "beyond_noise": None, "n": (na, nb)}
    va, vb = sa**2 / na, sb**2 / nb
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (na - 1) + vb**2 / (nb - 1)) or 1e-300)
    diff = ma - mb
    beyond = abs(diff) > t_quantile(df) * se if se > 0 else diff != 0
    return {"diff": 100 * diff, "se": 100 * se, "beyond_noise": bool(beyond), "n": (na, nb), "df": df}


def fmt(ms: tuple[float, float, int], scale: float = 1.0, digits: int = 1) -> str:
    m, s, n = ms
    if n == 0 or math.isnan(m):
        return "-"
    if n < 2 or math.isnan(s):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def describe(c: dict | None) -> str:
    if c is None:
        return "not measured yet"
    if c["beyond_noise"] is None:
        return f"{c['diff']:+.1f} (one seed each so far: no noise estimate)"
    verdict = "beyond the seed noise" if c["beyond_noise"] else "within the seed noise"
    return f"{c['diff']:+.1f} ± {c['se']:.1f} (standard error), {verdict}"


def pareto_figure(study: dict, summary: dict, path: str, speed_key: str) -> bool:
    """Box mAP against measured backbone speed-up, one point per entry, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(n, s) for n, s in summary.items() if speed_key in s and s[speed_key][2] > 0]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, s in points:
        x, xs, _ = s[speed_key]
        y, ys, _ = s["box_mAP"]
        marker = "o" if s["train"] else "s"
        ax.errorbar(
            x, 100 * y, xerr=0 if math.isnan(xs) else xs, yerr=0 if math.isnan(ys) else 100 * ys, fmt=marker, capsize=3
        )
        ax.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"measured backbone speed-up over dense ({speed_key})")
    ax.set_ylabel("box mAP (x100), val")
    ax.set_title("Accuracy against measured speed (circles: fine-tuned, squares: training-free)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(study: dict, records: list[dict]) -> str:
    """The markdown report, and the figure next to results.json."""
    summary = summarise(study, records)
    out_dir = osp.join(ROOT, study["out_dir"])
    report = osp.join(ROOT, study["report"])
    sizes = study["benchmark"].get("sizes", [None])
    batches = study["benchmark"].get("batch", [1])
    speed_cols = [
        (f"speedup_b{b}" + ("" if s is None else f"_{s}"), f"b{b} {size_tag(s)}") for s in sizes for b in batches
    ]
    fig_key = speed_cols[0][0] if speed_cols else None
    big = [k for k, _ in speed_cols if k.startswith("speedup_b1_")]
    if big:
        fig_key = big[0]
    fig_name = "pareto.png"
    has_fig = fig_key is not None and pareto_figure(study, summary, osp.join(out_dir, fig_name), fig_key)
    rel_out = osp.relpath(out_dir, osp.dirname(report))
    lines = [
        "# The study: every method on one detector, over seeds",
        "",
        f"Generated by `tools/analysis_tools/study.py {study['path']}` from `{study['out_dir']}/results.json` "
        "(one record per run). Do not edit by hand: rerun the command (finished runs are skipped; "
        "`--render-only` rewrites this page from the results).",
        "",
        f"- Study file: `{study['path']}`; seeds {study['seeds']}; reference for speed: `{study['reference']}`.",
        f"- Runs collected: {len(records)}.",
        "- mAP is COCO mAP x 100 on the val split; mean ± standard deviation over seeds (n = seeds).",
        "- keep rate: realised mean keep rate over the reducing blocks on the val images; FLOP bound: dense backbone "
        "MACs / realised backbone MACs, counted from the tokens each block ran on the val images.",
        "- speed-up: measured backbone speed-up over the reference, median of paired round-robin runs "
        f"(`benchmark.py detector --backbone-only`, {study['benchmark'].get('num_images')} test images, batch "
        f"{', '.join(map(str, batches))}), at the data's size and at the sizes shown.",
        "",
        "| entry | reducer | trained | n | box mAP | mask mAP | keep rate | FLOP bound | "
        + " | ".join(f"speed-up {label}" for _, label in speed_cols)
        + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in speed_cols) + " |",
    ]
    for name, s in summary.items():
        cells = [
            name,
            s["reducer"],
            "yes" if s["train"] else "no",
            str(s["box_mAP"][2]),
            fmt(s["box_mAP"], 100),
            fmt(s["mask_mAP"], 100),
            fmt(s["keep_rate"], 1, 3),
            fmt(s["flop_bound"], 1, 2),
            *(fmt(s[k], 1, 2) if k in s else "-" for k, _ in speed_cols),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if has_fig:
        lines += ["", f"![box mAP against measured backbone speed-up ({fig_key})]({rel_out}/{fig_name})"]
    if study["targets"]:
        lines += ["", "## Targets", ""]
        for t in study["targets"]:
            box, mask = compare(summary, t["a"], t["b"], "box_mAP"), compare(summary, t["a"], t["b"], "mask_mAP")
            if box is None or mask is None:
                lines.append(f"- {t['title']}: not measured yet")
                continue
            drop = t.get("max_drop", 0.5)
            met = -box["diff"] <= drop and -mask["diff"] <= drop
            lines.append(
                f"- {t['title']}: box {describe(box)}, mask {describe(mask)} -> "
                f"{'met' if met else 'missed'} (allowed drop {drop} points)"
            )
    if study["comparisons"]:
        lines += ["", "## Comparisons (a - b, mAP x 100, Welch's test at 95% over seeds)", ""]
        for c in study["comparisons"]:
            box, mask = compare(summary, c["a"], c["b"], "box_mAP"), compare(summary, c["a"], c["b"], "mask_mAP")
            lines.append(f"- {c['title']} (`{c['a']}` - `{c['b']}`): box {describe(box)}; mask {describe(mask)}")
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python tools/analysis_tools/study.py {study['path']}                     # everything (resumes)",
        f"python tools/analysis_tools/study.py {study['path']} --only NAME --seeds 0  # one entry, one seed",
        "```",
        "",
        f"Each run's folder (`{study['work_root']}/NAME/seedS/`) holds its resolved config `NAME.py`, which "
        "reproduces it alone: `python tools/train.py NAME.py` then `python tools/test.py NAME.py CHECKPOINT`.",
        "",
    ]
    text = "\n".join(lines)
    os.makedirs(osp.dirname(report), exist_ok=True)
    with open(report, "w") as f:
        f.write(text)
    return text


def results_path(study: dict) -> str:
    return osp.join(ROOT, study["out_dir"], "results.json")


def load_records(study: dict) -> dict[tuple[str, int], dict]:
    """The records in ``results.json`` (those of the study's current entries), by (name, seed)."""
    path = results_path(study)
    if not osp.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    names = by_name(study)
    return {(r["name"], r["seed"]): r for r in data.get("records", []) if r.get("name") in names}


def write_results(study: dict, records: dict[tuple[str, int], dict]) -> None:
    """``results.json``, records in the study's entry and seed order."""
    order = {e["name"]: i for i, e in enumerate(study["entries"])}
    rows = sorted(records.values(), key=lambda r: (order[r["name"]], r["seed"]))
    path = results_path(study)
    os.makedirs(osp.dirname(path), exist_ok=True)
    data = {"study": study["path"], "seeds": study["seeds"], "reference": study["reference"], "records": rows}
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def ensure_checkpoint(study: dict, entry: dict, seed: int) -> None:
    """A recorded run that a pending one starts from: retrain it if its checkpoint is not in this checkout."""
    if not entry.get("train", True):
        ensure_checkpoint(study, by_name(study)[entry["init"]], init_seed(entry, seed))
    elif final_checkpoint(study, entry["name"], seed) is None:
        log(f"{entry['name']} seed {seed} is recorded but its checkpoint is not here: training it again (seeded)")
        train_run(study, entry, seed)
    else:
        resolved_config(study, entry, seed, run_dir(study, entry["name"], seed))


def order_runs(study: dict, only: set[str] | None, seeds: set[int] | None) -> list[tuple[dict, int]]:
    """Seed-major (every entry at seed 0, then seed 1, ...), so that a partial study covers every entry;
    a run's init comes first when it is not in the selection."""
    runs = []
    all_seeds = sorted({s for e in study["entries"] for s in seeds_of(study, e)})
    for seed in all_seeds:
        for e in study["entries"]:
            if seed in seeds_of(study, e) and (only is None or e["name"] in only) and (seeds is None or seed in seeds):
                runs.append((e, seed))
    return runs


def needed_inits(study: dict, runs: list[tuple[dict, int]]) -> list[tuple[dict, int]]:
    names = by_name(study)
    out, seen = [], set()

    def visit(entry: dict, seed: int) -> None:
        if entry.get("init") is not None:
            visit(names[entry["init"]], init_seed(entry, seed))
        if (entry["name"], seed) not in seen:
            seen.add((entry["name"], seed))
            out.append((entry, seed))

    for e, s in runs:
        visit(e, s)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("study", help="the study file (e.g. configs/study/shapes.py)")
    parser.add_argument("--only", nargs="+", help="run these entries only (and what they start from)")
    parser.add_argument("--seeds", nargs="+", type=int, help="run these seeds only")
    parser.add_argument("--render-only", action="store_true", help="render results.json again, run nothing")
    parser.add_argument("--no-benchmark", action="store_true", help="skip the speed measurement")
    args = parser.parse_args(argv)
    study = load_study(args.study)
    if args.only:
        unknown = set(args.only) - set(by_name(study))
        if unknown:
            raise SystemExit(f"study: --only names unknown entries {sorted(unknown)}; entries: {list(by_name(study))}")
    failures = []
    records = load_records(study)
    study["no_benchmark"] = args.no_benchmark
    if not args.render_only:
        selection = order_runs(study, set(args.only) if args.only else None, set(args.seeds or []) or None)
        pending = [(e, s) for e, s in selection if (e["name"], s) not in records]
        runs = needed_inits(study, pending)
        log(f"{len(pending)} of {len(selection)} runs in this selection still to do")
        for entry, seed in runs:
            try:
                if (entry["name"], seed) in records:
                    ensure_checkpoint(study, entry, seed)
                    continue
                records[(entry["name"], seed)] = run_one(study, entry, seed)
            except RuntimeError as e:  # a failed run is reported and the study goes on with the others
                failures.append(str(e))
                log(f"FAILED: {e}")
                continue
            write_results(study, records)
            render(study, list(records.values()))
    write_results(study, records)
    render(study, list(records.values()))
    log(f"{len(records)} runs collected -> {study['out_dir']}/results.json, {study['report']}")
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
