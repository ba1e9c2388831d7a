"""tokenprune: token reduction for ViT backbones in MMDetection 3, dense-safe.

``tokenprune.models`` needs torch and timm only. Importing ``tokenprune`` where MMDetection is installed also
registers the models and datasets with it (``tokenprune.mmdet_plugin``), which is what configs'
``custom_imports = dict(imports=['tokenprune'])`` relies on.
"""

from importlib.util import find_spec

__version__ = "0.1.0"

if find_spec("mmdet") is not None:
    from . import mmdet_plugin  # noqa: F401
