"""MMDetection registration: the thin layer between ``tokenprune.models`` and MMDetection 3.

Importing it registers with MMDetection's registries ``TokenPruneViT`` (backbone), ``ViTDetFPN`` (neck),
``TokenPruneMaskRCNN`` (detector adding the reducer's losses), ``TokenStatsHook``, ``SViTCalibrationHook`` and
``ShapesDataset``, and allow-lists for torch's weights-only loader the few classes mmengine writes into
checkpoints (``safe_load``).
"""

from . import safe_load
from .backbone import TokenPruneViT, ViTDetFPN
from .datasets import ShapesDataset
from .detectors import TokenPruneMaskRCNN
from .hooks import SViTCalibrationHook, TokenStatsHook

safe_load.allow_mmengine_checkpoints()

__all__ = [
    "SViTCalibrationHook",
    "ShapesDataset",
    "TokenPruneMaskRCNN",
    "TokenPruneViT",
    "TokenStatsHook",
    "ViTDetFPN",
]
