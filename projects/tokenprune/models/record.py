"""What a backbone forward did to its tokens: one :class:`ReductionRecord`, built by :func:`reduction_record`.

Both backbones (:class:`tokenprune.models.vit.ViT` and :class:`tokenprune.models.vit_adapter.ViTAdapter`) keep
the record of their last forward in ``backbone.last_record``; the detector wrapper, the hooks, the FLOP counter
and the analysis tools read it there. A backbone drives its reducer in one or more ``begin`` ... ``finish``
spans ("runs": one for :class:`ViT`, one per stage for a ViT-Adapter whose reducer shrinks the token set) and
hands the runs to :func:`reduction_record`, which asks the reducer for each run's losses, stats, token counts,
MACs and token maps and merges them.

Token counts, MACs and maps cost time (they are built from the reducer's state after the forward), so they are
only collected with ``record_tokens`` (the backbone's attribute of that name); losses and stats always are.

This file imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .reducers.base import TokenReducer, dense_token_counts

Run = tuple[range, Any]  # the blocks one begin/finish span covered, and the reducer's state of that span


@dataclass
class ReductionRecord:
    """The token reduction of one backbone forward.

    Attributes:
        aux_losses: The reducer's training losses (names contain ``loss``), :meth:`TokenReducer.aux_losses`.
        stats: Numbers for logging (e.g. ``keep_rate.block3``, ``keep_rate_per_image.block3``),
            :meth:`TokenReducer.stats`.
        token_counts: (depth, B) float, the tokens (prefix included) each image fed to each block
            (:meth:`TokenReducer.token_counts`); None unless the forward ran with ``record_tokens``.
        extra_macs: The reducer's own multiply-accumulates per image, (B,) or a scalar
            (:meth:`TokenReducer.extra_macs`); 0.0 without ``record_tokens``.
        token_maps: Reducing block -> (B, h*w) ids over the patch grid (:meth:`TokenReducer.token_maps`);
            empty without ``record_tokens``.
    """

    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float | Tensor] = field(default_factory=dict)
    token_counts: Tensor | None = None
    extra_macs: Tensor | float = 0.0
    token_maps: dict[int, Tensor] = field(default_factory=dict)


def reduction_record(
    reducer: TokenReducer | None,
    runs: Sequence[Run],
    depth: int,
    batch: int,
    num_tokens: int,
    device: torch.device,
    record_tokens: bool,
) -> ReductionRecord:
    """The record of one backbone forward: what both backbones keep in ``last_record``.

    Args:
        reducer: The backbone's reducer; None for a dense forward (every block ran all tokens).
        runs: The reducer's begin/finish spans in block order: (blocks, state) each; empty when dense.
        depth: Number of blocks of the backbone.
        batch: Images B of the forward.
        num_tokens: Tokens N (prefix included) of the complete token set.
        device: Device of the dense token counts.
        record_tokens: Also collect token counts, the reducer's MACs and its token maps.

    Returns:
        One run over all blocks: the reducer's values as it reports them. Several runs: merged as
        :func:`merge_records` does. Dense: :func:`dense_record`.
    """
    if reducer is None:
        return dense_record(depth, batch, num_tokens, device, record_tokens)
    parts = [(blocks, run_record(reducer, state, depth, record_tokens)) for blocks, state in runs]
    return merge_records(parts, depth, batch, num_tokens, device, record_tokens)


def run_record(reducer: TokenReducer, state: Any, depth: int, record_tokens: bool) -> ReductionRecord:
    """The record of one begin/finish span, as the reducer reports it from its ``state``.

    Args:
        reducer: The reducer that ran the span.
        state: Its per-forward state from ``begin``.
        depth: Number of blocks of the backbone (the rows of the token counts).
        record_tokens: Also collect token counts, MACs and token maps.
    """
    record = ReductionRecord(aux_losses=reducer.aux_losses(state), stats=reducer.stats(state))
    if record_tokens:
        record.token_counts = reducer.token_counts(state, depth)
        record.extra_macs = reducer.extra_macs(state)
        record.token_maps = reducer.token_maps(state)
    return record


def dense_record(depth: int, batch: int, num_tokens: int, device: torch.device, record_tokens: bool) -> ReductionRecord:
    """The record of a forward without a reducer: no losses or stats; every block ran all ``num_tokens``.

    Args:
        depth: Number of blocks.
        batch: Images B.
        num_tokens: Tokens N (prefix included) each block ran.
        device: Device of the token counts.
        record_tokens: Also give the token counts ((depth, B), all N).
    """
    counts = dense_token_counts(depth, batch, num_tokens, device) if record_tokens else None
    return ReductionRecord(token_counts=counts)


def merge_records(
    parts: Sequence[tuple[range, ReductionRecord]],
    depth: int,
    batch: int,
    num_tokens: int,
    device: torch.device,
    record_tokens: bool,
) -> ReductionRecord:
    """Several spans' records (ViT-Adapter's per-stage runs) as one.

    A single record over all ``depth`` blocks is returned as it is. Otherwise a loss or stat several spans
    report is averaged over them; token counts start dense (all ``num_tokens``) and each span fills its own
    blocks' rows; MACs are summed; token maps are united (each span's maps cover its own blocks).

    Args:
        parts: (blocks, record) of each span, in block order.
        depth: Number of blocks of the backbone.
        batch: Images B.
        num_tokens: Tokens N (prefix included) of the complete token set, counted for blocks no span covered.
        device: Device of the merged token counts.
        record_tokens: Whether the records carry token counts, MACs and maps (then so does the merged one).
    """
    if len(parts) == 1 and parts[0][0] == range(depth):
        return parts[0][1]
    losses: dict[str, list] = {}
    stats: dict[str, list] = {}
    for _, part in parts:
        for k, v in part.aux_losses.items():
            losses.setdefault(k, []).append(v)
        for k, v in part.stats.items():
            stats.setdefault(k, []).append(v)
    merged = ReductionRecord(
        aux_losses={k: mean_of(v) for k, v in losses.items()}, stats={k: mean_of(v) for k, v in stats.items()}
    )
    if record_tokens:
        counts = dense_token_counts(depth, batch, num_tokens, device)
        for blocks, part in parts:
            counts[blocks.start : blocks.stop] = part.token_counts.to(device)[blocks.start : blocks.stop]
            merged.extra_macs = merged.extra_macs + part.extra_macs
            merged.token_maps.update(part.token_maps)
        merged.token_counts = counts
    return merged


def mean_of(values: list):
    """The one value, or the mean of several (losses or stats reported by several spans)."""
    return values[0] if len(values) == 1 else sum(values) / len(values)
