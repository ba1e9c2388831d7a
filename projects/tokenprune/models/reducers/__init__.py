"""Token-reduction methods, one :class:`TokenReducer` subclass per file, built by name from a config dict.

Layout: ``base.py`` (the interface and its vocabulary: ``blocks``, ``reduced_blocks``, ``keep_schedule``;
config checks), ``toolkit.py`` (what methods share: keep counts and masks, running a block on the kept tokens,
block halves and explicit attention, threshold calibration), ``gated.py`` (the learned-gate bases: keep masks for
SViT, TPC and DynamicViT, calibrated thresholds for SViT and TPC), ``gates.py`` (gate modules), ``merging.py``
(ToMe, PPT, BAT's merging machinery), ``windowed.py`` (running a block on the kept tokens of each window),
``sparse_train.py`` (SViT and TPC training with the backward over the kept tokens), and one file per method; a
method file imports no other method file.

Adding a method: write ``reducers/<method>.py`` with a ``TokenReducer`` subclass whose constructor takes
``embed_dim`` first and ``blocks`` for its reduced blocks, add it to ``REDUCERS``, its config keys to the table
in ``docs/reducers.md`` and a row to ``tests/test_reducer_contract.py``.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import TokenReducer
from .bat import BATReducer
from .dynamicvit import DynamicViTReducer
from .evit import EViTReducer
from .ppt import PPTReducer
from .svit import SViTReducer
from .tome import ToMeReducer
from .tpc import TPCReducer

REDUCERS: dict[str, type[TokenReducer]] = {
    "SViT": SViTReducer,
    "EViT": EViTReducer,
    "DynamicViT": DynamicViTReducer,
    "TPC": TPCReducer,
    "ToMe": ToMeReducer,
    "PPT": PPTReducer,
    "BAT": BATReducer,
}


def build_reducer(cfg: dict | TokenReducer | None, embed_dim: int) -> TokenReducer | None:
    """``dict(type='SViT', **kwargs)`` -> the reducer for a backbone of ``embed_dim`` channels.

    A reducer instance or None passes through. An unknown type, invalid settings or a renamed key (the message
    gives the new name) raise :class:`ConfigError`.
    """
    if cfg is None or isinstance(cfg, TokenReducer):
        return cfg
    kwargs = dict(cfg)
    name = kwargs.pop("type", None)
    if name not in REDUCERS:
        raise ConfigError(
            f"unknown reducer type {name!r} in the backbone's reducer config; available: {sorted(REDUCERS)}"
        )
    try:
        return REDUCERS[name](embed_dim, **kwargs)
    except ConfigError:
        raise  # e.g. a renamed key: the message names the new one
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {name} reducer settings: {e}") from e


__all__ = [
    "REDUCERS",
    "BATReducer",
    "DynamicViTReducer",
    "EViTReducer",
    "PPTReducer",
    "SViTReducer",
    "TPCReducer",
    "ToMeReducer",
    "TokenReducer",
    "build_reducer",
]
