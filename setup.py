"""Installs the package ``tokenprune`` from ``projects/tokenprune``.

The model code (``tokenprune.models``) needs torch and timm only; ``tokenprune.mmdet_plugin`` registers it
with MMDetection. The pinned stack lives in ``requirements/stack.txt`` and ``tools/setup_env.sh`` installs it.
"""

from setuptools import find_packages, setup

setup(
    name="tokenprune",
    version="0.1.0",
    description="Token pruning for ViT backbones in MMDetection 3 (SViT and baselines), dense-safe.",
    package_dir={"": "projects"},
    packages=find_packages("projects"),
    python_requires=">=3.9",
    install_requires=["torch", "timm"],
    extras_require={"mmdet": ["mmengine==0.10.7", "mmcv==2.1.0", "mmdet==3.3.0", "pycocotools"]},
)
