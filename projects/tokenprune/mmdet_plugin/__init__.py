"""MMDetection registration: the thin layer between ``tokenprune.models`` and MMDetection 3.

Importing it registers with MMDetection's registries ``TokenPruneViT`` (backbone), ``ViTDetFPN`` (neck),
``TokenPruneMaskRCNN`` (detector adding the reducer's losses), ``TokenStatsHook``, ``SViTCalibrationHook``,
``StopOnNonFiniteLossHook``, ``RandomStateHook`` and ``ShapesDataset``, and installs the safe checkpoint loader:
torch's weights-only unpickler with an allow-list of the few classes mmengine writes (``safe_load``).
"""

from . import safe_load
from .adapter import TokenPruneViTAdapter  # noqa: F401 (registers the ViT-Adapter backbone)
from .backbone import TokenPruneViT, ViTDetFPN
from .datasets import ShapesDataset
from .detectors import TokenPruneMaskRCNN
from .hooks import SViTCalibrationHook, TokenStatsHook
from .reliability import RandomStateHook, StopOnNonFiniteLossHook

safe_load.allow_mmengine_checkpoints()

__all__ = [
    "RandomStateHook",
    "SViTCalibrationHook",
    "ShapesDataset",
    "StopOnNonFiniteLossHook",
    "TokenPruneMaskRCNN",
    "TokenPruneViT",
    "TokenStatsHook",
    "ViTDetFPN",
]
