"""Model code: torch + timm only, no MMDetection."""

from .convert import LoadReport, WeightsMismatchError, convert_timm_vit, load_timm_vit
from .convert_vitdet import convert_vitdet_state_dict, load_vitdet_vit
from .reducers import SViTReducer, TokenReducer
from .simple_fpn import SimpleFPN
from .vit import ViT, vit_base, vit_small, vit_tiny, vitdet_base
from .weights import UnsafeWeightsError, read_arrays_pickle, read_weights

__all__ = [
    "LoadReport",
    "SViTReducer",
    "SimpleFPN",
    "TokenReducer",
    "UnsafeWeightsError",
    "ViT",
    "WeightsMismatchError",
    "convert_timm_vit",
    "convert_vitdet_state_dict",
    "load_timm_vit",
    "load_vitdet_vit",
    "read_arrays_pickle",
    "read_weights",
    "vit_base",
    "vit_small",
    "vit_tiny",
    "vitdet_base",
]
