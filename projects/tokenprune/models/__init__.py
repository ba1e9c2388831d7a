"""Model code: torch + timm only, no MMDetection."""

from .convert import LoadReport, WeightsMismatchError, convert_timm_vit, load_timm_vit
from .reducers import SViTReducer, TokenReducer
from .simple_fpn import SimpleFPN
from .vit import ViT, vit_base, vit_small, vit_tiny

__all__ = [
    "LoadReport",
    "SViTReducer",
    "SimpleFPN",
    "TokenReducer",
    "ViT",
    "WeightsMismatchError",
    "convert_timm_vit",
    "load_timm_vit",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
