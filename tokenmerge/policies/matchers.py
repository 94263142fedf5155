"""Matchers: how tokens are split into sources and destinations, and paired.

* `AlternatingBipartite` (ToMe): even tokens are sources, odd tokens destinations.
* `RandomGrid` (ToMeSD): one destination per ``sx x sy`` cell of the token grid.
* `StridedGrid` (ToDo): one destination per cell, every source paired with its own
  cell's destination, so a full merge is average pooling.

The grid matchers take the grid of any rank a `~tokenmerge.layout.TokenLayout` gives
(``ctx.grid``): ``(h, w)`` images, ``(t, h, w)`` video with cells ``st`` frames deep, or
``(n,)`` rows. A 2-D grid is a 3-D grid with one frame, and there the partitions (and
the counter-based random draws) are exactly tomesd's.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..errors import TokenMergeError, check
from .base import Matcher, Matching, MergeContext, unit_rows
from .rng import PARTITIONS, hash_randint, partition_key

__all__ = [
    "AlternatingBipartite",
    "RandomGrid",
    "StridedGrid",
    "grid_partition",
    "cell_partition",
    "infer_grid",
    "infer_grid3d",
]


class AlternatingBipartite(Matcher):
    """ToMe's bipartite soft matching: tokens 0, 2, 4, ... are sources, 1, 3, 5, ... destinations.

    Each source is paired with its most cosine-similar destination.
    """

    max_ratio = 0.5
    traceable = True

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)``: ``ceil(N / 2)`` sources, ``floor(N / 2)`` destinations."""
        num_tokens = metric.shape[1]
        if torch.compiler.is_compiling():  # inline: inductor folds the aranges into their users
            src_idx, dst_idx = _alternating(num_tokens, metric.device)
        else:  # eager: built once per length and device, not two kernels per call
            src_idx, dst_idx = _alternating_cached(num_tokens, str(metric.device))
        unit = unit_rows(metric)  # (B, N, C)
        # Strided views, not gathers: the even and odd rows are read where they lie.
        return Matching.by_features(unit[:, 0::2], unit[:, 1::2], src_idx, dst_idx)


def _alternating(num_tokens: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Even positions ``(ceil(N/2),)`` and odd positions ``(floor(N/2),)``."""
    # max(..., 1): no tokens give two empty ranges (arange(1, 0, 2) would raise)
    return torch.arange(0, num_tokens, 2, device=device), torch.arange(1, max(num_tokens, 1), 2, device=device)


_alternating_cached = functools.lru_cache(maxsize=64)(_alternating)


def infer_grid(num_tokens: int, ctx: MergeContext) -> tuple[int, ...]:
    """The token grid: ``ctx.grid`` (``(n,)``, ``(h, w)`` or ``(t, h, w)``) when given, else a square ``(h, w)``."""
    if ctx.grid is not None:
        grid = tuple(ctx.grid)
        check(
            1 <= len(grid) <= 3 and all(isinstance(g, int) and g >= 1 for g in grid),
            f"grid must be (n,), (h, w) or (t, h, w) of ints >= 1; got {ctx.grid!r}",
        )
        check(math.prod(grid) == num_tokens, f"grid {ctx.grid} does not cover {num_tokens} tokens")
        return grid
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise TokenMergeError(
            f"grid must be given for {num_tokens} tokens, which do not form a square; "
            "pass MergeContext(grid=(height, width)) or a TokenLayout"
        )
    return side, side


def infer_grid3d(num_tokens: int, ctx: MergeContext) -> tuple[int, int, int]:
    """`infer_grid` as ``(t, h, w)``: an image ``(h, w)`` is ``(1, h, w)``, a sequence ``(n,)`` is ``(1, 1, n)``."""
    grid = infer_grid(num_tokens, ctx)
    return (1,) * (3 - len(grid)) + grid  # type: ignore[return-value]


def _cell_delta(offset: Tensor, sx: int, sy: int, st: int, h: int, w: int) -> Tensor:
    """Token-position offset of a raster offset inside an ``st x sy x sx`` cell (frame, row, column)."""
    if st == 1:  # a planar cell: row and column (tomesd's arithmetic, kernel for kernel)
        return (offset // sx) * w + offset % sx
    return (offset // (sx * sy)) * (h * w) + (offset // sx % sy) * w + offset % sx


def grid_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    choice: Tensor | None,
    device: torch.device | str | None = None,
    *,
    t: int = 1,
    st: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split a ``t x h x w`` token grid into one destination per full ``st x sy x sx`` cell.

    A 2-D grid is the case ``t = st = 1`` (the default), where the split is exactly
    tomesd's. Shapes depend only on the grid and the strides, never on values, so this
    traces under `torch.compile` without a graph break.

    Args:
        h, w: grid height and width.
        sx, sy: cell width and height.
        choice: ``(h // sy, w // sx)`` (or ``(t // st, h // sy, w // sx)``) index in
            ``[0, st*sy*sx)`` of each cell's destination within the cell (raster order:
            frame, row, column); None picks the first token of every cell.
        device: where to build the indices.
        t: frames of the grid (1 for an image).
        st: cell depth in frames (temporal stride).

    Returns:
        ``src_idx (Ns,)`` and ``dst_idx (Nd,)`` token positions (row-major over the grid,
        frame by frame), with ``Nd = (t // st) * (h // sy) * (w // sx)`` destinations
        ordered by cell and sources by position; and ``src_cell (Ns,)``: for each source,
        the index into ``dst_idx`` of the nearest full cell's destination (its own cell,
        or for tokens in edge cells that do not fill a stride, the adjoining full cell).
    """
    cells_t, cells_y, cells_x = t // st, h // sy, w // sx  # full cells only
    num_dst = cells_t * cells_y * cells_x
    rows = torch.arange(h, device=device)[:, None]  # (h, 1)
    cols = torch.arange(w, device=device)[None, :]  # (1, w)
    cell_y = (rows // sy).clamp_max(max(cells_y - 1, 0))  # (h, 1) nearest full cell row
    cell_x = (cols // sx).clamp_max(max(cells_x - 1, 0))  # (1, w)
    planar = t == 1 and st == 1
    if planar:
        cell = (cell_y * cells_x + cell_x).reshape(-1)  # (N,) nearest full cell of every token
    else:
        frames = torch.arange(t, device=device)[:, None, None]  # (t, 1, 1)
        cell_t = (frames // st).clamp_max(max(cells_t - 1, 0))  # (t, 1, 1)
        cell = (cell_t * (cells_y * cells_x) + cell_y * cells_x + cell_x).reshape(-1)  # (N,)
    if num_dst == 0:
        is_dst = torch.zeros(t * h * w, dtype=torch.bool, device=device)
    else:
        in_full_cell = (rows < cells_y * sy) & (cols < cells_x * sx)  # (h, w)
        offset = (rows % sy) * sx + (cols % sx)  # (h, w) position inside its cell
        if not planar:
            in_full_cell = (frames < cells_t * st) & in_full_cell  # (t, h, w)
            offset = (frames % st) * (sy * sx) + offset  # (t, h, w)
        if choice is None:
            chosen = torch.zeros(num_dst, dtype=torch.long, device=device)
        else:
            chosen = choice.reshape(-1).to(device=device, dtype=torch.long)  # (Nd,)
        is_dst = in_full_cell.reshape(-1) & (offset.reshape(-1) == chosen[cell])  # (N,)
    position = torch.arange(t * h * w, device=device)  # (N,)
    # Destinations first, by cell; then sources, by position. Fixed shapes, no nonzero().
    sort_key = torch.where(is_dst, cell, num_dst + position)  # (N,)
    order = sort_key.argsort()  # (N,)
    dst_idx, src_idx = order[:num_dst], order[num_dst:]  # (Nd,), (Ns,)
    return src_idx, dst_idx, cell[src_idx]


def cell_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    choice: Tensor | None,
    device: torch.device | str | None = None,
    *,
    t: int = 1,
    st: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """The partition of `grid_partition`, laid out cell by cell, with element-wise ops only.

    The same sources and destinations as `grid_partition`, but sources are ordered by cell
    (each cell's tokens but its destination, in raster order within the cell), then the
    edge tokens outside the full cells by position. No sort: every index is arithmetic on
    ``choice``, so a compiled graph computes it in one fused kernel. ``t`` and ``st``
    (frames, temporal stride) as in `grid_partition`; with both 1 the arithmetic is
    exactly the 2-D one.

    Returns:
        ``src_idx (Ns,)``, ``dst_idx (Nd,)`` and ``src_cell (Ns,)`` as in `grid_partition`.
    """
    cells_t, cells_y, cells_x = t // st, h // sy, w // sx  # full cells only
    num_dst, per_cell = cells_t * cells_y * cells_x, sx * sy * st
    full_t, full_h, full_w = cells_t * st, cells_y * sy, cells_x * sx
    planar = t == 1 and st == 1
    cell = torch.arange(num_dst, device=device)  # (Nd,)
    row = cell // max(cells_x, 1)  # (Nd,) the cell's row of cells (counted over all frames)
    if planar:
        base = row * (sy * w) + (cell % max(cells_x, 1)) * sx  # (Nd,) top-left token of each cell
    else:
        cell_f, cell_r = row // max(cells_y, 1), row % max(cells_y, 1)  # (Nd,), (Nd,)
        base = cell_f * (st * h * w) + cell_r * (sy * w) + (cell % max(cells_x, 1)) * sx  # (Nd,) first token
    chosen = (
        torch.zeros(num_dst, dtype=torch.long, device=device)
        if choice is None
        else choice.reshape(-1).to(device=device, dtype=torch.long)
    )  # (Nd,)
    dst_idx = base + _cell_delta(chosen, sx, sy, st, h, w)  # (Nd,)
    j = torch.arange(per_cell - 1, device=device)  # (k - 1,)
    offset = j[None, :] + (j[None, :] >= chosen[:, None]).long()  # (Nd, k - 1) skip the destination
    cell_src = (base[:, None] + _cell_delta(offset, sx, sy, st, h, w)).reshape(-1)  # (Nd * (k - 1),)
    cell_of_src = cell.repeat_interleave(per_cell - 1)  # (Nd * (k - 1),)
    # Edge tokens, by position: columns right of the full cells in the full rows, then the rows below.
    right = (
        torch.arange(full_h, device=device)[:, None] * w + torch.arange(full_w, w, device=device)[None, :]
    ).reshape(-1)
    below = torch.arange(full_h * w, h * w, device=device)
    edge = torch.cat([right, below])  # (E,)
    if planar:
        edge_y = (edge // w // sy).clamp_max(max(cells_y - 1, 0))
    else:  # that edge in every frame of the full cells, then the frames below them
        in_frames = (torch.arange(full_t, device=device)[:, None] * (h * w) + edge[None, :]).reshape(-1)
        edge = torch.cat([in_frames, torch.arange(full_t * h * w, t * h * w, device=device)])  # (E,)
        edge_y = (edge // w % h // sy).clamp_max(max(cells_y - 1, 0))
    edge_x = (edge % w // sx).clamp_max(max(cells_x - 1, 0))
    edge_cell = edge_y * cells_x + edge_x  # (E,) nearest full cell
    if not planar:
        edge_t = (edge // (h * w) // st).clamp_max(max(cells_t - 1, 0))
        edge_cell = edge_t * (cells_y * cells_x) + edge_cell  # (E,)
    src_idx = torch.cat([cell_src, edge])  # (Ns,)
    src_cell = torch.cat([cell_of_src, edge_cell])  # (Ns,)
    return src_idx, dst_idx, src_cell


#: Largest stride along any one axis of a grid matcher's cell.
MAX_STRIDE = 64
#: Largest number of tokens in one cell (``sx * sy * st``; the counter-based draw's bound).
MAX_CELL = 4096


def _check_strides(sx: object, sy: object, st: object, use_rand: object) -> None:
    for name, value in (("sx", sx), ("sy", sy), ("st", st)):
        check(
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_STRIDE,
            f"{name} must be an int in [1, {MAX_STRIDE}]; got {value!r}",
        )
    cell = sx * sy * st  # type: ignore[operator]
    check(cell > 1, f"sx * sy must be at least 2 (or st >= 2) so a cell has a source; got sx={sx}, sy={sy}, st={st}")
    check(cell <= MAX_CELL, f"sx * sy * st must be at most {MAX_CELL}; got sx={sx}, sy={sy}, st={st}")
    check(isinstance(use_rand, bool), f"use_rand must be a bool; got {use_rand!r}")


class RandomGrid(Matcher):
    """ToMeSD's matcher: one destination per ``sx x sy`` cell of the token grid.

    The destination's place in each cell is drawn from the merging state's seeded
    generator (``use_rand=True``, one draw shared by the whole batch), or is the
    top-left token (``use_rand=False``). Tokens in edge cells that do not fill a
    stride are all sources. Each source is paired with its most similar destination
    anywhere in the grid.

    The grid is ``ctx.grid`` (a `~tokenmerge.layout.TokenLayout`'s grid): ``(h, w)``
    for images, ``(t, h, w)`` for video, where a cell spans ``st`` frames (``st x sy x
    sx`` tokens), or ``(n,)``, a single row (cells of ``sx`` tokens, so only ``sy = st =
    1`` has full cells). A 2-D grid is a 3-D one with ``t = 1``; there the partitions are
    exactly tomesd's.

    Args:
        sx: cell width, an int in ``[1, 64]``.
        sy: cell height, an int in ``[1, 64]``.
        use_rand: draw each cell's destination at random (a bool).
        st: cell depth in frames (temporal stride), an int in ``[1, 64]``; 1 merges
            within each frame only.
    """

    traceable = True

    def __init__(self, sx: int = 2, sy: int = 2, use_rand: bool = True, st: int = 1) -> None:
        _check_strides(sx, sy, st, use_rand)
        self.sx, self.sy, self.use_rand, self.st = sx, sy, use_rand, st

    @property
    def max_ratio(self) -> float:  # type: ignore[override]
        """``1 - 1 / (sx * sy * st)``: all but one token of every cell."""
        return 1.0 - 1.0 / (self.sx * self.sy * self.st)

    def fits(self, grid: tuple[int, ...]) -> bool:
        """Whether ``grid`` (``(n,)``, ``(h, w)`` or ``(t, h, w)``) holds a full ``st x sy x sx`` cell.

        On a grid that does not, every token is a source without a destination of its
        cell: nothing merges. Adapters use this to refuse a cell that cannot fit.
        """
        t, h, w = (1,) * (3 - len(grid)) + tuple(grid)
        return t >= self.st and h >= self.sy and w >= self.sx

    def draw_choice(
        self, h: int, w: int, ctx: MergeContext, device: torch.device | str | None = None, *, t: int = 1
    ) -> Tensor | None:
        """Each full cell's destination offset, ``(h // sy, w // sx)``, or None for the first token.

        On a video grid (``t`` frames; or any ``st > 1``) the offsets have shape ``(t //
        st, h // sy, w // sx)`` and lie in ``[0, st * sy * sx)``. With ``ctx.seed`` set
        (always, under `tokenmerge.apply`) the draw is one of `PARTITIONS` counter-based
        hash draws, picked by `partition_key` from ``(seed, layer_index, timestep)``
        (`tokenmerge.policies.rng`): pure tensor ops on the timestep's device, so it
        traces under `torch.compile`, replays in CUDA graphs and is the same on every
        backend. Without a seed it draws from ``ctx.generator``.
        """
        if not self.use_rand:
            return None
        shape: tuple[int, ...] = (h // self.sy, w // self.sx)
        if t != 1 or self.st != 1:
            shape = (t // self.st, *shape)
        high = self.sx * self.sy * self.st
        if ctx.seed is not None:
            key = partition_key(ctx.seed, ctx.layer_index, ctx.timestep, ctx.step)
            return hash_randint(high, shape, key, device=device)
        gen = ctx.generator
        device = gen.device if gen is not None else "cpu"
        return torch.randint(high, shape, generator=gen, device=device)

    def partition(
        self, h: int, w: int, ctx: MergeContext, device: torch.device, *, t: int = 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`cell_partition` of the cell choice `draw_choice` makes: ``src_idx, dst_idx, src_cell``.

        In eager mode the partitions are built once per grid shape (``t, h, w``) and
        device and then looked up (one index op per call, instead of a few dozen small
        kernels); a compiled graph builds them inline (inductor fuses that). Both give
        the same indices.
        """
        sx, sy, st = self.sx, self.sy, self.st
        if ctx.seed is None and self.use_rand:  # the generator path: nothing to cache
            return cell_partition(h, w, sx, sy, self.draw_choice(h, w, ctx, t=t), device, t=t, st=st)
        if torch.compiler.is_compiling():
            return cell_partition(h, w, sx, sy, self.draw_choice(h, w, ctx, device, t=t), device, t=t, st=st)
        if not self.use_rand:
            return _fixed_partition(t, h, w, sx, sy, st, str(device))
        table = _partition_table(t, h, w, sx, sy, st, str(device))  # (PARTITIONS, Ns + Nd + Ns)
        num_dst = (t // st) * (h // sy) * (w // sx)
        num_src = t * h * w - num_dst
        key = partition_key(ctx.seed, ctx.layer_index, ctx.timestep, ctx.step)  # type: ignore[arg-type]
        row = table[key] if not isinstance(key, Tensor) else table[key.to(device)][0]  # one index op
        return row[:num_src], row[num_src : num_src + num_dst], row[num_src + num_dst :]  # (Ns,), (Nd,), (Ns,)

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)`` laid out on ``ctx.grid`` (row-major, frame by frame)."""
        t, h, w = infer_grid3d(metric.shape[1], ctx)
        src_idx, dst_idx, _ = self.partition(h, w, ctx, metric.device, t=t)
        return Matching.by_similarity(metric, src_idx, dst_idx)


@functools.lru_cache(maxsize=64)
def _partition_table(t: int, h: int, w: int, sx: int, sy: int, st: int, device: str) -> Tensor:
    """Every random partition of a ``(t, h, w)`` grid, ``(PARTITIONS, Ns + Nd + Ns)``: row k
    holds the ``src_idx``, ``dst_idx`` and ``src_cell`` of the draw of key k, side by side,
    so a lookup is one index op."""
    shape: tuple[int, ...] = (h // sy, w // sx) if t == 1 and st == 1 else (t // st, h // sy, w // sx)
    rows = [
        torch.cat(cell_partition(h, w, sx, sy, hash_randint(sx * sy * st, shape, key), device, t=t, st=st))
        for key in range(PARTITIONS)
    ]
    return torch.stack(rows)


@functools.lru_cache(maxsize=64)
def _fixed_partition(t: int, h: int, w: int, sx: int, sy: int, st: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """The partition with every cell's first token as its destination (``use_rand=False``)."""
    return cell_partition(h, w, sx, sy, None, device, t=t, st=st)


class StridedGrid(RandomGrid):
    """ToDo's matcher: every source is paired with the destination of its own cell.

    Merging every source (ratio ``1 - 1/(sx*sy*st)``) is average pooling over ``sx x
    sy`` cells (``st x sy x sx`` on a video grid); a smaller ratio merges the sources
    most similar to their own cell's destination first. Sources in edge cells that do
    not fill a stride pair with the adjoining full cell. The destination is the first
    (top-left) token of each cell unless ``use_rand``. Arguments and grids as in
    `RandomGrid`.
    """

    def __init__(self, sx: int = 2, sy: int = 2, use_rand: bool = False, st: int = 1) -> None:
        super().__init__(sx=sx, sy=sy, use_rand=use_rand, st=st)

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)``; ``score`` is each source's cosine to its own cell's destination."""
        batch, num_tokens, _ = metric.shape
        t, h, w = infer_grid3d(num_tokens, ctx)
        src_idx, dst_idx, src_cell = self.partition(h, w, ctx, metric.device, t=t)
        unit = unit_rows(metric)  # (B, N, C)
        if dst_idx.numel() == 0:
            score = metric.new_full((batch, src_idx.numel()), float("-inf"))
        else:
            score = (unit[:, src_idx] * unit[:, dst_idx[src_cell]]).sum(-1)  # (B, Ns)
        return Matching(
            src_idx=src_idx.expand(batch, -1),
            dst_idx=dst_idx.expand(batch, -1),
            best=src_cell.expand(batch, -1),
            score=score,
        )
