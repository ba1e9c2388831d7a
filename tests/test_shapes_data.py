"""Tests for tokenprune.data.shapes, the synthetic shapes dataset (numpy, Pillow and pycocotools only)."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tokenprune.data import SHAPES_CLASSES, make_shapes_dataset, shapes

SMALL = {"seed": 0, "num_train": 6, "num_val": 3, "image_size": (64, 96)}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "small", **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _coco(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


def _pixels(root: Path, split: str, file_name: str) -> np.ndarray:
    return np.asarray(Image.open(root / split / file_name).convert("RGB"))


def _visible_masks(coco: COCO, image_id: int) -> list[np.ndarray]:
    return [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]


def test_layout_and_return_value(small_root: Path) -> None:
    names = set(_files(small_root))
    expected_images = {f"train/{i:06d}.png" for i in range(6)} | {f"val/{i:06d}.png" for i in range(3)}
    assert expected_images <= names
    assert {"annotations/instances_train.json", "annotations/instances_val.json", ".complete"} <= names
    assert len(names) == len(expected_images) + 3
    assert isinstance(small_root, Path) and small_root.name == "small"


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first = _files(make_shapes_dataset(tmp_path / "a", **SMALL))
    second = _files(make_shapes_dataset(tmp_path / "b", **SMALL))
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_seeds_and_splits_give_different_images(tmp_path: Path, small_root: Path) -> None:
    other = make_shapes_dataset(tmp_path / "seed1", **{**SMALL, "seed": 1})
    assert not np.array_equal(_pixels(small_root, "train", "000000.png"), _pixels(other, "train", "000000.png"))
    assert not np.array_equal(_pixels(small_root, "train", "000000.png"), _pixels(small_root, "val", "000000.png"))


def test_annotations_are_coco_and_match_their_masks(small_root: Path) -> None:
    for split, count in (("train", 6), ("val", 3)):
        coco = _coco(small_root, split)
        categories = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"], c["supercategory"]) for c in categories] == [
            (1, "circle", "shape"),
            (2, "square", "shape"),
            (3, "triangle", "shape"),
        ]
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        for image in coco.loadImgs(coco.getImgIds()):
            assert (image["height"], image["width"]) == (64, 96)
            assert _pixels(small_root, split, image["file_name"]).shape == (64, 96, 3)
            assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= 6
        for ann in coco.dataset["annotations"]:
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            ys, xs = np.nonzero(mask)
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["iscrowd"] == 0
            assert ann["area"] == float(mask.sum()) >= shapes.MIN_VISIBLE_PIXELS
            assert ann["bbox"] == [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1),
            ]
    train = _coco(small_root, "train")
    assert {a["category_id"] for a in train.dataset["annotations"]} == {1, 2, 3}
    assert SHAPES_CLASSES == ("circle", "square", "triangle")


def test_masks_are_disjoint_flat_and_contrast_with_background(small_root: Path) -> None:
    coco = _coco(small_root, "train")
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = _pixels(small_root, "train", image["file_name"]).astype(np.float64)
        masks = _visible_masks(coco, image["id"])
        assert np.sum(masks, axis=0).max() == 1
        background = ~np.any(masks, axis=0)
        for mask in masks:
            colour = pixels[mask][0]
            assert np.all(pixels[mask] == colour)
            ys, xs = np.nonzero(mask)
            window = np.zeros_like(mask)
            window[max(ys.min() - 4, 0) : ys.max() + 5, max(xs.min() - 4, 0) : xs.max() + 5] = True
            nearby = pixels[window & background]
            if len(nearby) >= 20:
                assert np.linalg.norm(nearby.mean(axis=0) - colour) > 60


def test_some_shapes_overlap_and_annotations_keep_only_the_visible_part(small_root: Path) -> None:
    occluded = 0
    for index in range(SMALL["num_train"]):
        sample = shapes.render_sample(SMALL["seed"], "train", index, SMALL["image_size"])
        assert np.array_equal(sample.image, _pixels(small_root, "train", f"{index:06d}.png"))
        for instance in sample.instances:
            visible, full = int(instance.visible_mask.sum()), int(instance.full_mask.sum())
            assert not np.any(instance.visible_mask & ~instance.full_mask)
            assert visible >= max(shapes.MIN_VISIBLE_FRACTION * full, shapes.MIN_VISIBLE_PIXELS)
            occluded += visible < full
    assert occluded >= 1
    coco = _coco(small_root, "train")
    areas = [a["area"] for a in coco.dataset["annotations"]]
    full_areas = [
        float(i.full_mask.sum())
        for index in range(SMALL["num_train"])
        for i in shapes.render_sample(SMALL["seed"], "train", index, SMALL["image_size"]).instances
    ]
    assert len(areas) == len(full_areas) and any(a < f for a, f in zip(areas, full_areas))


def test_background_is_not_uniform(small_root: Path) -> None:
    coco = _coco(small_root, "train")
    for image in coco.loadImgs(coco.getImgIds()):
        gray = _pixels(small_root, "train", image["file_name"]).astype(np.float64).mean(axis=2)
        background = ~np.any(_visible_masks(coco, image["id"]), axis=0)
        assert gray[background].std() > 3.0
        patch_stds = [
            gray[y : y + 8, x : x + 8].std()
            for y in range(0, 64 - 8, 4)
            for x in range(0, 96 - 8, 4)
            if background[y : y + 8, x : x + 8].all()
        ]
        assert patch_stds and min(patch_stds) > 1.0


def test_second_call_returns_without_rewriting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_shapes_dataset(tmp_path / "shapes", **SMALL)
    before = _mtimes(root)

    def fail(*args: object) -> None:
        raise AssertionError("the dataset was generated again")

    monkeypatch.setattr(shapes, "_write_dataset", fail)
    assert make_shapes_dataset(str(root), **SMALL) == root
    assert _mtimes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_other_parameters_raise_naming_the_folder(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "shapes", **SMALL)
    with pytest.raises(ValueError, match="Delete the folder") as info:
        make_shapes_dataset(root, **{**SMALL, "seed": 1})
    assert str(root) in str(info.value)
    marker = root / ".complete"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "num_train": 7}))
    with pytest.raises(ValueError, match="Delete the folder") as info:
        make_shapes_dataset(root, **SMALL)
    assert str(root) in str(info.value)


def test_incomplete_folder_raises_naming_the_folder(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "shapes", **SMALL)
    (root / "annotations" / "instances_val.json").unlink()
    with pytest.raises(ValueError, match="is incomplete") as info:
        make_shapes_dataset(root, **SMALL)
    assert str(root) in str(info.value)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is incomplete") as info:
        make_shapes_dataset(stray, **SMALL)
    assert str(stray) in str(info.value)


def test_existing_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "shapes").mkdir()
    root = make_shapes_dataset(tmp_path / "shapes", **SMALL)
    assert (root / "annotations" / "instances_train.json").is_file()
    assert _files(root) == _files(make_shapes_dataset(tmp_path / "reference", **SMALL))


def test_losing_the_race_discards_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shapes"
    write_dataset = shapes._write_dataset

    def other_process_finishes_first(target: Path, params: dict) -> None:
        write_dataset(target, params)
        monkeypatch.setattr(shapes, "_write_dataset", write_dataset)
        make_shapes_dataset(root, **SMALL)

    monkeypatch.setattr(shapes, "_write_dataset", other_process_finishes_first)
    assert make_shapes_dataset(root, **SMALL) == root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert _files(root) == _files(make_shapes_dataset(tmp_path / "reference", **SMALL))


def test_concurrent_processes_agree(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    with ProcessPoolExecutor(max_workers=3) as pool:
        results = [f.result() for f in [pool.submit(make_shapes_dataset, root, **SMALL) for _ in range(3)]]
    assert results == [root] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert _files(root) == _files(make_shapes_dataset(tmp_path / "reference", **SMALL))


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path / "tiny", **{**SMALL, "image_size": (16, 16)})
    with pytest.raises(ValueError, match="num_train"):
        make_shapes_dataset(tmp_path / "empty", **{**SMALL, "num_train": 0})
    assert not any(tmp_path.iterdir())
