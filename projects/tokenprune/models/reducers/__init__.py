"""Token-reduction methods, one :class:`TokenReducer` subclass per file, built by name from a config dict.

Adding a method: write ``reducers/<method>.py`` with a ``TokenReducer`` subclass whose constructor takes
``embed_dim`` first, and add it to ``REDUCERS``.
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

    A reducer instance or None passes through. An unknown type or invalid settings raise :class:`ConfigError`.
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
