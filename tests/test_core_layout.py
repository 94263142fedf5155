"""Token layouts: validation, prefix- and suffix-protected plans, N-D grid partitions, side data.

The 2-D partitions are compared with frozen copies of the functions as they were before
grids became N-D (`old_grid_partition`, `old_cell_partition`), and with the counter-based
draws they were fed: a 2-D grid must give exactly the old indices, in the same order.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import tokenmerge
from tokenmerge import (
    MergeConfig,
    MergePlan,
    MergeState,
    TokenLayout,
    TokenMergeError,
    identity_token_map,
    source_matrix,
)
from tokenmerge.policies import (
    AlternatingBipartite,
    FixedRatio,
    Matching,
    MergeContext,
    NoCache,
    RandomGrid,
    RecomputeAt,
    StridedGrid,
    ThresholdPolicy,
)
from tokenmerge.policies.matchers import cell_partition, grid_partition
from tokenmerge.policies.rng import hash_randint, partition_key
from tokenmerge.tools.ideal import IdealMatcher

FEW = settings(max_examples=30)


# ---------------------------------------------------------------------- frozen 2-D reference
def old_grid_partition(
    h: int, w: int, sx: int, sy: int, choice: Tensor | None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`grid_partition` as it was before N-D grids (frozen copy; do not edit)."""
    cells_y, cells_x = h // sy, w // sx
    num_dst = cells_y * cells_x
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    cell_y = (rows // sy).clamp_max(max(cells_y - 1, 0))
    cell_x = (cols // sx).clamp_max(max(cells_x - 1, 0))
    cell = (cell_y * cells_x + cell_x).reshape(-1)
    if num_dst == 0:
        is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    else:
        in_full_cell = (rows < cells_y * sy) & (cols < cells_x * sx)
        offset = ((rows % sy) * sx + (cols % sx)).reshape(-1)
        if choice is None:
            chosen = torch.zeros(num_dst, dtype=torch.long, device=device)
        else:
            chosen = choice.reshape(-1).to(device=device, dtype=torch.long)
        is_dst = in_full_cell.reshape(-1) & (offset == chosen[cell])
    position = torch.arange(h * w, device=device)
    sort_key = torch.where(is_dst, cell, num_dst + position)
    order = sort_key.argsort()
    dst_idx, src_idx = order[:num_dst], order[num_dst:]
    return src_idx, dst_idx, cell[src_idx]


def old_cell_partition(
    h: int, w: int, sx: int, sy: int, choice: Tensor | None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """`cell_partition` as it was before N-D grids (frozen copy; do not edit)."""
    cells_y, cells_x = h // sy, w // sx
    num_dst, per_cell = cells_y * cells_x, sx * sy
    full_h, full_w = cells_y * sy, cells_x * sx
    cell = torch.arange(num_dst, device=device)
    base = (cell // max(cells_x, 1)) * (sy * w) + (cell % max(cells_x, 1)) * sx
    chosen = (
        torch.zeros(num_dst, dtype=torch.long, device=device)
        if choice is None
        else choice.reshape(-1).to(device=device, dtype=torch.long)
    )
    dst_idx = base + (chosen // sx) * w + chosen % sx
    j = torch.arange(per_cell - 1, device=device)
    offset = j[None, :] + (j[None, :] >= chosen[:, None]).long()
    cell_src = (base[:, None] + (offset // sx) * w + offset % sx).reshape(-1)
    cell_of_src = cell.repeat_interleave(per_cell - 1)
    right = (
        torch.arange(full_h, device=device)[:, None] * w + torch.arange(full_w, w, device=device)[None, :]
    ).reshape(-1)
    below = torch.arange(full_h * w, h * w, device=device)
    edge = torch.cat([right, below])
    edge_y = (edge // w // sy).clamp_max(max(cells_y - 1, 0))
    edge_x = (edge % w // sx).clamp_max(max(cells_x - 1, 0))
    edge_cell = edge_y * cells_x + edge_x
    return torch.cat([cell_src, edge]), dst_idx, torch.cat([cell_of_src, edge_cell])


def assert_same(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


# ---------------------------------------------------------------------- layouts
def test_layout_constructors_and_sizes() -> None:
    video = TokenLayout.video(2, 3, 4, prefix=1, suffix=5)
    assert video.grid == (2, 3, 4) and video.rank == 3 and video.grid3d == (2, 3, 4)
    assert (video.num_mergeable, video.num_tokens, video.merge_start, video.merge_stop) == (24, 30, 1, 25)
    image = TokenLayout.image(3, 4, prefix=2)
    assert image.grid3d == (1, 3, 4) and image.num_tokens == 14 and image.suffix == 0
    seq = TokenLayout.sequence(7, suffix=3)
    assert seq.grid == (7,) and seq.grid3d == (1, 1, 7) and (seq.merge_start, seq.merge_stop) == (0, 7)
    assert TokenLayout([3, 4], 2) == image and hash(TokenLayout([3, 4], 2)) == hash(
        image
    )  # a list is stored as a tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.prefix = 3  # type: ignore[misc]
    assert tokenmerge.TokenLayout is TokenLayout


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TokenLayout.sequence(0), "n must be an int >= 1; got 0"),
        (lambda: TokenLayout.image(True, 4), "h must be an int >= 1; got True"),
        (lambda: TokenLayout.image(4, 4.0), "w must be an int >= 1; got 4.0"),  # type: ignore[arg-type]
        (lambda: TokenLayout.video(0, 2, 2), "t must be an int >= 1"),
        (lambda: TokenLayout.image(4, 4, prefix=-1), "prefix must be an int >= 0; got -1"),
        (lambda: TokenLayout.image(4, 4, suffix=False), "suffix must be an int >= 0; got False"),
        (lambda: TokenLayout.sequence(4, prefix=1.0), "prefix must be an int >= 0"),  # type: ignore[arg-type]
        (lambda: TokenLayout(()), "grid must be a tuple"),
        (lambda: TokenLayout((1, 2, 3, 4)), "grid must be a tuple"),
        (lambda: TokenLayout("ab"), "grid must be a tuple"),  # type: ignore[arg-type]
        (lambda: TokenLayout((2, 0)), "grid entries must be ints >= 1"),
        (lambda: TokenLayout((2, True)), "grid entries must be ints >= 1"),
        (lambda: TokenLayout.image(2, 2).after_merge(4), "r must be an int in \\[0, 4\\)"),
        (lambda: TokenLayout.image(2, 2).after_merge(True), "r must be an int"),
        (lambda: TokenLayout.image(2, 2, prefix=1).check_tokens(4), "covers 5 tokens but the metric has 4"),
    ],
)
def test_layout_validation_names_the_field(make, message: str) -> None:
    with pytest.raises(TokenMergeError, match=message):
        make()


def test_after_merge_chains_a_stream() -> None:
    layout = TokenLayout.image(4, 4, prefix=1, suffix=2)
    metric = torch.randn(2, layout.num_tokens, 8)
    plan = AlternatingBipartite().build_plan(metric, MergeContext(grid=layout.grid), Exactly(5), layout)
    after = layout.after_merge(plan)
    assert after == TokenLayout.sequence(11, prefix=1, suffix=2) == layout.after_merge(5)
    assert after.num_tokens == plan.num_out
    # The next block plans on the merged tokens with the chained layout.
    merged = plan.merge(metric)
    second = AlternatingBipartite().build_plan(merged, MergeContext(grid=after.grid), Exactly(3), after)
    assert second.num_out == after.num_tokens - 3
    assert torch.equal(second.merge(merged)[:, -2:], metric[:, -2:])


# ---------------------------------------------------------------------- plans with protected spans
class Exactly(ThresholdPolicy):
    """Merge exactly ``r`` sources (capped by the matching)."""

    traceable = True

    def __init__(self, r: int) -> None:
        self.r = r

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        return min(self.r, matching.max_merge)


def _grid_matcher(draw: st.DrawFn, rank: int):
    sx, sy = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    st_ = draw(st.sampled_from([1, 2])) if rank == 3 else 1
    if sx * sy * st_ == 1:
        sx = 2
    kind = draw(st.sampled_from(["bipartite", "random", "fixed", "strided"]))
    return {
        "bipartite": lambda: AlternatingBipartite(),
        "random": lambda: RandomGrid(sx, sy, use_rand=True, st=st_),
        "fixed": lambda: RandomGrid(sx, sy, use_rand=False, st=st_),
        "strided": lambda: StridedGrid(sx, sy, st=st_),
    }[kind]()


@st.composite
def layout_case(draw: st.DrawFn) -> dict:
    """A layout of rank 1-3 with a prefix and a suffix, a matcher for it, a batch and a seed."""
    rank = draw(st.integers(1, 3))
    if rank == 1:
        grid: tuple[int, ...] = (draw(st.integers(1, 20)),)
    elif rank == 2:
        grid = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    else:
        grid = (draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    layout = TokenLayout(grid, prefix=draw(st.integers(0, 3)), suffix=draw(st.integers(0, 3)))
    return {
        "layout": layout,
        "matcher": _grid_matcher(draw, rank),
        "batch": draw(st.integers(1, 3)),
        "channels": draw(st.integers(1, 5)),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _metric(case: dict) -> Tensor:
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["layout"].num_tokens, case["channels"])
    return torch.randn(shape, generator=gen).to(case["dtype"])


def _plan(case: dict, metric: Tensor, data: st.DataObject) -> tuple[MergePlan, Matching]:
    layout = case["layout"]
    ctx = MergeContext(grid=layout.grid, seed=case["seed"], layer_index=case["seed"] % 5)
    matching = case["matcher"].match(metric[:, layout.merge_start : layout.merge_stop], ctx)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, layout=layout)
    # The same plan through Matcher.build_plan with the layout, and with the old ints.
    built = case["matcher"].build_plan(metric, ctx, Exactly(r), layout)
    assert torch.equal(built.slot, plan.slot) and torch.equal(built.keep_idx, plan.keep_idx)
    by_ints = MergePlan.from_matching(matching, r, layout.prefix, suffix=layout.suffix)
    assert torch.equal(by_ints.slot, plan.slot) and torch.equal(by_ints.merged_slot, plan.merged_slot)
    return plan, matching


@FEW
@given(layout_case(), st.data())
def test_protected_prefix_and_suffix_stay_in_place_bitwise(case: dict, data: st.DataObject) -> None:
    layout: TokenLayout = case["layout"]
    metric = _metric(case)
    plan, _ = _plan(case, metric, data)
    num, prefix, suffix, r = layout.num_tokens, layout.prefix, layout.suffix, plan.r
    batch = case["batch"]
    # Sizes: arbitrary on the span, powers of two on the protected tokens (exact in a weighted mean).
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    size = torch.randint(1, 5, (batch, num), generator=gen).to(metric.dtype)
    size[:, :prefix] = 2.0 ** torch.randint(0, 3, (batch, prefix), generator=gen).to(metric.dtype)
    size[:, layout.merge_stop :] = 2.0 ** torch.randint(0, 3, (batch, suffix), generator=gen).to(metric.dtype)
    for mode in ("mean", "sum", "weighted"):
        for form in ("index", "matrix"):
            merged = plan.merge(metric, mode, size if mode == "weighted" else None, form=form)
            assert merged.shape == (batch, num - r, case["channels"])
            assert torch.equal(merged[:, :prefix], metric[:, :prefix])
            assert torch.equal(merged[:, num - r - suffix :], metric[:, layout.merge_stop :])
            back = plan.unmerge(merged)
            assert back.shape == metric.shape
            assert torch.equal(back[:, :prefix], metric[:, :prefix])
            assert torch.equal(back[:, layout.merge_stop :], metric[:, layout.merge_stop :])
    # Index arithmetic: protected tokens keep their slots; merges stay inside the span.
    assert torch.equal(plan.slot[:, :prefix], torch.arange(prefix).expand(batch, -1))
    assert torch.equal(plan.slot[:, layout.merge_stop :], torch.arange(num - r - suffix, num - r).expand(batch, -1))
    assert torch.equal(plan.keep_idx[:, num - r - suffix :], torch.arange(layout.merge_stop, num).expand(batch, -1))
    assert ((plan.merged_idx >= prefix) & (plan.merged_idx < layout.merge_stop)).all()
    destinations = plan.keep_idx.gather(1, plan.merged_slot)  # (B, r)
    assert ((destinations >= prefix) & (destinations < layout.merge_stop)).all()
    assert ((plan.merged_slot >= prefix) & (plan.merged_slot < num - r - suffix)).all()


@FEW
@given(layout_case(), st.data())
def test_sizes_and_sources_are_conserved_with_a_suffix(case: dict, data: st.DataObject) -> None:
    layout: TokenLayout = case["layout"]
    metric = _metric(case).float()
    plan, _ = _plan(case, metric, data)
    gen = torch.Generator().manual_seed(case["seed"])
    size = torch.randint(1, 5, metric.shape[:2], generator=gen).float()  # (B, N)
    merged, new_size = plan.merge_with_size(metric, "weighted", size)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close(
        (merged * new_size[..., None]).sum(1), (metric * size[..., None]).sum(1), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(plan.merge(metric, "sum").sum(1), metric.sum(1), rtol=1e-4, atol=1e-4)
    token_map = plan.merge_token_map(identity_token_map(case["batch"], layout.num_tokens))
    sources = source_matrix(token_map, plan.num_out)  # (B, N - r, N)
    assert torch.equal(sources.sum(1), torch.ones(case["batch"], layout.num_tokens, dtype=torch.long))
    assert torch.equal(sources.sum(2).float(), plan.merge_size())
    for i in [*range(layout.prefix), *range(layout.merge_stop, layout.num_tokens)]:  # protected: themselves only
        assert sources[:, token_map[0, i], i].all() and (sources[:, token_map[0, i]].sum(-1) == 1).all()


def test_from_matching_refuses_layout_and_ints_together_or_a_wrong_span() -> None:
    matching = AlternatingBipartite().match(torch.randn(1, 8, 3), MergeContext())
    with pytest.raises(TokenMergeError, match="give layout or protected/suffix, not both"):
        MergePlan.from_matching(matching, 2, 1, layout=TokenLayout.sequence(8))
    with pytest.raises(TokenMergeError, match="has 9 mergeable tokens but the matching covers 8"):
        MergePlan.from_matching(matching, 2, layout=TokenLayout.image(3, 3))
    with pytest.raises(TokenMergeError, match="protected and suffix must be >= 0"):
        MergePlan.from_matching(matching, 2, suffix=-1)
    assert MergePlan.from_matching(matching, 0, suffix=3).num_out == 11  # r = 0: the identity on all tokens


# ---------------------------------------------------------------------- MergeState and caches with layouts
def _state(cache=None) -> MergeState:
    cache = NoCache() if cache is None else cache  # not `cache or ...`: an empty cache is falsy (len 0)
    config = MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), cache=cache, seed=3)
    return MergeState(config)


@pytest.mark.parametrize("cache", [NoCache, RecomputeAt], ids=["inline", "cached"])
def test_merge_state_plans_with_a_layout(cache) -> None:
    state = _state(cache())
    state.set_step(0)
    metric = torch.randn(2, 1 + 36 + 4, 8)
    suffixed = TokenLayout.image(6, 6, prefix=1, suffix=4)
    plan = state.plan("layer", metric, layout=suffixed)
    assert plan.num_out == 41 - 18  # FixedRatio counts the mergeable tokens only
    assert torch.equal(plan.merge(metric)[:, -4:], metric[:, -4:]) and torch.equal(
        plan.merge(metric)[:, :1], metric[:, :1]
    )
    # A prefix-only layout is the old keywords.
    metric = torch.randn(2, 37, 8)
    new = state.plan("other", metric, layout=TokenLayout.image(6, 6, prefix=1))
    old = _state(cache())
    old.set_step(0)
    assert torch.equal(new.slot, old.plan("other", metric, grid=(6, 6), protected=1).slot)
    with pytest.raises(TokenMergeError, match="give layout or grid/protected, not both"):
        state.plan("layer", metric, layout=TokenLayout.image(6, 6, prefix=1), protected=1)
    with pytest.raises(TokenMergeError, match="covers 36 tokens but the metric has 37"):
        state.plan("layer", metric, layout=TokenLayout.image(6, 6))


def test_cache_entries_follow_the_layout() -> None:
    state = _state(RecomputeAt((0,)))
    state.set_step(0)
    metric = torch.randn(1, 40, 8)
    state.plan("layer", metric, layout=TokenLayout.image(6, 6, prefix=4))
    state.plan("layer", metric, layout=TokenLayout.image(6, 6, prefix=4))
    assert (state.plans_computed, state.plans_reused) == (1, 1)
    state.plan("layer", metric, layout=TokenLayout.image(6, 6, suffix=4))  # same N, another span
    state.plan("layer", metric, layout=TokenLayout.image(4, 9, prefix=4))  # same N and prefix, another grid
    state.plan("layer", metric, layout=TokenLayout.video(2, 3, 6, prefix=4))
    assert (state.plans_computed, state.plans_reused) == (4, 1)


def test_a_layout_grid_reaches_the_context_and_traces_under_compile() -> None:
    layout = TokenLayout.video(4, 4, 6, prefix=1, suffix=2)
    matcher, threshold = RandomGrid(2, 2, st=2), FixedRatio(0.5)
    ctx = MergeContext(grid=layout.grid, num_tokens=layout.num_mergeable, seed=5, layer_index=1)
    metric = torch.randn(2, layout.num_tokens, 4)

    def slots(m: Tensor) -> Tensor:
        return matcher.build_plan(m, ctx, threshold, layout).slot

    eager = slots(metric)  # the partition table
    compiled = torch.compile(slots, backend="eager", fullgraph=True)(metric)  # cell_partition inline
    assert torch.equal(eager, compiled)


def test_merge_state_plans_a_layout_inside_a_full_graph() -> None:
    state = _state()  # traceable: planned inline
    layout = TokenLayout.video(2, 4, 4, prefix=1, suffix=3)
    metric = torch.randn(2, layout.num_tokens, 4)

    def merge(m: Tensor) -> Tensor:
        return state.plan("layer", m, layout=layout).merge(m)

    expected = merge(metric)
    assert torch.equal(torch.compile(merge, backend="eager", fullgraph=True)(metric), expected)


def test_ideal_matcher_takes_a_prefix_layout_and_refuses_a_suffix() -> None:
    metric = torch.randn(1, 17, 4)
    plan = IdealMatcher().build_plan(metric, MergeContext(), FixedRatio(0.5), TokenLayout.image(4, 4, prefix=1))
    assert plan.num_out == 9 and torch.equal(plan.merge(metric)[:, :1], metric[:, :1])
    with pytest.raises(TokenMergeError, match="IdealMatcher takes no protected suffix"):
        IdealMatcher().build_plan(metric, MergeContext(), FixedRatio(0.5), TokenLayout.image(4, 4, suffix=1))


# ---------------------------------------------------------------------- N-D grid partitions
@st.composite
def grid3d_case(draw: st.DrawFn) -> dict:
    t, h, w = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    sx, sy, st_ = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    if sx * sy * st_ == 1:
        sy = 2
    cells = (t // st_, h // sy, w // sx)
    choice = None
    if draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        choice = torch.randint(sx * sy * st_, cells, generator=gen)
    return {"t": t, "h": h, "w": w, "sx": sx, "sy": sy, "st": st_, "choice": choice}


@FEW
@given(grid3d_case())
def test_3d_partition_covers_every_token_once_with_one_destination_per_cell(case: dict) -> None:
    t, h, w, sx, sy, st_ = (case[k] for k in ("t", "h", "w", "sx", "sy", "st"))
    cells_t, cells_y, cells_x = t // st_, h // sy, w // sx
    num = t * h * w
    pos = torch.arange(num)
    f, y, x = pos // (h * w), pos // w % h, pos % w  # (N,) frame, row, column of every token
    in_full = (f < cells_t * st_) & (y < cells_y * sy) & (x < cells_x * sx)  # (N,)
    nearest = (
        (f // st_).clamp_max(max(cells_t - 1, 0)) * (cells_y * cells_x)
        + (y // sy).clamp_max(max(cells_y - 1, 0)) * cells_x
        + (x // sx).clamp_max(max(cells_x - 1, 0))
    )  # (N,) nearest full cell
    offset = (f % st_) * (sy * sx) + (y % sy) * sx + x % sx  # (N,) raster offset inside the cell
    results = []
    for fn in (grid_partition, cell_partition):
        src, dst, src_cell = fn(h, w, sx, sy, case["choice"], t=t, st=st_)
        assert torch.equal(torch.cat([src, dst]).sort().values, pos)  # every token exactly once
        assert dst.numel() == cells_t * cells_y * cells_x
        assert in_full[dst].all()  # destinations only in full cells ...
        assert torch.equal(nearest[dst], torch.arange(dst.numel()))  # ... one per cell, ordered by cell
        chosen = torch.zeros(dst.numel(), dtype=torch.long) if case["choice"] is None else case["choice"].reshape(-1)
        assert torch.equal(offset[dst], chosen)
        if dst.numel():
            assert torch.equal(src_cell, nearest[src])  # every source pairs with its own (or the nearest) cell
        results.append((dict(zip(src.tolist(), src_cell.tolist())), dst))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@FEW
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.integers(0, 999))
def test_2d_partitions_are_exactly_the_old_ones(h: int, w: int, sx: int, sy: int, random: bool, seed: int) -> None:
    if sx * sy == 1:
        sx = 2
    choice = (
        torch.randint(sx * sy, (h // sy, w // sx), generator=torch.Generator().manual_seed(seed)) if random else None
    )
    assert_same(grid_partition(h, w, sx, sy, choice), old_grid_partition(h, w, sx, sy, choice))
    assert_same(cell_partition(h, w, sx, sy, choice), old_cell_partition(h, w, sx, sy, choice))
    assert_same(cell_partition(h, w, sx, sy, choice, t=1, st=1), old_cell_partition(h, w, sx, sy, choice))


@FEW
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2**20),
    st.integers(0, 27),
    st.sampled_from([None, 999.0, 0.25, "tensor"]),
)
def test_2d_random_grid_draws_are_exactly_the_old_ones(
    h: int, w: int, sx: int, sy: int, seed: int, layer: int, timestep
) -> None:
    if sx * sy == 1:
        sy = 2
    timestep = torch.tensor([617.0, 617.0]) if timestep == "tensor" else timestep
    matcher = RandomGrid(sx, sy)
    for grid in ((h, w), (1, h, w)):  # a 2-D grid is a 3-D grid with one frame
        ctx = MergeContext(grid=grid, seed=seed, layer_index=layer, timestep=timestep)
        key = partition_key(seed, layer, timestep, None)
        expected = old_cell_partition(h, w, sx, sy, hash_randint(sx * sy, (h // sy, w // sx), key))
        assert_same(matcher.partition(h, w, ctx, torch.device("cpu")), expected)  # the eager table
        inline = cell_partition(h, w, sx, sy, matcher.draw_choice(h, w, ctx))  # what a compiled graph builds
        assert_same(inline, expected)
        matching = matcher.match(torch.randn(1, h * w, 3), ctx)
        assert torch.equal(matching.src_idx[0], expected[0]) and torch.equal(matching.dst_idx[0], expected[1])
    # The generator path (no seed) draws the same numbers from the same generator.
    ctx = MergeContext(grid=(h, w), generator=torch.Generator().manual_seed(seed))
    old_choice = torch.randint(sx * sy, (h // sy, w // sx), generator=torch.Generator().manual_seed(seed))
    assert_same(matcher.partition(h, w, ctx, torch.device("cpu")), old_cell_partition(h, w, sx, sy, old_choice))
    # use_rand=False: the top-left token.
    fixed = RandomGrid(sx, sy, use_rand=False).partition(h, w, MergeContext(grid=(h, w)), torch.device("cpu"))
    assert_same(fixed, old_cell_partition(h, w, sx, sy, None))


def test_strided_grid_full_merge_on_video_is_3d_average_pooling() -> None:
    t, h, w, c = 4, 6, 4, 5
    x = torch.randn(2, t * h * w, c, dtype=torch.float64)
    matcher = StridedGrid(2, 3, st=2)
    matching = matcher.match(x, MergeContext(grid=(t, h, w)))
    assert matcher.max_ratio == pytest.approx(1 - 1 / 12)
    plan = MergePlan.from_matching(matching, matching.max_merge)
    pooled = torch.nn.functional.avg_pool3d(x.transpose(1, 2).reshape(2, c, t, h, w), (2, 3, 2))  # (B, C, 2, 2, 2)
    torch.testing.assert_close(plan.merge(x), pooled.flatten(2).transpose(1, 2))


def test_random_grid_video_draws_follow_the_seed_and_stay_in_their_cells() -> None:
    matcher = RandomGrid(2, 2, st=2)
    assert matcher.max_ratio == pytest.approx(7 / 8)
    metric = torch.randn(1, 4 * 4 * 4, 3)

    def dst(seed: int) -> Tensor:
        return matcher.match(metric, MergeContext(grid=(4, 4, 4), seed=seed, timestep=500.0)).dst_idx[0]

    assert torch.equal(dst(1), dst(1)) and not torch.equal(dst(1), dst(2))
    assert dst(1).numel() == 8
    frame_pairs = dst(1) // 16 // 2  # each destination lies in its cell's pair of frames
    assert torch.equal(frame_pairs, torch.arange(8) // 4)


def test_a_sequence_grid_is_one_row() -> None:
    matching = RandomGrid(3, 1, use_rand=False).match(torch.randn(1, 10, 3), MergeContext(grid=(10,)))
    assert matching.dst_idx[0].tolist() == [0, 3, 6]
    nothing = RandomGrid(2, 2).match(torch.randn(1, 10, 3), MergeContext(grid=(10,), seed=0))
    assert nothing.max_merge == 0  # 2 x 2 cells do not fit in one row


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomGrid(True, 2), "sx must be an int in \\[1, 64\\]; got True"),
        (lambda: RandomGrid(2, 65), "sy must be an int in \\[1, 64\\]; got 65"),
        (lambda: RandomGrid(2, 2, st=0), "st must be an int in \\[1, 64\\]; got 0"),
        (lambda: StridedGrid(2, 2, st=2.0), "st must be an int"),  # type: ignore[arg-type]
        (lambda: RandomGrid(2, 2, use_rand=1), "use_rand must be a bool; got 1"),  # type: ignore[arg-type]
        (lambda: StridedGrid(2, 2, use_rand=None), "use_rand must be a bool"),  # type: ignore[arg-type]
        (lambda: RandomGrid(1, 1), "sx \\* sy must be at least 2"),
        (lambda: RandomGrid(64, 64, st=2), "sx \\* sy \\* st must be at most 4096"),
        (lambda: RandomGrid(2, 2).match(torch.randn(1, 24, 3), MergeContext(grid=(2, 3, 4, 1))), "grid must be"),
        (lambda: RandomGrid(2, 2).match(torch.randn(1, 24, 3), MergeContext(grid=(2, 3, 3))), "does not cover 24"),
    ],
)
def test_grid_matcher_arguments_are_validated(make, message: str) -> None:
    with pytest.raises(TokenMergeError, match=message):
        make()
    assert RandomGrid(1, 1, st=2).max_ratio == 0.5  # temporal-only cells are fine


# ---------------------------------------------------------------------- side data: select
def _reference_select(plan: MergePlan, x: Tensor, axis: int) -> Tensor:
    """Loop reference: output j of batch b is x at the seed token keep_idx[b, j]."""
    rows = []
    for b in range(plan.batch):
        table = x if axis == 0 else x[b if x.shape[0] > 1 else 0]
        rows.append(table.index_select(0 if axis == 0 else axis - 1, plan.keep_idx[b]))
    return torch.stack(rows)


@FEW
@given(layout_case(), st.data())
def test_select_follows_each_output_to_its_seed_token(case: dict, data: st.DataObject) -> None:
    layout: TokenLayout = case["layout"]
    metric = _metric(case)
    plan, _ = _plan(case, metric, data)
    batch, num, dim = case["batch"], layout.num_tokens, 4
    angles = torch.arange(num, dtype=torch.float64)[:, None] * torch.arange(1, dim + 1)  # (N, D)
    cos = angles.cos()  # a rotary table shared by the batch
    tables = [
        (cos, 0),  # (N, D)
        (cos[None, None].expand(1, 2, num, dim), 2),  # (1, H, N, D)
        (torch.arange(num).expand(batch, num) + 10, 1),  # (B, N) position ids
        (torch.randn(batch, num, dim), -2),  # (B, N, D)
        (torch.randn(1, num), -1),  # (1, N)
    ]
    for table, dim_ in tables:
        out = plan.select(table, dim=dim_)
        axis = dim_ % table.dim()
        if plan.r == 0 and axis > 0:
            assert out is table
            continue
        expected = _reference_select(plan, table, axis)
        assert torch.equal(out, expected)
    # Kept tokens keep their own position; a merged source takes its destination's.
    pos = torch.arange(num).expand(batch, num)
    selected = plan.select(pos)  # (B, N - r)
    seed_of_input = selected.gather(1, plan.slot)  # (B, N) position each input token now attends from
    merged = torch.zeros(batch, num, dtype=torch.bool).scatter(1, plan.merged_idx, True)
    assert torch.equal(seed_of_input[~merged], pos[~merged])
    destinations = plan.keep_idx.gather(1, plan.merged_slot)  # (B, r)
    assert torch.equal(seed_of_input.gather(1, plan.merged_idx), destinations)
    assert torch.equal(selected[:, : layout.prefix], pos[:, : layout.prefix])
    assert torch.equal(selected[:, plan.num_out - layout.suffix :], pos[:, layout.merge_stop :])


def test_select_shapes_identity_and_errors() -> None:
    metric = torch.randn(2, 1 + 16, 4)
    layout = TokenLayout.image(4, 4, prefix=1)
    plan = AlternatingBipartite().build_plan(metric, MergeContext(), Exactly(5), layout)
    assert plan.select(torch.randn(17, 8), dim=0).shape == (2, 12, 8)
    assert plan.select(torch.randn(1, 3, 17, 8), dim=2).shape == (2, 3, 12, 8)
    assert plan.select(torch.randn(2, 17)).shape == (2, 12)
    identity = MergePlan.identity(2, 17)
    table = torch.randn(17, 8)
    assert identity.select(table, dim=0).shape == (2, 17, 8) and torch.equal(identity.select(table, dim=0)[1], table)
    with pytest.raises(TokenMergeError, match="x must have its 17 tokens on axis dim=1"):
        plan.select(torch.randn(2, 16))
    with pytest.raises(TokenMergeError, match="x must have its 17 tokens on axis dim=3"):
        plan.select(torch.randn(2, 17), dim=3)
    with pytest.raises(TokenMergeError, match="batch axis of size 2 or 1"):
        plan.select(torch.randn(3, 17))


def test_select_traces_under_compile() -> None:
    metric = torch.randn(2, 20, 4)
    layout = TokenLayout.image(4, 4, prefix=2, suffix=2)
    cos = torch.randn(20, 6)

    def run(m: Tensor) -> tuple[Tensor, Tensor]:
        plan = AlternatingBipartite().build_plan(m, MergeContext(grid=layout.grid), FixedRatio(0.25), layout)
        return plan.merge(m), plan.select(cos, dim=0)

    eager = run(metric)
    compiled = torch.compile(run, backend="eager", fullgraph=True)(metric)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
