"""Datasets: the embedded shapes data (generated on first use), and checks of COCO annotation files (format,
empty files), of the images they list and of image files that cannot be read, each ending in a
:class:`DatasetError` that names the file and the fix."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from ..data import SHAPES_CLASSES, make_shapes_dataset
from ..errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm")


def check_coco_file(path: str) -> dict:
    """Raise :class:`DatasetError` unless ``path`` is a COCO instances file with at least one category whose
    annotations refer to its own images and categories; return the parsed file."""
    if not os.path.isfile(path):
        raise DatasetError(
            f"annotation file not found: {path}. Point the config's data_root/ann_file at your data "
            "(for COCO configs: export COCO_ROOT=/path/to/coco/ holding annotations/ and train2017/, val2017/)"
        )
    try:
        with open(path) as f:
            ann = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"annotation file {path} is not readable JSON ({e}); it must be COCO format") from e
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(ann, dict) or k not in ann]
    if missing:
        raise DatasetError(
            f"annotation file {path} is not COCO instances format: missing {missing}. "
            "Convert it to COCO (images, annotations, categories)"
        )
    if not ann["categories"]:
        raise DatasetError(f"annotation file {path} has an empty 'categories' list: list the dataset's classes")
    category_ids = {c.get("id") for c in ann["categories"] if isinstance(c, dict)}
    image_ids = {im.get("id") for im in ann["images"] if isinstance(im, dict)}
    unknown_categories, unknown_images = set(), set()
    for a in ann["annotations"]:
        if not isinstance(a, dict):
            raise DatasetError(f"annotation file {path} holds an annotation that is not an object: {a!r}")
        if a.get("category_id") not in category_ids:
            unknown_categories.add(a.get("category_id"))
        if a.get("image_id") not in image_ids:
            unknown_images.add(a.get("image_id"))
    if unknown_categories:
        raise DatasetError(
            f"annotation file {path}: annotations use category ids {sorted(unknown_categories, key=str)[:10]} "
            f"that are not in its 'categories' (ids {sorted(category_ids, key=str)[:20]}): add those categories "
            "or remove their annotations"
        )
    if unknown_images:
        raise DatasetError(
            f"annotation file {path}: annotations refer to image ids {sorted(unknown_images, key=str)[:10]} that "
            "are not in its 'images': add those images or remove their annotations"
        )
    return ann


def check_not_empty(ann: dict, path: str, training: bool) -> None:
    """Raise :class:`DatasetError` if a COCO file ``ann`` lists no images, or, for training, no annotations
    (MMDetection would fail later with ``need at least one array to concatenate``)."""
    if not ann["images"]:
        raise DatasetError(
            f"annotation file {path} lists no images: there is nothing to {'train on' if training else 'evaluate'}. "
            "Point the dataset's ann_file at a file that lists the images (and their annotations)"
        )
    if training and not ann["annotations"]:
        raise DatasetError(
            f"annotation file {path} lists {len(ann['images'])} images but no annotations: there is nothing to "
            "train on (images without objects are left out of training). Point train_dataloader.dataset.ann_file "
            "at the annotated training file"
        )


def unannotated_message(ann: dict, path: str) -> str | None:
    """For an evaluation file: what is wrong if it lists images but no annotations (every COCO metric would be
    -1.000), else None."""
    if ann["images"] and not ann["annotations"]:
        return (
            f"annotation file {path} lists {len(ann['images'])} images but no annotations: every COCO metric would "
            "be -1.000, as there is nothing to compare the predictions with"
        )
    return None


def missing_image_files(ann: dict, img_dir: str) -> list[str]:
    """Paths of the images listed in a COCO file ``ann`` that are not in ``img_dir``; each folder is listed
    once (no per-file system call), so this stays fast for COCO's 118k images."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for im in ann["images"]:
        full = os.path.join(img_dir, str(im.get("file_name", "")))
        by_folder[os.path.dirname(full)].append(os.path.basename(full))
    missing = []
    for folder, names in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing += [os.path.join(folder, n) for n in names if n not in present]
    return missing


def check_image_files(ann: dict, ann_path: str, img_dir: str) -> None:
    """Raise :class:`DatasetError` naming the missing files if an image listed in ``ann`` is not on disk."""
    missing = missing_image_files(ann, img_dir)
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(ann['images'])} images listed in {ann_path} are missing, e.g. "
            f"{', '.join(missing[:3])}. Images are read from {img_dir}: check the dataset's data_root and "
            "data_prefix=dict(img=...), copy the missing files there, or remove their entries from the annotation "
            "file"
        )


def image_read_error(error: BaseException) -> DatasetError | None:
    """A :class:`DatasetError` naming the image and the fix if ``error`` is an image file that could not be
    read (mmcv's ``failed to load image``, a missing file, Pillow's ``cannot identify image file``), also when
    re-raised by a DataLoader worker; None for any other error."""
    text = str(error).strip()
    last = text.splitlines()[-1] if text else ""
    path, reason = None, ""
    if m := re.search(r"failed to load image: (.+)$", last):
        path, reason = m.group(1).strip(), "it could not be decoded (corrupted, truncated or not an image)"
    elif m := re.search(r"cannot identify image file '(.+)'", last):
        path, reason = m.group(1), "it could not be decoded (corrupted, truncated or not an image)"
    elif isinstance(error, FileNotFoundError) or "No such file or directory" in last:
        path = getattr(error, "filename", None)
        if not path and (m := re.search(r"No such file or directory: '(.+)'", last)):
            path = m.group(1)
        reason = "it does not exist (moved or deleted since training started?)"
    if not path or not str(path).lower().endswith(IMAGE_EXTENSIONS):
        return None
    return DatasetError(
        f"image {path} could not be read: {reason}. Replace it with a good copy (re-extract or re-download the "
        "dataset), or remove its entry from the annotation file"
    )


@DATASETS.register_module()
class ShapesDataset(CocoDataset):
    """The embedded synthetic shapes data (circle, square, triangle) in COCO format.

    Args:
        generate: Arguments of :func:`tokenprune.data.make_shapes_dataset` (seed, num_train, num_val,
            image_size); when given, the data is generated into ``data_root`` on first use. None: the data must
            exist.
        **kwargs: The arguments of :class:`mmdet.datasets.CocoDataset`.
    """

    METAINFO = {"classes": SHAPES_CLASSES, "palette": [(220, 20, 60), (0, 130, 200), (60, 180, 75)]}

    def __init__(self, *args, generate: dict | None = None, **kwargs) -> None:
        self.generate = generate
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        if self.generate is not None:
            try:
                make_shapes_dataset(self.data_root, **self.generate)
            except (ValueError, TypeError) as e:
                raise DatasetError(f"the embedded shapes data could not be made: {e}") from e
        ann = check_coco_file(self.ann_file)
        check_not_empty(ann, self.ann_file, training=not self.test_mode)
        check_image_files(ann, self.ann_file, self.data_prefix.get("img", self.data_root or ""))
        return super().load_data_list()
