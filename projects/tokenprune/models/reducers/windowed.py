"""Token reduction inside ViTDet's windowed blocks: running a block on the kept tokens of each window only.

A pruning method that keeps its token set (pruned tokens stay in place with their value, as SViT's) can drive
a windowed block, and a global block with relative positions, by gathering the kept tokens:

- the kept tokens of every window (a global block: of the whole token grid, one "window") are gathered, the
  windows of the batch padded to the largest kept count (the batch padding is masked out as keys); windows
  with no kept token are left out, so the work follows the kept tokens, not the grid;
- attention runs within each window on its kept tokens (:meth:`tokenprune.models.vit.Attention.forward_at`),
  the relative positions of a kept token taken at its original row and column in the window, not at its
  place in the gathered set; the zero padding of the token grid (right and bottom, up to whole windows) takes
  part as keys as in the dense windowed block, folded into one key per window; it is never a query, never
  written back;
- the MLP runs on the kept tokens, and they are scattered back; pruned tokens keep their value.

This equals the dense block with the pruned tokens masked out as keys (their outputs discarded), which is how
such a method trains; with every token kept it is the dense block. :func:`run_block_on_kept` is the one dispatch
of the learned-gate reducers (SViT, TPC) at inference: this path for a block that needs the grid, the gather of
the kept tokens of each image (:func:`tokenprune.models.reducers.toolkit.run_on_kept`) for the others.

A merging method that keeps the grid (ToMe inside windows, ``tome.py``) partitions the grid into
:func:`window_groups`: the windows of one content size (interior, right edge, bottom edge, corner), the real
tokens of each in row-major order, the grid padding left out.

Which reducers cannot run in these blocks, and why, is said here too (:func:`grid_refusal`, the message of
:meth:`tokenprune.models.vit.ViT.set_reducer`).

Torch-only; method files (``svit.py``, ``tpc.py``, ``tome.py``) import it, it imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .toolkit import run_on_kept, with_prefix


def block_window(block: nn.Module, hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of the windows a block attends within: its window, or the whole (h, w) grid for a
    global block."""
    ws = getattr(block, "window_size", 0)
    return (ws, ws) if ws else (int(hw[0]), int(hw[1]))


def window_ids(hw: tuple[int, int], window: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(h*w,) long: the row-major index of the window holding each position of the (h, w) grid (row-major),
    windows tiling the grid from the top left, the last row and column of windows reaching into the padding."""
    (h, w), (wh, ww) = hw, window
    rows = torch.arange(h, device=device) // wh
    cols = torch.arange(w, device=device) // ww
    return (rows[:, None] * math.ceil(w / ww) + cols[None, :]).reshape(-1)


def window_counts(keep: Tensor, hw: tuple[int, int], window: tuple[int, int]) -> Tensor:
    """(B, h*w) bool keep mask -> (B, windows) long, the kept tokens of each window of each image."""
    B = keep.shape[0]
    n_windows = math.ceil(hw[0] / window[0]) * math.ceil(hw[1] / window[1])
    ids = window_ids(hw, window, keep.device).expand(B, -1)
    return keep.new_zeros(B, n_windows, dtype=torch.long).scatter_add_(1, ids, keep.long())


@dataclass
class KeptWindows:
    """Where the kept tokens of a batch go when gathered window by window.

    Attributes:
        image: (K,) image of each kept token, grouped by window.
        position: (K,) its position on the (h, w) grid (row-major).
        window: (K,) the gathered window it goes to, 0..W-1 (windows without kept tokens are left out).
        slot: (K,) its row in that window, 0..n-1.
        coords: (W, n, 2) long, each slot's (row, column) inside its window (0 at batch padding).
        key_mask: (W, n) bool, True at the slots that hold a kept token.
        content_hw: (W, 2) long, the rows and columns of each window inside the token grid.
        counts: (B, windows) kept tokens of every window of every image (empty windows included).
        grid: The window (rows, columns) the coordinates are on.
    """

    image: Tensor
    position: Tensor
    window: Tensor
    slot: Tensor
    coords: Tensor
    key_mask: Tensor
    content_hw: Tensor
    counts: Tensor
    grid: tuple[int, int]

    @property
    def size(self) -> int:
        """n, the largest kept count of a window: the gathered windows' length."""
        return self.coords.shape[1]

    @property
    def has_padding(self) -> bool:
        """Whether some gathered window reaches into the zero padding of the grid."""
        return bool((self.content_hw < self.content_hw.new_tensor(self.grid)).any())


def kept_windows(keep: Tensor, hw: tuple[int, int], window: tuple[int, int]) -> KeptWindows:
    """Gather plan of the kept tokens window by window.

    Args:
        keep: (B, h*w) bool over the token grid (row-major).
        hw: The token grid (h, w).
        window: The window (rows, columns); the grid itself for a global block.

    Returns:
        The :class:`KeptWindows`; its cost is proportional to the kept tokens (a sort of their window ids), not
        to the grid.
    """
    (h, w), (wh, ww) = hw, window
    B = keep.shape[0]
    n_cols = math.ceil(w / ww)
    n_windows = math.ceil(h / wh) * n_cols
    image, position = keep.nonzero(as_tuple=True)
    row, col = position // w, position % w
    wid = image * n_windows + (row // wh) * n_cols + col // ww  # batch-wide window index
    order = torch.argsort(wid, stable=True)  # group by window, each in row-major order
    image, position, row, col, wid = image[order], position[order], row[order], col[order], wid[order]
    counts = torch.bincount(wid, minlength=B * n_windows)
    present = counts > 0
    compact = torch.cumsum(present.long(), 0) - 1  # batch-wide window -> gathered window
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(wid.numel(), device=keep.device) - starts[wid]
    window_of = compact[wid]
    sizes = counts[present]
    n_gathered, size = sizes.numel(), int(sizes.max()) if sizes.numel() else 0
    coords = torch.zeros(n_gathered, size, 2, dtype=torch.long, device=keep.device)
    coords[window_of, slot] = torch.stack([row % wh, col % ww], dim=-1)
    key_mask = torch.arange(size, device=keep.device) < sizes[:, None]
    kept_index = present.nonzero(as_tuple=True)[0] % n_windows  # the gathered windows' place in their image
    top, left = (kept_index // n_cols) * wh, (kept_index % n_cols) * ww
    content_hw = torch.stack([(h - top).clamp(max=wh), (w - left).clamp(max=ww)], dim=-1)
    return KeptWindows(
        image=image,
        position=position,
        window=window_of,
        slot=slot,
        coords=coords,
        key_mask=key_mask,
        content_hw=content_hw,
        counts=counts.reshape(B, n_windows),
        grid=(wh, ww),
    )


def run_gathered(block: nn.Module, x: Tensor, keep: Tensor, hw: tuple[int, int]) -> tuple[Tensor, KeptWindows]:
    """Run ``block`` on the kept tokens of each of its windows, always gathering (see the module docstring).

    Args:
        block: A :class:`tokenprune.models.vit.Block`, windowed or global.
        x: Tokens (B, h*w, C), the (h, w) grid row-major, no prefix token.
        keep: (B, h*w) bool, the tokens the block updates.
        hw: The token grid (h, w).

    Returns:
        (B, h*w, C): the block's output at kept positions, ``x`` elsewhere; and the gather plan.
    """
    B, N, C = x.shape
    if hw[0] * hw[1] != N:
        raise ValueError(f"{N} tokens do not fill a {hw[0]}x{hw[1]} grid: windowed token reduction needs no prefix")
    window = block_window(block, hw)
    plan = kept_windows(keep, hw, window)
    if plan.image.numel() == 0:
        return x, plan
    xk = x[plan.image, plan.position]  # (K, C)
    windows = xk.new_zeros(plan.coords.shape[0], plan.size, C)
    windows[plan.window, plan.slot] = block.norm1(xk)
    content = plan.content_hw if plan.has_padding else None
    a = block.attn.forward_at(windows, plan.coords, window, plan.key_mask, content)[plan.window, plan.slot]
    xk = xk + block.drop_path1(block.ls1(a))
    xk = xk + block.drop_path2(block.ls2(block.mlp(block.norm2(xk))))
    return x.index_put((plan.image, plan.position), xk), plan


def run_on_kept_windowed(block: nn.Module, x: Tensor, keep: Tensor, hw: tuple[int, int]) -> Tensor:
    """Run a block that needs the token grid (windowed, or global with relative positions) on the kept tokens
    only; the others keep their value. With every token kept the block runs densely (the same result, without
    gathering).

    Args:
        block: A :class:`tokenprune.models.vit.Block`.
        x: Tokens (B, h*w, C), the (h, w) grid row-major, no prefix token.
        keep: (B, h*w) bool, the tokens the block updates; a window (an image) may keep none.
        hw: The token grid (h, w).

    Returns:
        (B, h*w, C).
    """
    if bool(keep.all()):
        return block(x, None, hw)
    return run_gathered(block, x, keep, hw)[0]


def run_block_on_kept(block: nn.Module, x: Tensor, keep: Tensor, hw: tuple[int, int], num_prefix: int) -> Tensor:
    """Run a block on the kept patch tokens of each image only (a learned-gate reducer at inference); the others
    keep their value. A block that needs the token grid (``block.needs_grid``: windowed, or relative positions)
    runs each window on its kept tokens at their grid places (:func:`run_on_kept_windowed`); another gathers the
    kept tokens of each image, prefix tokens always kept (:func:`tokenprune.models.reducers.toolkit.run_on_kept`).

    Args:
        block: A :class:`tokenprune.models.vit.Block`.
        x: Tokens (B, num_prefix + h*w, C).
        keep: (B, h*w) bool over the patch tokens.
        hw: The token grid (h, w).
        num_prefix: Prefix tokens in front of the patch tokens (0 where the block needs the grid).

    Returns:
        (B, num_prefix + h*w, C).
    """
    if getattr(block, "needs_grid", False):
        return run_on_kept_windowed(block, x, keep, hw)
    return run_on_kept(block, x, with_prefix(keep, num_prefix, True))


# ------------------------------------------------------------------------------------ windows of one content size


@dataclass
class WindowGroup:
    """The windows of a token grid whose real tokens have one size (hv, wv): interior windows (the whole
    window), the right and bottom edges and the corner (cut by the grid's end; the rest is the zero padding of
    a windowed block). The same windows in every image of the batch.

    Attributes:
        index: (B * k, n) long, the real tokens of each window (row-major in the window) as indices into the
            batch's flattened (B * h*w) tokens; rows image by image, the k windows of an image in row-major order.
        positions: (k, n) long, the same tokens' positions on one image's (h, w) grid.
        coords: (n, 2) long, each slot's (row, column) inside its window.
        content_hw: (hv, wv), the rows and columns of the windows that hold tokens.
    """

    index: Tensor
    positions: Tensor
    coords: Tensor
    content_hw: tuple[int, int]

    @property
    def per_image(self) -> int:
        """k, the windows of this group in one image."""
        return self.positions.shape[0]

    @property
    def size(self) -> int:
        """n, the real tokens of each window."""
        return self.positions.shape[1]


def window_groups(
    batch: int, hw: tuple[int, int], window: tuple[int, int], device: torch.device | None = None
) -> list[WindowGroup]:
    """The windows of a (h, w) grid, grouped by the size of their real part (at most four groups), the grid
    padding left out.

    Args:
        batch: Images B.
        hw: The token grid (h, w).
        window: The window (rows, columns); the grid itself for a global block (one window).
        device: Device of the index tensors.

    Returns:
        The :class:`WindowGroup` s, in the order their first window appears (row-major).
    """
    (h, w), (wh, ww) = hw, window
    corners: dict[tuple[int, int], list[int]] = {}
    for top in range(0, h, wh):
        for left in range(0, w, ww):
            corners.setdefault((min(wh, h - top), min(ww, w - left)), []).append(top * w + left)
    groups = []
    for (hv, wv), starts in corners.items():
        rows = torch.arange(hv, device=device)[:, None].expand(hv, wv)
        cols = torch.arange(wv, device=device)[None, :].expand(hv, wv)
        local = (rows * w + cols).reshape(-1)
        positions = torch.tensor(starts, device=device)[:, None] + local[None, :]  # (k, n)
        images = torch.arange(batch, device=device)[:, None, None] * (h * w)
        groups.append(
            WindowGroup(
                index=(images + positions[None]).reshape(-1, hv * wv),
                positions=positions,
                coords=torch.stack([rows, cols], dim=-1).reshape(-1, 2),
                content_hw=(hv, wv),
            )
        )
    return groups


# ------------------------------------------------------------------------------------------------- refusals

GRID_ALTERNATIVES = (
    "Use SViT or TPC (pruned or paused tokens stay at their place; each window runs on its kept tokens), ToMe "
    "(merges inside each window and unmerges after every block), or a backbone with global attention and no "
    "relative positions (window_size=0, use_rel_pos=False)"
)
"""What to use instead, the end of every refusal."""

GRID_REFUSALS: dict[str, str] = {
    "EViTReducer": (
        "it removes the inattentive tokens from the token set for all later blocks and fuses them into one "
        "extra token that has no place on the grid, so the later blocks get a shorter set that cannot be cut "
        "into windows; and its score is the class token's attention (score='cls'), ViTDet has no class token "
        "(score='mean_attention' ranks the tokens of the whole image, not of a window)"
    ),
    "DynamicViTReducer": (
        "at inference it drops the pruned tokens from the token set for good (hierarchical pruning, no "
        "reactivation), so the later blocks get a shorter set that cannot be cut into windows; in training its "
        "policy softmax runs explicit attention over every key of the image, which a window or relative-position "
        "block does not offer; its predictor's global feature is a mean over the whole image"
    ),
    "PPTReducer": (
        "it prunes or pools tokens out of the token set (pooling is ToMe's matching over the whole image, "
        "across windows), so the later blocks get a shorter set that cannot be cut into windows; and its "
        "scores are the class token's attention (importance='cls'), ViTDet has no class token"
    ),
    "BATReducer": (
        "it clusters the inattentive tokens of the whole image (DPC-KNN, across windows) and merges attentive "
        "pairs, so the later blocks get a shorter set whose merged tokens belong to no single window; and its "
        "scores are the class token's attention (importance='cls'), ViTDet has no class token"
    ),
}
"""Why each reducer that cannot run in windowed or relative-position blocks cannot, by class name."""


def grid_refusal(reducer: nn.Module, what: str) -> str:
    """The message of a backbone with grid blocks refusing ``reducer``: the reducer, the backbone's grid blocks,
    why (:data:`GRID_REFUSALS`; for another reducer, that it does not keep every token at its grid place), and
    what to use (:data:`GRID_ALTERNATIVES`).

    Args:
        reducer: The refused reducer (``runs_on_grid`` False).
        what: The backbone's grid blocks in words, e.g. ``'window attention (window_size=14, ...)'``.
    """
    name = type(reducer).__name__
    why = GRID_REFUSALS.get(
        name,
        "it shrinks or merges the token set across the whole image (runs_on_grid is False), which breaks the "
        "window grid",
    )
    return (
        f"{name} cannot drive a backbone with {what}: {why}. Windows and relative positions need every token at "
        f"its place on the token grid (the window grid). {GRID_ALTERNATIVES}"
    )
