"""Datasets: the embedded shapes data (generated on first use) and COCO annotation checks."""

from __future__ import annotations

import json
import os

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from ..data import SHAPES_CLASSES, make_shapes_dataset
from ..errors import DatasetError


def check_coco_file(path: str) -> None:
    """Raise :class:`DatasetError` unless ``path`` is a COCO instances file with at least one category."""
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
        check_coco_file(self.ann_file)
        return super().load_data_list()
