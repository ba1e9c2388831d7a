"""Reading weight files into tensor dicts, the one way every weight import does it (torch-only; numpy, which
torchvision already needs, only for detectron2's ``.pkl`` files).

:func:`read_weights`: a path or an already loaded checkpoint -> its tensor dict (the ``state_dict`` / ``model`` /
``module`` entry, ``module.`` removed). A ``.pth`` is read with ``torch.load(weights_only=True)`` (tensors and
plain containers; mmengine's log buffers once ``tokenprune.mmdet_plugin`` allow-listed them); a ``.pkl`` by
:func:`read_arrays_pickle`, a restricted unpickler that resolves only numpy's array reconstruction, numpy dtypes
and ``collections.OrderedDict``. Any other pickled object (which could run code) is refused before anything is
called, with :class:`UnsafeWeightsError`.
"""

from __future__ import annotations

import importlib
import os
import pickle

import torch
from torch import Tensor

from ..errors import TokenPruneError, WeightsMismatchError

# the globals a pickle of numpy arrays needs: numpy's array reconstruction (pickle protocols 2-4, and the
# out-of-band buffers of protocol 5), numpy dtypes, OrderedDict, and _codecs.encode, through which pickle
# protocol 2 on Python 3 writes the arrays' raw bytes. Nothing else is resolved.
ARRAY_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


class UnsafeWeightsError(TokenPruneError, pickle.UnpicklingError):
    """A pickled weights file holds objects other than numpy arrays and plain containers; it was not loaded."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ARRAY_PICKLE_GLOBALS`."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="latin1")  # detectron2 reads its .pkl files with latin1 (Python 2 pickles)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ARRAY_PICKLE_GLOBALS:
            raise UnsafeWeightsError(
                f"refused to load {self.path}: it pickles {module}.{name}, which is not part of a file of numpy "
                "arrays (detectron2's .pkl format holds numpy arrays, dtypes and plain containers only); "
                "unpickling it could run arbitrary code. Do not use this file"
            )
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            numpy = importlib.import_module("numpy")
            if hasattr(numpy, "_core"):
                module = "numpy._core." + module[len("numpy.core.") :]
        return getattr(importlib.import_module(module), name)


def read_arrays_pickle(path: str | os.PathLike) -> dict[str, Tensor]:
    """A detectron2 ``.pkl`` weights file -> its ``'model'`` dict (or the dict itself) as tensors.

    Raises:
        UnsafeWeightsError: The file pickles another object than numpy arrays and containers (nothing was run).
        WeightsMismatchError: It holds no dict of numeric arrays.
    """
    import numpy as np

    path = str(path)
    with open(path, "rb") as f:
        try:
            data = _ArraysOnlyUnpickler(f, path).load()
        except UnsafeWeightsError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise WeightsMismatchError(f"{path} is not a readable pickle of numpy arrays: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise WeightsMismatchError(f"{path} holds no dict of arrays (a detectron2 .pkl has a 'model' dict)")
    out = {}
    for k, v in data.items():
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
            raise WeightsMismatchError(f"{path}: entry {k!r} is not a numeric numpy array ({type(v).__name__})")
        out[str(k)] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def read_weights(source: str | os.PathLike | dict) -> dict[str, Tensor]:
    """The tensor dict of a weights file or an already loaded checkpoint, with its key prefixes kept (only
    ``module.`` removed): ``.pkl`` -> :func:`read_arrays_pickle`; otherwise ``torch.load(weights_only=True)``
    and the ``state_dict`` / ``model`` / ``module`` dict inside.

    Args:
        source: A path (FileNotFoundError ``pretrained weights file not found: PATH`` if there is no such file),
            or a checkpoint already loaded (a dict; its tensor dict read again gives the same tensors).

    Raises:
        UnsafeWeightsError: The file pickles other objects than tensors (or arrays) and plain containers.
        WeightsMismatchError: It holds no (non-empty) dict of tensors.
    """
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        if path.endswith(".pkl"):
            return read_arrays_pickle(path)
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeWeightsError(
                f"refused to load {path}: it pickles objects other than tensors ({str(e).splitlines()[0]}). An "
                "mmengine checkpoint loads once tokenprune is imported with MMDetection installed (it allow-lists "
                "mmengine's classes); otherwise save its state dict alone with torch.save"
            ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            source = source[key]
    if not isinstance(source, dict) or not source or not all(isinstance(v, Tensor) for v in source.values()):
        raise WeightsMismatchError("the weights file holds no state dict of tensors")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in source.items()}
