"""A small synthetic COCO instance-segmentation dataset of coloured shapes.

It lets a tiny ViT Mask R-CNN train and be evaluated on a CPU in minutes, without downloading anything.
``make_shapes_dataset(root)`` writes, once, this layout:

    root/train/000000.png, 000001.png, ...
    root/val/000000.png, ...
    root/annotations/instances_train.json
    root/annotations/instances_val.json
    root/.complete                          (the generation parameters, as JSON)

Each image has a non-uniform background (a linear colour gradient, faint stripes and blobs, per-pixel
noise) and 2 to 6 filled shapes of three classes (``SHAPES_CLASSES``), each in a colour clearly different
from what lies under it. Shapes may overlap; later ones occlude earlier ones, and an instance's mask is its
visible part. A shape that would leave any instance with less than 30% of its area or 64 pixels visible is
not drawn, so every drawn pixel belongs to an annotated instance. The same arguments give byte-identical
files. Only numpy, Pillow, pycocotools and the standard library are used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES_CLASSES = ("circle", "square", "triangle")
SPLITS = ("train", "val")
FORMAT_VERSION = 1
MARKER_NAME = ".complete"

MIN_INSTANCES, MAX_INSTANCES = 2, 6
MIN_EXTENT, MAX_EXTENT = 0.12, 0.40
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 64
MIN_COLOUR_DISTANCE = 100.0
PLACEMENT_TRIES_PER_INSTANCE = 25
COLOUR_TRIES = 64
CONTRAST_MARGIN = 4
MIN_IMAGE_SIDE = 48
NOISE_SIGMA = 3.0
PNG_OPTIONS: dict[str, Any] = {"format": "PNG", "compress_level": 3, "optimize": False}


@dataclass(frozen=True)
class ShapeInstance:
    """One drawn shape: its class id (1-based), flat colour, full mask and visible mask (bool, H x W)."""

    category_id: int
    colour: tuple[int, int, int]
    full_mask: np.ndarray
    visible_mask: np.ndarray


@dataclass(frozen=True)
class ShapesSample:
    """One rendered image (H x W x 3, uint8) and its instances in drawing order."""

    image: np.ndarray
    instances: tuple[ShapeInstance, ...]


def make_shapes_dataset(
    root: str | os.PathLike[str],
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 100,
    image_size: tuple[int, int] = (256, 256),
) -> Path:
    """Generate the dataset under ``root`` if it is not there yet and return ``root`` as a Path.

    ``image_size`` is (height, width). Safe to call from several processes at once: each builds into a
    temporary sibling folder and renames it into place; a process that loses the race discards its copy.
    Raises ValueError if ``root`` exists but is incomplete or was made with other parameters.
    """
    root = Path(root)
    params = _parameters(seed, num_train, num_val, image_size)
    if _is_complete(root, params):
        return root
    _check_absent_or_empty(root, params)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(staging, 0o755)
        _write_dataset(staging, params)
        _publish(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def render_sample(seed: int, split: str, index: int, image_size: tuple[int, int]) -> ShapesSample:
    """Render image ``index`` of ``split`` exactly as ``make_shapes_dataset`` writes it."""
    height, width = image_size
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    placed: list[tuple[int, tuple[int, int, int], np.ndarray]] = []
    target = int(rng.integers(MIN_INSTANCES, MAX_INSTANCES + 1))
    for _ in range(target * PLACEMENT_TRIES_PER_INSTANCE):
        if len(placed) == target:
            break
        category_id, full_mask = _random_shape(rng, height, width)
        if not _placement_keeps_visible(label, [m for _, _, m in placed], full_mask):
            continue
        colour = _contrasting_colour(rng, image, label, [c for _, c, _ in placed], full_mask)
        image[full_mask] = colour
        label[full_mask] = len(placed) + 1
        placed.append((category_id, colour, full_mask))
    instances = tuple(
        ShapeInstance(category_id, colour, full_mask, label == k + 1)
        for k, (category_id, colour, full_mask) in enumerate(placed)
    )
    return ShapesSample(image=image, instances=instances)


def _parameters(seed: int, num_train: int, num_val: int, image_size: Sequence[int]) -> dict[str, Any]:
    height, width = (int(v) for v in image_size)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size sides must be >= {MIN_IMAGE_SIDE}, got {(height, width)}")
    return {
        "format_version": FORMAT_VERSION,
        "image_size": [height, width],
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
    }


def _annotation_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    annotations_present = all(_annotation_path(root, split).is_file() for split in SPLITS)
    return annotations_present and _read_marker(root) == params


def _check_absent_or_empty(root: Path, params: dict[str, Any]) -> None:
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    found = _read_marker(root)
    state = "is incomplete" if found in (None, params) else f"was generated with {found}"
    raise ValueError(
        f"Shapes dataset folder {root} {state}, but {params} was asked for. "
        f"Delete the folder {root} and run again."
    )


def _publish(staging: Path, root: Path, params: dict[str, Any]) -> None:
    try:
        os.replace(staging, root)
    except OSError:
        if not _is_complete(root, params):
            _check_absent_or_empty(root, params)
            raise


def _write_dataset(target: Path, params: dict[str, Any]) -> None:
    image_size = (params["image_size"][0], params["image_size"][1])
    (target / "annotations").mkdir()
    for split in SPLITS:
        coco = _write_split(target / split, params["seed"], split, params[f"num_{split}"], image_size)
        _write_json(_annotation_path(target, split), coco)
    _write_json(target / MARKER_NAME, params)


def _write_split(folder: Path, seed: int, split: str, count: int, image_size: tuple[int, int]) -> dict:
    folder.mkdir()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        sample = render_sample(seed, split, index, image_size)
        file_name = f"{index:06d}.png"
        Image.fromarray(sample.image).save(folder / file_name, **PNG_OPTIONS)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size[0], "width": image_size[1]}
        )
        for instance in sample.instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, instance))
    return _coco_document(split, images, annotations)


def _coco_document(split: str, images: list[dict], annotations: list[dict]) -> dict[str, Any]:
    return {
        "info": {
            "description": f"tokenprune synthetic shapes, {split} split",
            "version": str(FORMAT_VERSION),
        },
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES_CLASSES)
        ],
    }


def _annotation(annotation_id: int, image_id: int, instance: ShapeInstance) -> dict[str, Any]:
    mask = instance.visible_mask
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


def _write_json(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    path.write_bytes(text.encode("ascii") + b"\n")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    image = _gradient(rng, xs, ys) + (_stripes(rng, xs, ys) + _blobs(rng, xs, ys))[..., None]
    image += rng.standard_normal(size=(height, width, 3), dtype=np.float32) * np.float32(NOISE_SIGMA)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _gradient(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    start = rng.uniform(30.0, 225.0, size=3)
    end = np.clip(start + rng.uniform(-70.0, 70.0, size=3), 0.0, 255.0)
    angle = rng.uniform(0.0, 2 * math.pi)
    t = _unit_ramp(xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle)))
    return start.astype(np.float32) + t[..., None] * (end - start).astype(np.float32)


def _unit_ramp(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return (values - low) / max(float(high - low), 1e-6)


def _stripes(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0.0, math.pi)
    period = rng.uniform(12.0, 48.0)
    amplitude = rng.uniform(3.0, 8.0)
    phase = rng.uniform(0.0, 2 * math.pi)
    along = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))
    return np.float32(amplitude) * np.sin(np.float32(2 * math.pi / period) * along + np.float32(phase))


def _blobs(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    height, width = ys.shape[0], xs.shape[1]
    total = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.0, width), rng.uniform(0.0, height)
        sigma = rng.uniform(0.1, 0.25) * min(height, width)
        amplitude = rng.uniform(6.0, 14.0) * rng.choice([-1.0, 1.0])
        column = np.exp(-((xs - np.float32(cx)) ** 2) / np.float32(2 * sigma**2))
        row = np.exp(-((ys - np.float32(cy)) ** 2) / np.float32(2 * sigma**2))
        total += np.float32(amplitude) * row * column
    return total


def _random_shape(rng: np.random.Generator, height: int, width: int) -> tuple[int, np.ndarray]:
    category_id = int(rng.integers(1, len(SHAPES_CLASSES) + 1))
    radius = rng.uniform(MIN_EXTENT, MAX_EXTENT) * min(height, width) / 2
    centre = (rng.uniform(radius, width - 1 - radius), rng.uniform(radius, height - 1 - radius))
    angle = rng.uniform(0.0, 2 * math.pi)
    if SHAPES_CLASSES[category_id - 1] == "circle":
        return category_id, _circle_mask(centre, radius, height, width)
    if SHAPES_CLASSES[category_id - 1] == "square":
        angles = [angle + k * math.pi / 2 for k in range(4)]
    else:
        angles = [angle + k * 2 * math.pi / 3 + rng.uniform(-0.25, 0.25) for k in range(3)]
    return category_id, _polygon_mask(_polygon(centre, radius, angles), height, width)


def _polygon(centre: tuple[float, float], radius: float, angles: list[float]) -> list[tuple[float, float]]:
    return [(centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)) for a in angles]


def _circle_mask(centre: tuple[float, float], radius: float, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    ImageDraw.Draw(canvas).ellipse(box, fill=1)
    return np.asarray(canvas) > 0


def _polygon_mask(points: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas) > 0


def _placement_keeps_visible(label: np.ndarray, earlier: list[np.ndarray], candidate: np.ndarray) -> bool:
    new_label = np.where(candidate, len(earlier) + 1, label)
    visible = np.bincount(new_label.ravel(), minlength=len(earlier) + 2)[1:]
    full = np.array([m.sum() for m in earlier] + [candidate.sum()])
    return bool(np.all(visible >= np.maximum(MIN_VISIBLE_FRACTION * full, MIN_VISIBLE_PIXELS)))


def _contrasting_colour(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    earlier_colours: list[tuple[int, int, int]],
    mask: np.ndarray,
) -> tuple[int, int, int]:
    references = _colours_around(image, label, earlier_colours, mask)
    best, best_distance = (0, 0, 0), -1.0
    for _ in range(COLOUR_TRIES):
        colour = rng.integers(0, 256, size=3)
        distance = float(np.min(np.linalg.norm(references - colour, axis=1)))
        if distance > best_distance:
            best, best_distance = (int(colour[0]), int(colour[1]), int(colour[2])), distance
        if distance >= MIN_COLOUR_DISTANCE:
            break
    return best


def _colours_around(
    image: np.ndarray, label: np.ndarray, earlier_colours: list[tuple[int, int, int]], mask: np.ndarray
) -> np.ndarray:
    window = _expanded_box(mask, CONTRAST_MARGIN)
    labels, pixels = label[window], image[window]
    references = [earlier_colours[k - 1] for k in np.unique(labels[labels > 0])]
    background = pixels[labels == 0]
    if len(background):
        references.append(tuple(background.mean(axis=0)))
    return np.array(references, dtype=np.float64).reshape(-1, 3)


def _expanded_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return (
        slice(max(int(ys.min()) - margin, 0), int(ys.max()) + margin + 1),
        slice(max(int(xs.min()) - margin, 0), int(xs.max()) + margin + 1),
    )
