"""Checkpoints load with torch's weights-only unpickler (torch >= 2.6's default): tensors, plain containers
and an allow-list of the classes mmengine writes into its checkpoints, nothing else.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``. On torch >= 2.6 that means weights-only
loading, which refuses mmengine's own checkpoints (its ``HistoryBuffer`` logs and the numpy arrays and scalars
inside them) unless those classes are allow-listed. Allow-listing them here keeps ``tools/test.py``,
``load_from`` and ``--resume`` working without turning safe loading off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
would let any pickled object run code).

mmengine also pickles each HistoryBuffer's statistics functions, as ``getattr(HistoryBuffer, 'mean')``;
allow-listing ``getattr`` would open the door to arbitrary code, so checkpoints written here leave them out
(``HistoryBuffer.__setstate__`` restores them from the class on load).
"""

from __future__ import annotations

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def mmengine_checkpoint_globals() -> list:
    """The classes and functions an mmengine checkpoint pickles besides tensors and builtin containers."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_, np.uint8)]
    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


def _history_buffer_state(self: HistoryBuffer) -> dict:
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)
    return state


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for ``torch.load(weights_only=True)`` and make
    HistoryBuffer pickle without functions."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    HistoryBuffer.__getstate__ = _history_buffer_state
