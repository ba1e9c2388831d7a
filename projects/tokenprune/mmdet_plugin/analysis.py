"""What ``tools/analysis_tools/visualize_tokens.py`` and ``token_stats.py`` share: a detector loaded from a
config and checkpoint with token recording on, its test pipeline run over image files or a dataset split, and
the ground-truth object masks and image area on the token grid of the network input.

The statistics themselves are in :mod:`tokenprune.analysis` (torch only); this is the MMDetection side.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from torch import Tensor

from ..errors import ConfigError, DatasetError
from ..models.vit import ViT
from .cli import check_config, load_config
from .detectors import build_detector, load_weights

SPLITS = ("train", "val", "test")


def load_detector(
    config: str, checkpoint: str, cfg_options: dict | None = None, device: str = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """Build the detector of ``config`` (with ``--cfg-options`` applied), load ``checkpoint`` into it
    (missing and unexpected keys are logged, e.g. a dense checkpoint under a training-free reducer), and switch
    on ``backbone.record_tokens``. Returns the model in eval mode on ``device`` and the config."""
    cfg = load_config(config, cfg_options)
    if not os.path.isfile(checkpoint):  # before building the model
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    cfg.model.backbone.init_cfg = None  # the checkpoint holds the weights
    cfg.load_from = None
    check_config(cfg, loaders=())
    model = build_detector(cfg)
    if not isinstance(getattr(model, "backbone", None), ViT):
        raise ConfigError(
            f"the token tools need a detector with a TokenPruneViT backbone; {config} has "
            f"{type(getattr(model, 'backbone', None)).__name__}"
        )
    meta = load_weights(model, checkpoint)
    model.dataset_meta = {k.lower(): v for k, v in meta.get("dataset_meta", {}).items()}
    if not model.dataset_meta.get("classes"):  # as init_detector: the test dataset's metainfo, not loaded
        model.dataset_meta = dict(DATASETS.build({**cfg.test_dataloader.dataset, "lazy_init": True}).metainfo)
    model.backbone.record_tokens = True
    return model.to(device).eval(), cfg


def inference_pipeline(cfg: Config, with_annotations: bool = True) -> list[dict]:
    """The config's test pipeline (``test_dataloader.dataset.pipeline``), without ``LoadAnnotations`` if
    ``with_annotations`` is False (for image files that have none)."""
    ds = cfg.test_dataloader.dataset
    while "pipeline" not in ds and "dataset" in ds:  # dataset wrappers
        ds = ds.dataset
    pipeline = copy.deepcopy(ds.pipeline)
    if not with_annotations:
        pipeline = [t for t in pipeline if "LoadAnnotations" not in t["type"]]
    return pipeline


def split_dataset(cfg: Config, split: str):
    """The dataset of ``<split>_dataloader`` with the test pipeline (a train split too: no random flips)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    loader = cfg.get(f"{split}_dataloader")
    if not loader or "dataset" not in loader:
        raise ConfigError(f"the config has no {split}_dataloader.dataset; choose another --split")
    check_config(cfg, loaders=(f"{split}_dataloader",))
    ds_cfg = copy.deepcopy(loader.dataset)
    inner = ds_cfg
    while "dataset" in inner:  # RepeatDataset, ClassBalancedDataset, ...
        inner = inner.dataset
    inner.pipeline = inference_pipeline(cfg)
    return DATASETS.build(ds_cfg)


def image_file_items(cfg: Config, paths: Sequence[str]) -> Iterator[dict]:
    """Image files through the test pipeline (without annotations): packed ``inputs``/``data_samples``."""
    pipeline = Compose(inference_pipeline(cfg, with_annotations=False))
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise DatasetError(f"image file not found: {path}")
        yield pipeline({"img_path": path, "img_id": i})


def batches(items: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    """Group an iterator of packed samples into lists of ``batch_size``."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class BatchTokens:
    """One batch through the detector.

    Attributes:
        images: (B, H, W, 3) uint8 RGB network inputs before normalisation, padded like the batch (H, W).
        data_samples: The batch's data samples (with ``pred_instances`` in network-input pixels if predicted).
        token_maps: ``backbone.last_record.token_maps``: reducing block -> (B, h*w).
        grid_hw: Token grid (h, w).
        patch: Patch size in pixels.
    """

    images: Tensor
    data_samples: list
    token_maps: dict[int, Tensor]
    grid_hw: tuple[int, int]
    patch: int


@torch.no_grad()
def run_batch(model: torch.nn.Module, items: list[dict], predict: bool = True) -> BatchTokens:
    """Run the detector (``predict``: the whole detector, in network-input pixels, ``rescale=False``; else
    the backbone only, enough for token statistics) on packed samples and collect its token maps."""
    batch = pseudo_collate(items)
    data = model.data_preprocessor(batch, False)
    inputs, samples = data["inputs"], data["data_samples"]
    if predict:
        samples = model.predict(inputs, samples, rescale=False)
    else:
        model.backbone(inputs)
    H, W = inputs.shape[-2:]
    images = torch.zeros(len(items), H, W, 3, dtype=torch.uint8)
    for i, img in enumerate(batch["inputs"]):
        h, w = img.shape[-2:]
        images[i, :h, :w] = img.flip(0).permute(1, 2, 0)  # LoadImageFromFile gives BGR
    return BatchTokens(
        images=images,
        data_samples=samples,
        token_maps={b: m.cpu() for b, m in model.backbone.last_record.token_maps.items()},
        grid_hw=model.backbone.grid_size((H, W)),
        patch=model.backbone.patch_size,
    )


def object_masks(data_samples: list, pad_hw: tuple[int, int]) -> Tensor | None:
    """(B, H, W) bool union of each image's ground-truth instance masks at the network input: resized from the
    loaded size to ``img_shape`` (nearest) when the pipeline loaded them unresized, padded to ``pad_hw``.
    None if a sample has no ground-truth masks (e.g. image files)."""
    out = torch.zeros(len(data_samples), *pad_hw, dtype=torch.bool)
    for i, sample in enumerate(data_samples):
        gt = sample.get("gt_instances")
        if gt is None or "masks" not in gt:
            return None
        masks = gt.masks
        img_hw = tuple(sample.img_shape)
        if (masks.height, masks.width) not in (img_hw, tuple(pad_hw)):
            masks = masks.resize(img_hw)
        union = torch.from_numpy(np.asarray(masks.to_ndarray()).astype(bool).any(0) if len(masks) else np.zeros(0))
        if union.numel():
            h, w = min(union.shape[0], pad_hw[0]), min(union.shape[1], pad_hw[1])
            out[i, :h, :w] = union[:h, :w]
    return out


def image_area(data_samples: list, pad_hw: tuple[int, int]) -> Tensor:
    """(B, H, W) bool: True on each image's pixels (``img_shape``), False on the batch padding."""
    out = torch.zeros(len(data_samples), *pad_hw, dtype=torch.bool)
    for i, sample in enumerate(data_samples):
        h, w = sample.img_shape
        out[i, :h, :w] = True
    return out
