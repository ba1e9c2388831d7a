"""Checkpoints load with torch's weights-only unpickler: tensors, plain containers and an allow-list of the
classes mmengine writes into its checkpoints, nothing else, unless the user explicitly trusts the file.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``. On torch >= 2.6 that means weights-only
loading, which refuses mmengine's own checkpoints (its ``HistoryBuffer`` logs and the numpy arrays and scalars
inside them) unless those classes are allow-listed. Allow-listing them here keeps ``tools/test.py``,
``load_from`` and ``--resume`` working without turning safe loading off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
would let any pickled object run code).

mmengine also pickles each HistoryBuffer's statistics functions, as ``getattr(HistoryBuffer, 'mean')``;
allow-listing ``getattr`` would open the door to arbitrary code, so checkpoints written here leave them out
(``HistoryBuffer.__setstate__`` restores them from the class on load).

On ``import tokenprune``, :func:`allow_mmengine_checkpoints` also replaces mmengine's loader of local files
(``load_from``, ``--resume``, ``tools/test.py``) by :func:`load_checkpoint_file`, which always passes
``weights_only`` explicitly (so torch's ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot switch it off) and turns
a refusal into an :class:`UnsafeCheckpointError` that names the offending objects and the opt-in. The opt-in
for trusted legacy files (e.g. written by plain mmengine, which pickles ``builtins.getattr``) is explicit and
off by default: ``--trust-checkpoint`` on ``tools/train.py`` / ``tools/test.py`` (trusts the file given to
that run), or the environment variable ``TOKENPRUNE_TRUST_CHECKPOINTS=1`` (trusts every checkpoint this
process loads). The backbone's pretrained weights (``init_cfg``) are always read weights-only.
A file that is not a whole checkpoint (empty, cut short while being saved or copied, or not a torch file at
all) ends in an :class:`IncompleteCheckpointError` that says so, instead of torch's internal zip-reader error.
A trusted legacy file can be re-saved once into a file that loads safely::

    python tools/model_converters/resave_checkpoint.py legacy.pth safe.pth
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

from ..errors import TokenPruneError

TRUST_ENV = "TOKENPRUNE_TRUST_CHECKPOINTS"
_trusted_paths: set[str] = set()


class UnsafeCheckpointError(TokenPruneError, pickle.UnpicklingError):
    """A checkpoint holds pickled objects outside the allow-list and was not explicitly trusted."""


class IncompleteCheckpointError(TokenPruneError, RuntimeError):
    """A checkpoint file is empty, cut short or corrupted: not a whole torch checkpoint."""


ZIP_MAGIC = b"PK\x03\x04"


def mmengine_checkpoint_globals() -> list:
    """The classes and functions an mmengine checkpoint pickles besides tensors and builtin containers."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_, np.uint8)]
    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


def _history_buffer_state(self: HistoryBuffer) -> dict:
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)
    return state


def trust_checkpoint(path: str | os.PathLike) -> None:
    """Opt in to full unpickling of this one file (it may run code: only for files whose origin you trust)."""
    _trusted_paths.add(os.path.realpath(path))


def is_trusted(path: str | os.PathLike) -> bool:
    """Whether ``path`` was passed to :func:`trust_checkpoint` or ``TOKENPRUNE_TRUST_CHECKPOINTS=1`` is set."""
    return os.environ.get(TRUST_ENV) == "1" or os.path.realpath(path) in _trusted_paths


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The pickled classes and functions in a checkpoint that the weights-only loader refuses (empty if the
    file is not in torch's zip format)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
        return []


def _refusal_message(path: str, error: Exception) -> str:
    found = unsafe_globals(path)
    what = ", ".join(found) if found else str(error).splitlines()[0]
    hint = ""
    if found and set(found) <= {"builtins.getattr"}:
        hint = (
            " It looks like a checkpoint written by plain mmengine, which pickles its log buffers' statistics "
            "functions through builtins.getattr."
        )
    return (
        f"refused to load checkpoint {path}: it holds pickled objects that are neither tensors nor the "
        f"mmengine classes allow-listed in tokenprune.mmdet_plugin.safe_load ({what}); unpickling them could run "
        f"arbitrary code.{hint} If you trust where the file comes from, load it with --trust-checkpoint "
        f"(tools/train.py, tools/test.py) or with the environment variable {TRUST_ENV}=1, or re-save it once "
        "into a file that loads safely: python tools/model_converters/resave_checkpoint.py IN.pth OUT.pth. "
        "Otherwise do not use it"
    )


def is_whole_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete zip file (torch's checkpoint format since 1.6; the zip's index, written
    last, is missing from a file cut short while being saved or copied)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return bool(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _unreadable_message(path: str, error: BaseException) -> str | None:
    """What is wrong with a checkpoint file that torch could not read, or None if the file itself looks whole
    (then the error is not about the file, e.g. a CUDA map_location on a machine without CUDA)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    again = "Copy it again from where it was written, or use an earlier checkpoint"
    if size == 0:
        return f"checkpoint {path} is empty (0 bytes): it was never written completely. {again}"
    whole = is_whole_zip(path)
    if head == ZIP_MAGIC and not whole:
        return (
            f"checkpoint {path} is incomplete: the file ({size} bytes) ends before the index that torch writes "
            f"last, so it was cut short while being saved or copied (e.g. a run killed while saving, a full disk, "
            f"an interrupted download). {again}"
        )
    if whole and "PytorchStreamReader" not in text:
        return None
    if not whole and ("unexpected EOF" in text or isinstance(error, EOFError)):
        return (
            f"checkpoint {path} is incomplete: its data ends early ({size} bytes; {text}). It was cut short while "
            f"being saved or copied. {again}"
        )
    return (
        f"checkpoint {path} could not be read: it is corrupted or not a torch checkpoint ({size} bytes; "
        f"{type(error).__name__}: {text}). {again}"
    )


def _torch_load(path: str, map_location, weights_only: bool, mmap: bool):
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        message = _unreadable_message(path, e)
        if message is None:
            raise
        raise IncompleteCheckpointError(message) from e


def load_checkpoint_file(path: str | os.PathLike, map_location=None, mmap: bool = False):
    """``torch.load`` of a local checkpoint: weights-only unless the file is trusted (:func:`is_trusted`).

    Args:
        path: The checkpoint file.
        map_location: As for ``torch.load``.
        mmap: Map the tensors' storage from the file instead of reading it (cheap when only the keys and
            shapes are needed); ignored for files in torch's legacy (non-zip) format.

    Raises:
        UnsafeCheckpointError: The file holds other pickled objects and is not trusted.
        IncompleteCheckpointError: The file is empty, cut short or corrupted.
    """
    path = str(path)
    mmap = mmap and is_whole_zip(path)
    if is_trusted(path):
        print_log(
            f"loading {path} with full unpickling (explicitly trusted): it may run code stored in the file",
            logger="current",
            level=logging.WARNING,
        )
        return _torch_load(path, map_location, weights_only=False, mmap=mmap)
    try:
        return _torch_load(path, map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_refusal_message(path, e)) from e


def _load_from_local(filename: str, map_location=None):
    """mmengine's loader of local paths, with :func:`load_checkpoint_file` in place of a bare torch.load."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return load_checkpoint_file(filename, map_location)


def allow_mmengine_checkpoints() -> None:
    """Allow-list :func:`mmengine_checkpoint_globals` for ``torch.load(weights_only=True)``, make
    HistoryBuffer pickle without functions, and load mmengine's local checkpoints through
    :func:`load_checkpoint_file`."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    HistoryBuffer.__getstate__ = _history_buffer_state
    CheckpointLoader.register_scheme(prefixes="", loader=_load_from_local, force=True)


def resave_trusted(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Load a trusted legacy checkpoint with full unpickling and save it so that it loads weights-only
    (mmengine's log buffers are written without functions). Returns what still blocks safe loading of ``dst``
    (empty when it loads safely)."""
    ckpt = torch.load(str(src), map_location="cpu", weights_only=False)
    torch.save(ckpt, str(dst))
    return unsafe_globals(dst)
