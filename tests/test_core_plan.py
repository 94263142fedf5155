"""Property tests of merge plans: shapes, mass conservation, identity, sources, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tokenmerge import MergePlan, TokenMergeError, identity_token_map, proportional_attention_bias, source_matrix
from tokenmerge.policies import AlternatingBipartite, Matching, MergeContext, RandomGrid, StridedGrid

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def grid_case(draw: st.DrawFn) -> dict:
    """A token grid, a matcher over it, a batch, channels and a dtype."""
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["bipartite", "random", "fixed", "strided"]))
    sx = draw(st.integers(1, 3))
    sy = draw(st.integers(1, 3))
    if sx * sy == 1:
        sx = 2
    matcher = {
        "bipartite": lambda: AlternatingBipartite(),
        "random": lambda: RandomGrid(sx, sy, use_rand=True),
        "fixed": lambda: RandomGrid(sx, sy, use_rand=False),
        "strided": lambda: StridedGrid(sx, sy),
    }[kind]()
    return {
        "h": h,
        "w": w,
        "matcher": matcher,
        "batch": draw(st.integers(1, 3)),
        "channels": draw(st.integers(1, 6)),
        "protected": draw(st.integers(0, 2)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**16)),
    }


def match(case: dict, metric: torch.Tensor) -> Matching:
    ctx = MergeContext(grid=(case["h"], case["w"]), generator=torch.Generator().manual_seed(case["seed"]))
    return case["matcher"].match(metric[:, case["protected"] :], ctx)


def make_metric(case: dict, integer: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["protected"] + case["h"] * case["w"], case["channels"])
    if integer:
        return torch.randint(-8, 9, shape, generator=gen).to(case["dtype"])
    return torch.randn(shape, generator=gen).to(case["dtype"])


@given(grid_case(), st.data())
def test_merge_and_unmerge_shapes_for_every_r(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case)
    matching = match(case, metric)
    num_tokens = metric.shape[1]
    assert matching.num_src + matching.num_dst == num_tokens - case["protected"]
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    for mode in ("mean", "weighted", "sum"):
        merged = plan.merge(metric, mode=mode)
        assert merged.shape == (case["batch"], num_tokens - r, case["channels"])
        assert merged.dtype == metric.dtype
        assert plan.unmerge(merged).shape == metric.shape
    # Extra feature dims travel along.
    x4 = torch.randn(case["batch"], num_tokens, 2, 3).to(case["dtype"])
    assert plan.unmerge(plan.merge(x4)).shape == x4.shape


@given(grid_case(), st.data())
def test_weighted_merge_conserves_mass_and_sizes(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case).float()
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    size = torch.randint(
        1, 5, metric.shape[:2], generator=torch.Generator().manual_seed(case["seed"])
    ).float()  # (B, N)
    merged = plan.merge(metric, mode="weighted", size=size)
    new_size = plan.merge_size(size)
    torch.testing.assert_close(
        (merged * new_size[..., None]).sum(1), (metric * size[..., None]).sum(1), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    assert torch.equal(plan.merge_size().sum(1), torch.full((case["batch"],), float(metric.shape[1])))
    # Sum mode conserves the plain sum.
    torch.testing.assert_close(plan.merge(metric, mode="sum").sum(1), metric.sum(1), rtol=1e-4, atol=1e-4)


@given(grid_case(), st.data())
def test_matrix_and_index_forms_agree(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case).double()
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    gen = torch.Generator().manual_seed(case["seed"])
    size = torch.randint(1, 5, metric.shape[:2], generator=gen).double()  # (B, N)
    for mode in ("mean", "weighted", "sum"):
        index = plan.merge(metric, mode, size, form="index")
        matrix = plan.merge(metric, mode, size, form="matrix")
        torch.testing.assert_close(matrix, index, rtol=1e-12, atol=1e-12)
    # merge_with_size: the weighted merge and the merged sizes in one call, any size layout
    for layout in (size, size[..., None], size[:1]):
        merged, new_size = plan.merge_with_size(metric, "weighted", layout)
        torch.testing.assert_close(merged, plan.merge(metric, "weighted", layout))
        torch.testing.assert_close(new_size, plan.merge_size(layout))
    with pytest.raises(TokenMergeError, match="form must be one of"):
        plan.merge(metric, "mean", form="dense")  # type: ignore[arg-type]
    with pytest.raises(TokenMergeError, match="mode must be one of"):
        plan.merge_with_size(metric, "median", size)  # type: ignore[arg-type]


@given(grid_case(), st.data())
def test_sources_partition_the_original_tokens(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case).float()
    token_map = identity_token_map(case["batch"], metric.shape[1])
    size = None
    x = metric
    # Two merges in a row (the second on the merged tokens, which no longer form a grid).
    for matching in (match(case, x), None):
        if matching is None:
            matching = AlternatingBipartite().match(x[:, case["protected"] :], MergeContext())
        r = data.draw(st.integers(0, matching.max_merge), label="r")
        plan = MergePlan.from_matching(matching, r, protected=case["protected"])
        x = plan.merge(x, mode="weighted", size=size)
        size = plan.merge_size(size)
        token_map = plan.merge_token_map(token_map)
    sources = source_matrix(token_map, x.shape[1])  # (B, N, N0)
    assert torch.equal(sources.sum(1), torch.ones(case["batch"], metric.shape[1], dtype=torch.long))
    assert torch.equal(sources.sum(2).float(), size)  # sizes count the sources
    # The protected prefix stays where it was and covers only itself.
    for i in range(case["protected"]):
        assert torch.equal(token_map[:, i], torch.full((case["batch"],), i))
        assert sources[:, i].sum().item() == case["batch"]


@given(grid_case())
def test_r_zero_is_bitwise_identity(case: dict) -> None:
    metric = make_metric(case)
    plan = MergePlan.from_matching(match(case, metric), 0, protected=case["protected"])
    for mode in ("mean", "weighted", "sum"):
        assert plan.merge(metric, mode=mode) is metric
    assert plan.unmerge(metric) is metric
    identity = MergePlan.identity(case["batch"], metric.shape[1])
    assert torch.equal(identity.unmerge(identity.merge(metric)), metric)


@given(grid_case(), st.data())
def test_unmerge_then_merge_is_exact_when_sources_equal_destinations(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case)
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    # Integer values keep every sum exact, so a mean of equal values returns them exactly.
    gen = torch.Generator().manual_seed(case["seed"])
    y = torch.randint(-8, 9, (case["batch"], plan.num_out, case["channels"]), generator=gen).to(case["dtype"])
    x = plan.unmerge(y)  # every merged source now equals its destination
    size = torch.randint(1, 4, x.shape[:2], generator=gen).to(case["dtype"])
    assert torch.equal(plan.merge(x, mode="mean"), y)
    assert torch.equal(plan.merge(x, mode="weighted", size=size), y)
    assert torch.equal(plan.unmerge(plan.merge(x)), x)


@given(grid_case(), st.data())
def test_protected_prefix_is_never_merged(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case)
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    prefix = torch.arange(case["protected"]).expand(case["batch"], -1)
    assert torch.equal(plan.merge(metric)[:, : case["protected"]], metric[:, : case["protected"]])
    assert torch.equal(plan.slot[:, : case["protected"]], prefix)
    assert not torch.isin(plan.merged_idx, torch.arange(case["protected"])).any()


@given(grid_case(), st.data())
def test_mean_mode_matches_a_reference_group_mean(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case).double() if case["dtype"] == torch.float32 else make_metric(case).float()
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    merged = plan.merge(metric, mode="mean")
    for b in range(case["batch"]):
        for position in range(plan.num_out):
            members = (plan.slot[b] == position).nonzero().squeeze(1)
            assert members.numel() >= 1
            torch.testing.assert_close(merged[b, position], metric[b, members].mean(0))


@given(grid_case(), st.data())
def test_merged_sources_are_the_best_scoring(case: dict, data: st.DataObject) -> None:
    metric = make_metric(case).float()
    matching = match(case, metric)
    r = data.draw(st.integers(0, matching.max_merge), label="r")
    assume(0 < r < matching.num_src)
    plan = MergePlan.from_matching(matching, r, protected=case["protected"])
    for b in range(case["batch"]):
        merged_positions = set((plan.merged_idx[b] - case["protected"]).tolist())
        scores = dict(zip(matching.src_idx[b].tolist(), matching.score[b].tolist()))
        worst_merged = min(scores[p] for p in merged_positions)
        best_kept = max(s for p, s in scores.items() if p not in merged_positions)
        assert worst_merged >= best_kept
        # Each merged source lands in the slot of its own best destination.
        for p in merged_positions:
            i = matching.src_idx[b].tolist().index(p)
            dst = matching.dst_idx[b, matching.best[b, i]].item() + case["protected"]
            assert plan.slot[b, p + case["protected"]] == plan.slot[b, dst]


@given(st.integers(1, 8), st.integers(1, 8), st.integers(2, 3), st.integers(2, 3), st.integers(0, 1000))
def test_same_seed_same_partition(h: int, w: int, sx: int, sy: int, seed: int) -> None:
    metric = torch.randn(2, h * w, 4)
    matcher = RandomGrid(sx, sy, use_rand=True)
    first = matcher.match(metric, MergeContext(grid=(h, w), generator=torch.Generator().manual_seed(seed)))
    second = matcher.match(metric, MergeContext(grid=(h, w), generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(first.dst_idx, second.dst_idx) and torch.equal(first.best, second.best)
    # One destination per full cell, shared by the batch.
    assert first.num_dst == (h // sy) * (w // sx)
    assert torch.equal(first.dst_idx[0], first.dst_idx[1])


def test_grid_partition_puts_edge_tokens_in_the_sources() -> None:
    # 5 x 5 grid, 2 x 2 cells: 4 full cells; row 4 and column 4 are all sources.
    matching = RandomGrid(2, 2, use_rand=False).match(torch.randn(1, 25, 3), MergeContext(grid=(5, 5)))
    assert sorted(matching.dst_idx[0].tolist()) == [0, 2, 10, 12]
    assert set(range(20, 25)) | {4, 9, 14, 19} <= set(matching.src_idx[0].tolist())
    assert RandomGrid(2, 2).max_ratio == pytest.approx(0.75)


def test_strided_grid_full_merge_is_average_pooling() -> None:
    x = torch.randn(2, 6 * 4, 5)
    matching = StridedGrid(2, 2).match(x, MergeContext(grid=(6, 4)))
    plan = MergePlan.from_matching(matching, matching.max_merge)
    pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, 5, 6, 4), 2)  # (B, C, 3, 2)
    torch.testing.assert_close(plan.merge(x), pooled.flatten(2).transpose(1, 2))


def test_no_destination_means_nothing_can_merge() -> None:
    matching = RandomGrid(2, 2).match(torch.randn(1, 1, 3), MergeContext(grid=(1, 1), generator=torch.Generator()))
    assert matching.num_dst == 0 and matching.max_merge == 0
    assert MergePlan.from_matching(matching, 0).num_out == 1
    with pytest.raises(TokenMergeError, match="r must be between"):
        MergePlan.from_matching(matching, 1)


def test_plan_rejects_tensors_of_the_wrong_layout() -> None:
    matching = AlternatingBipartite().match(torch.randn(2, 8, 3), MergeContext())
    plan = MergePlan.from_matching(matching, 2)
    with pytest.raises(TokenMergeError, match=r"x must have shape \(B=2, N=8"):
        plan.merge(torch.randn(2, 7, 3))
    with pytest.raises(TokenMergeError, match="y must have shape"):
        plan.unmerge(torch.randn(2, 8, 3))
    with pytest.raises(TokenMergeError, match="mode must be one of"):
        plan.merge(torch.randn(2, 8, 3), mode="max")  # type: ignore[arg-type]


def test_proportional_attention_bias_is_log_size() -> None:
    size = torch.tensor([[1.0, 2.0, 4.0]])
    bias = proportional_attention_bias(size[..., None], dtype=torch.float16)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.float16
    torch.testing.assert_close(
        bias.float().flatten(), torch.tensor([0.0, math.log(2), math.log(4)]), rtol=1e-3, atol=1e-3
    )
    # Softmax with the bias equals softmax over tokens repeated `size` times.
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    with_bias = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=proportional_attention_bias(size))
    repeats = torch.tensor([1, 2, 4])
    expanded = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    )
    torch.testing.assert_close(with_bias, expanded)
