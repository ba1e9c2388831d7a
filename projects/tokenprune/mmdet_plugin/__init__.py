"""MMDetection registration: the thin layer between ``tokenprune.models`` and MMDetection 3.

Importing it registers ``TokenPruneViT`` (backbone), ``ViTDetFPN`` (neck), ``TokenPruneMaskRCNN`` (detector
adding the reducer's losses), ``TokenStatsHook`` and ``ShapesDataset`` with MMDetection's registries, and
allow-lists for torch's weights-only loader the few classes mmengine writes into checkpoints (``safe_load``).
"""

from . import safe_load
from .backbone import TokenPruneViT, ViTDetFPN
from .datasets import ShapesDataset
from .detectors import TokenPruneMaskRCNN
from .hooks import TokenStatsHook

safe_load.allow_mmengine_checkpoints()

__all__ = ["ShapesDataset", "TokenPruneMaskRCNN", "TokenPruneViT", "TokenStatsHook", "ViTDetFPN"]
