"""Memory under load: detector inference over many images of varying sizes must keep the process's memory
flat (no growth from shapes, masks or position embeddings cached per input size).

For each config (default: the dense and the SViT shapes models) and each batch size, the detector predicts
``--num-images`` images whose height and width are drawn independently from ``[--min-size, --max-size]``, one
batch after another (``--passes 2``: twice over the same images, so that caches keyed by input shape are full
in the second pass and any growth there is a leak). The resident set size (RSS, from /proc/self/statm) is read
after every batch, after garbage collection and glibc's ``malloc_trim`` (which returns memory the allocator
keeps for reuse, so the RSS counts live memory; the RSS before the trim is kept too, as ``rss_untrimmed_mb``).
The first ``--warmup`` fraction of the images is the warm-up (lazily built kernels, first allocations); the
report compares the RSS after it with the RSS at the end::

    python tools/analysis_tools/memory_check.py [CONFIG ...] [--checkpoint CKPT ...] --num-images 240 \\
        --batch-sizes 1 8 --min-size 64 --max-size 320 --passes 2 --json-out work_dirs/memory_check.json

Reported per config and batch size: ``rss_start_mb`` (before the first batch), ``rss_warm_mb`` (after the
warm-up), ``rss_end_mb``, ``rss_max_mb``, ``rss_untrimmed_max_mb``, ``growth_after_warmup_mb`` (end - warm),
``slope_mb_per_100_images`` (least-squares slope of RSS over the images after the warm-up),
``rss_pass_end_mb`` and ``growth_in_last_pass_mb`` (RSS growth during the last pass) and the per-batch
``rss_mb`` trace. Without checkpoints the models have random weights, and reducers with a ``calibrating``
switch (SViT) calibrate their thresholds on the warm-up batches, so the rest runs the per-image threshold rule
(variable token counts). The images are random pixels: memory is about shapes, not content. Runs on the CPU
under ``torch.no_grad``, as MMDetection's test loop; set the threads with ``--threads``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import os.path as osp
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_CONFIGS = [
    osp.join(ROOT, "configs/dense/mask-rcnn_vit-t_simplefpn_shapes.py"),
    osp.join(ROOT, "configs/svit/mask-rcnn_svit-t_simplefpn_shapes.py"),
]


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; elsewhere the peak RSS from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def release_freed_memory() -> bool:
    """Give memory freed by the program back to the OS (glibc ``malloc_trim``), so that the RSS read next
    counts live memory rather than what the allocator keeps for reuse. False where unavailable."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def image_sizes(num: int, min_size: int, max_size: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(min_size, max_size + 1, size=2)) for _ in range(num)]


def make_batch(model, sizes: list[tuple[int, int]], rng: np.random.Generator) -> dict:
    """Random uint8 images of the given sizes, preprocessed as MMDetection's test loop does."""
    from mmdet.structures import DetDataSample

    inputs, samples = [], []
    for h, w in sizes:
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)))
        meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
        samples.append(DetDataSample(metainfo=meta))
    return model.data_preprocessor({"inputs": inputs, "data_samples": samples}, training=False)


def build_model(config: str, checkpoint: str | None, cfg_options: dict | None):
    from mmengine.config import Config

    from tokenprune.mmdet_plugin.detectors import build_detector, load_weights

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.model.backbone.init_cfg = None
    model = build_detector(cfg, seed=0)
    if checkpoint:
        load_weights(model, checkpoint)
    return model.eval()


def slope_per_100(values: list[float], counts: list[int]) -> float:
    if len(values) < 2:
        return 0.0
    x, y = np.asarray(counts, dtype=float), np.asarray(values, dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 100) if np.ptp(x) > 0 else 0.0


@torch.no_grad()
def check(
    model,
    sizes: list[tuple[int, int]],
    batch_size: int,
    warmup: float,
    seed: int,
    calibrate: bool = False,
    passes: int = 1,
) -> dict:
    """Predict ``sizes`` in batches of ``batch_size``, ``passes`` times over the same images; the RSS after
    every batch and its summary. With ``calibrate``, a reducer with a ``calibrating`` switch calibrates on the
    warm-up batches of the first pass."""
    reducer = getattr(model.backbone, "reducer", None)
    calibrate = calibrate and reducer is not None and hasattr(reducer, "calibrating")
    warm_images = max(batch_size, int(round(warmup * len(sizes))))
    gc.collect()
    release_freed_memory()
    start = rss_mb()
    trace, held, done, pass_ends, detections = [], [], [], [], 0
    began = time.perf_counter()
    for p in range(passes):
        rng = np.random.default_rng(seed)  # every pass sees the same pixels
        for i in range(0, len(sizes), batch_size):
            if calibrate:
                reducer.calibrating = p == 0 and i < warm_images
            data = make_batch(model, sizes[i : i + batch_size], rng)
            results = model.predict(data["inputs"], data["data_samples"])
            detections += sum(len(r.pred_instances) for r in results)
            del data, results
            gc.collect()
            held.append(round(rss_mb(), 2))
            release_freed_memory()
            trace.append(round(rss_mb(), 2))
            done.append(p * len(sizes) + min(i + batch_size, len(sizes)))
        pass_ends.append(trace[-1])
    seconds = time.perf_counter() - began
    if calibrate:
        reducer.calibrating = False
    warm_index = next(k for k, n in enumerate(done) if n >= warm_images)
    after = trace[warm_index:]
    return {
        "batch_size": batch_size,
        "num_images": len(sizes),
        "passes": passes,
        "warmup_images": done[warm_index],
        "rss_start_mb": round(start, 2),
        "rss_warm_mb": trace[warm_index],
        "rss_end_mb": trace[-1],
        "rss_max_mb": max(trace),
        "rss_untrimmed_max_mb": max(held),
        "growth_after_warmup_mb": round(trace[-1] - trace[warm_index], 2),
        "slope_mb_per_100_images": round(slope_per_100(after, done[warm_index:]), 3),
        "rss_pass_end_mb": pass_ends,
        "growth_in_last_pass_mb": round(pass_ends[-1] - pass_ends[-2], 2) if passes > 1 else None,
        "detections": detections,
        "seconds": round(seconds, 2),
        "images_per_s": round(passes * len(sizes) / seconds, 3),
        "rss_mb": trace,
        "rss_untrimmed_mb": held,
        "images_done": done,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Detector memory over many images of varying sizes")
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="detector configs (default: shapes)")
    parser.add_argument("--checkpoint", nargs="*", default=None, help="one checkpoint per config (else random)")
    parser.add_argument("--num-images", type=int, default=240)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-size", type=int, default=64, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=320, help="largest image side in pixels")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the images used as warm-up")
    parser.add_argument(
        "--passes", type=int, default=1, help="go over the same images this many times (2: growth in the second pass)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="applied to every config")
    parser.add_argument("--json-out", help="write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and len(args.checkpoint) != len(args.configs):
        parser.error(f"--checkpoint needs one file per config: {len(args.checkpoint)} for {len(args.configs)}")
    if not 1 <= args.min_size <= args.max_size:
        parser.error("--min-size must be >= 1 and <= --max-size")
    if args.passes < 1:
        parser.error("--passes must be >= 1")
    if not 0.0 <= args.warmup < 1.0:
        parser.error("--warmup must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import tokenprune  # noqa: F401  (registers the models)

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = image_sizes(args.num_images, args.min_size, args.max_size, args.seed)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("configs", "checkpoint", "json_out")},
        "results": {},
    }
    for i, config in enumerate(args.configs):
        checkpoint = args.checkpoint[i] if args.checkpoint else None
        model = build_model(config, checkpoint, args.cfg_options)
        name = osp.splitext(osp.basename(config))[0]
        report["results"][name] = []
        for batch_size in args.batch_sizes:
            result = check(
                model, sizes, batch_size, args.warmup, args.seed, calibrate=checkpoint is None, passes=args.passes
            )
            report["results"][name].append(result)
            print(
                f"{name} batch {batch_size}: {result['num_images']} images, RSS {result['rss_start_mb']:.0f} MiB "
                f"at start, {result['rss_warm_mb']:.0f} after {result['warmup_images']} warm-up images, "
                f"{result['rss_end_mb']:.0f} at the end (max {result['rss_max_mb']:.0f}): "
                f"{result['growth_after_warmup_mb']:+.1f} MiB after warm-up, "
                f"{result['slope_mb_per_100_images']:+.2f} MiB per 100 images, {result['images_per_s']:.2f} images/s"
                + (
                    f", {result['growth_in_last_pass_mb']:+.1f} MiB in pass {args.passes} over the same images"
                    if args.passes > 1
                    else ""
                )
            )
        del model
        gc.collect()
    if args.json_out:
        os.makedirs(osp.dirname(osp.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
