"""Matchers: how tokens are split into sources and destinations, and paired.

* `AlternatingBipartite` (ToMe): even tokens are sources, odd tokens destinations.
* `RandomGrid` (ToMeSD): one destination per ``sx x sy`` cell of the token grid.
* `StridedGrid` (ToDo): one destination per cell, every source paired with its own
  cell's destination, so a full merge is average pooling.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..errors import TokenMergeError, check
from .base import Matcher, Matching, MergeContext, unit_rows
from .rng import PARTITIONS, hash_randint, partition_key

__all__ = ["AlternatingBipartite", "RandomGrid", "StridedGrid", "grid_partition", "cell_partition", "infer_grid"]


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
    return torch.arange(0, num_tokens, 2, device=device), torch.arange(1, num_tokens, 2, device=device)


_alternating_cached = functools.lru_cache(maxsize=64)(_alternating)


def infer_grid(num_tokens: int, ctx: MergeContext) -> tuple[int, int]:
    """The token grid ``(h, w)``: ``ctx.grid`` when given, else a square grid."""
    if ctx.grid is not None:
        h, w = ctx.grid
        check(h * w == num_tokens, f"grid {ctx.grid} does not cover {num_tokens} tokens")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise TokenMergeError(
            f"grid must be given for {num_tokens} tokens, which do not form a square; "
            "pass MergeContext(grid=(height, width))"
        )
    return side, side


def grid_partition(
    h: int, w: int, sx: int, sy: int, choice: Tensor | None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Split an ``h x w`` token grid into one destination per full ``sy x sx`` cell.

    Shapes depend only on ``h, w, sx, sy``, never on values, so this traces under
    `torch.compile` without a graph break.

    Args:
        h, w: grid height and width.
        sx, sy: cell width and height.
        choice: ``(h // sy, w // sx)`` index in ``[0, sx*sy)`` of each cell's destination
            within the cell (row-major); None picks the top-left token of every cell.
        device: where to build the indices.

    Returns:
        ``src_idx (Ns,)`` and ``dst_idx (Nd,)`` token positions (row-major over the grid),
        with ``Nd = (h // sy) * (w // sx)`` destinations ordered by cell and sources by
        position; and ``src_cell (Ns,)``: for each source, the index into ``dst_idx`` of
        the nearest full cell's destination (its own cell, or for tokens in edge cells
        that do not fill a stride, the adjoining full cell).
    """
    cells_y, cells_x = h // sy, w // sx  # full cells only
    num_dst = cells_y * cells_x
    rows = torch.arange(h, device=device)[:, None]  # (h, 1)
    cols = torch.arange(w, device=device)[None, :]  # (1, w)
    cell_y = (rows // sy).clamp_max(max(cells_y - 1, 0))  # (h, 1) nearest full cell row
    cell_x = (cols // sx).clamp_max(max(cells_x - 1, 0))  # (1, w)
    cell = (cell_y * cells_x + cell_x).reshape(-1)  # (N,) nearest full cell of every token
    if num_dst == 0:
        is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    else:
        in_full_cell = (rows < cells_y * sy) & (cols < cells_x * sx)  # (h, w)
        offset = ((rows % sy) * sx + (cols % sx)).reshape(-1)  # (N,) position inside its cell
        if choice is None:
            chosen = torch.zeros(num_dst, dtype=torch.long, device=device)
        else:
            chosen = choice.reshape(-1).to(device=device, dtype=torch.long)  # (Nd,)
        is_dst = in_full_cell.reshape(-1) & (offset == chosen[cell])  # (N,)
    position = torch.arange(h * w, device=device)  # (N,)
    # Destinations first, by cell; then sources, by position. Fixed shapes, no nonzero().
    sort_key = torch.where(is_dst, cell, num_dst + position)  # (N,)
    order = sort_key.argsort()  # (N,)
    dst_idx, src_idx = order[:num_dst], order[num_dst:]  # (Nd,), (Ns,)
    return src_idx, dst_idx, cell[src_idx]


def cell_partition(
    h: int, w: int, sx: int, sy: int, choice: Tensor | None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The partition of `grid_partition`, laid out cell by cell, with element-wise ops only.

    The same sources and destinations as `grid_partition`, but sources are ordered by cell
    (each cell's tokens but its destination, in raster order within the cell), then the
    edge tokens outside the full cells by position. No sort: every index is arithmetic on
    ``choice``, so a compiled graph computes it in one fused kernel.

    Returns:
        ``src_idx (Ns,)``, ``dst_idx (Nd,)`` and ``src_cell (Ns,)`` as in `grid_partition`.
    """
    cells_y, cells_x = h // sy, w // sx  # full cells only
    num_dst, per_cell = cells_y * cells_x, sx * sy
    full_h, full_w = cells_y * sy, cells_x * sx
    cell = torch.arange(num_dst, device=device)  # (Nd,)
    base = (cell // max(cells_x, 1)) * (sy * w) + (cell % max(cells_x, 1)) * sx  # (Nd,) top-left token of each cell
    chosen = (
        torch.zeros(num_dst, dtype=torch.long, device=device)
        if choice is None
        else choice.reshape(-1).to(device=device, dtype=torch.long)
    )  # (Nd,)
    dst_idx = base + (chosen // sx) * w + chosen % sx  # (Nd,)
    j = torch.arange(per_cell - 1, device=device)  # (k - 1,)
    offset = j[None, :] + (j[None, :] >= chosen[:, None]).long()  # (Nd, k - 1) skip the destination
    cell_src = (base[:, None] + (offset // sx) * w + offset % sx).reshape(-1)  # (Nd * (k - 1),)
    cell_of_src = cell.repeat_interleave(per_cell - 1)  # (Nd * (k - 1),)
    # Edge tokens, by position: columns right of the full cells in the full rows, then the rows below.
    right = (
        torch.arange(full_h, device=device)[:, None] * w + torch.arange(full_w, w, device=device)[None, :]
    ).reshape(-1)
    below = torch.arange(full_h * w, h * w, device=device)
    edge = torch.cat([right, below])  # (E,)
    edge_y = (edge // w // sy).clamp_max(max(cells_y - 1, 0))
    edge_x = (edge % w // sx).clamp_max(max(cells_x - 1, 0))
    edge_cell = edge_y * cells_x + edge_x  # (E,) nearest full cell
    src_idx = torch.cat([cell_src, edge])  # (Ns,)
    src_cell = torch.cat([cell_of_src, edge_cell])  # (Ns,)
    return src_idx, dst_idx, src_cell


class RandomGrid(Matcher):
    """ToMeSD's matcher: one destination per ``sx x sy`` cell of the token grid.

    The destination's place in each cell is drawn from the merging state's seeded
    generator (``use_rand=True``, one draw shared by the whole batch), or is the
    top-left token (``use_rand=False``). Tokens in edge cells that do not fill a
    stride are all sources. Each source is paired with its most similar destination
    anywhere in the grid.

    Args:
        sx: cell width.
        sy: cell height.
        use_rand: draw each cell's destination at random.
    """

    traceable = True

    def __init__(self, sx: int = 2, sy: int = 2, use_rand: bool = True) -> None:
        check(isinstance(sx, int) and sx >= 1, f"sx must be an int >= 1; got {sx!r}")
        check(isinstance(sy, int) and sy >= 1, f"sy must be an int >= 1; got {sy!r}")
        check(sx * sy > 1, f"sx * sy must be at least 2 so a cell has a source; got sx={sx}, sy={sy}")
        self.sx, self.sy, self.use_rand = sx, sy, bool(use_rand)

    @property
    def max_ratio(self) -> float:  # type: ignore[override]
        """``1 - 1 / (sx * sy)``: all but one token of every cell."""
        return 1.0 - 1.0 / (self.sx * self.sy)

    def draw_choice(self, h: int, w: int, ctx: MergeContext, device: torch.device | str | None = None) -> Tensor | None:
        """Each full cell's destination offset, ``(h // sy, w // sx)``, or None for top-left.

        With ``ctx.seed`` set (always, under `tokenmerge.apply`) the draw is one of
        `PARTITIONS` counter-based hash draws, picked by `partition_key` from ``(seed,
        layer_index, timestep)`` (`tokenmerge.policies.rng`): pure tensor ops on the
        timestep's device, so it traces under `torch.compile`, replays in CUDA graphs and
        is the same on every backend. Without a seed it draws from ``ctx.generator``.
        """
        if not self.use_rand:
            return None
        shape = (h // self.sy, w // self.sx)
        if ctx.seed is not None:
            key = partition_key(ctx.seed, ctx.layer_index, ctx.timestep, ctx.step)
            return hash_randint(self.sx * self.sy, shape, key, device=device)
        gen = ctx.generator
        device = gen.device if gen is not None else "cpu"
        return torch.randint(self.sx * self.sy, shape, generator=gen, device=device)

    def partition(self, h: int, w: int, ctx: MergeContext, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """`cell_partition` of the cell choice `draw_choice` makes: ``src_idx, dst_idx, src_cell``.

        In eager mode the partitions are built once per grid shape and device and then
        looked up (one index op per call, instead of a few dozen small kernels); a
        compiled graph builds them inline (inductor fuses that). Both give the same indices.
        """
        if ctx.seed is None and self.use_rand:  # the generator path: nothing to cache
            return cell_partition(h, w, self.sx, self.sy, self.draw_choice(h, w, ctx), device)
        if torch.compiler.is_compiling():
            return cell_partition(h, w, self.sx, self.sy, self.draw_choice(h, w, ctx, device), device)
        if not self.use_rand:
            return _fixed_partition(h, w, self.sx, self.sy, str(device))
        table = _partition_table(h, w, self.sx, self.sy, str(device))  # (PARTITIONS, Ns + Nd + Ns)
        num_dst = (h // self.sy) * (w // self.sx)
        num_src = h * w - num_dst
        key = partition_key(ctx.seed, ctx.layer_index, ctx.timestep, ctx.step)  # type: ignore[arg-type]
        row = table[key] if not isinstance(key, Tensor) else table[key.to(device)][0]  # one index op
        return row[:num_src], row[num_src : num_src + num_dst], row[num_src + num_dst :]  # (Ns,), (Nd,), (Ns,)

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)`` laid out on ``ctx.grid`` (row-major)."""
        h, w = infer_grid(metric.shape[1], ctx)
        src_idx, dst_idx, _ = self.partition(h, w, ctx, metric.device)
        return Matching.by_similarity(metric, src_idx, dst_idx)


@functools.lru_cache(maxsize=64)
def _partition_table(h: int, w: int, sx: int, sy: int, device: str) -> Tensor:
    """Every random partition of a grid, ``(PARTITIONS, Ns + Nd + Ns)``: row k holds the
    ``src_idx``, ``dst_idx`` and ``src_cell`` of the draw of key k, side by side, so a
    lookup is one index op."""
    shape = (h // sy, w // sx)
    rows = [
        torch.cat(cell_partition(h, w, sx, sy, hash_randint(sx * sy, shape, key), device)) for key in range(PARTITIONS)
    ]
    return torch.stack(rows)


@functools.lru_cache(maxsize=64)
def _fixed_partition(h: int, w: int, sx: int, sy: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """The partition with every cell's top-left token as its destination (``use_rand=False``)."""
    return cell_partition(h, w, sx, sy, None, device)


class StridedGrid(RandomGrid):
    """ToDo's matcher: every source is paired with the destination of its own cell.

    Merging every source (ratio ``1 - 1/(sx*sy)``) is average pooling over
    ``sx x sy`` cells; a smaller ratio merges the sources most similar to their own
    cell's destination first. Sources in edge cells that do not fill a stride pair with
    the adjoining full cell. The destination is the top-left token of each cell unless
    ``use_rand``.
    """

    def __init__(self, sx: int = 2, sy: int = 2, use_rand: bool = False) -> None:
        super().__init__(sx=sx, sy=sy, use_rand=use_rand)

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)``; ``score`` is each source's cosine to its own cell's destination."""
        batch, num_tokens, _ = metric.shape
        h, w = infer_grid(num_tokens, ctx)
        src_idx, dst_idx, src_cell = self.partition(h, w, ctx, metric.device)
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
