"""Synthetic data for tests and quick experiments; importable without torch or mmdet."""

from .shapes import SHAPES_CLASSES, make_shapes_dataset

__all__ = ["SHAPES_CLASSES", "make_shapes_dataset"]
