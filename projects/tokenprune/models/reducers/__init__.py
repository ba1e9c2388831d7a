"""Token-reduction methods, one :class:`TokenReducer` subclass per file, built by name from a config dict.

Adding a method: write ``reducers/<method>.py`` with a ``TokenReducer`` subclass whose constructor takes
``embed_dim`` first, and add it to ``REDUCERS``.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import TokenReducer
from .svit import SViTReducer

REDUCERS: dict[str, type[TokenReducer]] = {"SViT": SViTReducer}


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


__all__ = ["REDUCERS", "SViTReducer", "TokenReducer", "build_reducer"]
