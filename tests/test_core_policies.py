"""Threshold policies, pair caches and the errors of the core."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokenmerge
from tokenmerge import MergeConfig, MergeState, TokenMergeError
from tokenmerge.policies import (
    CA_TOME_C3,
    AlternatingBipartite,
    DriftTriggered,
    EveryK,
    FixedCount,
    FixedRatio,
    MergeContext,
    NoCache,
    RandomGrid,
    RecomputeAt,
    Scheduled,
    SimilarityThreshold,
    layer_schedule,
)


@given(
    st.integers(1, 4),
    st.integers(2, 40),
    st.floats(-1.0, 1.0, allow_nan=False),
    st.integers(0, 10_000),
)
def test_similarity_threshold_merges_exactly_the_sources_above_it(
    batch: int, n: int, threshold: float, seed: int
) -> None:
    metric = torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed))
    matching = AlternatingBipartite().match(metric, MergeContext())
    policy = SimilarityThreshold(threshold)
    r = policy.num_merged(matching, MergeContext(num_tokens=n))
    above = (matching.score >= threshold).sum(-1)  # (B,)
    assert r == min(int(above.max()), matching.max_merge)
    plan = tokenmerge.MergePlan.from_matching(matching, r)
    # In the batch element with the most pairs above T, exactly those merge.
    b = int(above.argmax())
    merged = set(plan.merged_idx[b].tolist())
    expected = {p for p, s in zip(matching.src_idx[b].tolist(), matching.score[b].tolist()) if s >= threshold}
    assert merged == expected
    # The others merge r of their own best pairs (the batch shares one r).
    assert plan.merged_idx.shape == (batch, r)


def test_similarity_threshold_cap_and_buckets() -> None:
    metric = torch.randn(2, 64, 4)
    matching = AlternatingBipartite().match(metric, MergeContext())
    everything = SimilarityThreshold(-1.0).num_merged(matching, MergeContext(num_tokens=64))
    assert everything == 32
    assert SimilarityThreshold(-1.0, max_ratio=0.25).num_merged(matching, MergeContext(num_tokens=64)) == 16
    counts = {
        SimilarityThreshold(t, buckets=4).num_merged(matching, MergeContext(num_tokens=64))
        for t in torch.linspace(-1, 1, 41).tolist()
    }
    assert counts <= {0, 8, 16, 24, 32}
    # Bucketing rounds down: never merges a pair below T.
    for t in torch.linspace(-1, 1, 21).tolist():
        exact = SimilarityThreshold(t).num_merged(matching, MergeContext(num_tokens=64))
        assert SimilarityThreshold(t, buckets=4).num_merged(matching, MergeContext(num_tokens=64)) <= exact


def test_fixed_ratio_follows_tomesds_rule_and_caps() -> None:
    matching = RandomGrid(2, 2, use_rand=False).match(torch.randn(1, 63, 4), MergeContext(grid=(7, 9)))
    assert FixedRatio(0.5).num_merged(matching, MergeContext(num_tokens=63)) == int(63 * 0.5)
    assert FixedRatio(0.74).num_merged(matching, MergeContext(num_tokens=63)) == min(int(63 * 0.74), matching.num_src)


def test_fixed_count_schedules_like_tome() -> None:
    assert layer_schedule(4, 3) == [4, 4, 4]
    assert layer_schedule([1, 2, 3], 3) == [1, 2, 3]
    ramp = layer_schedule((10, 0.5), 5)  # from 10 * 0.5 to 10 * 1.5
    assert ramp == [5, 7, 10, 12, 15]
    assert layer_schedule((10, -0.5), 5) == [15, 12, 10, 7, 5]
    assert abs(sum(ramp) - 50) <= 5
    matching = AlternatingBipartite().match(torch.randn(1, 10, 4), MergeContext())
    policy = FixedCount([3, 100])
    assert policy.num_merged(matching, MergeContext(layer_index=0, num_layers=2)) == 3
    assert policy.num_merged(matching, MergeContext(layer_index=1, num_layers=2)) == 5  # clamped to the sources
    with pytest.raises(TokenMergeError, match="one entry per layer"):
        policy.num_merged(matching, MergeContext(layer_index=0, num_layers=3))


def test_scheduled_switches_with_progress() -> None:
    matching = AlternatingBipartite().match(torch.randn(1, 100, 4), MergeContext())
    policy = Scheduled([(0.0, FixedRatio(0.4)), (0.5, FixedRatio(0.1))])
    assert policy.num_merged(matching, MergeContext(num_tokens=100, step=0, num_steps=10)) == 40
    assert policy.num_merged(matching, MergeContext(num_tokens=100, step=5, num_steps=10)) == 10
    assert policy.num_merged(matching, MergeContext(num_tokens=100)) == 40  # no progress: first stage
    by_callable = Scheduled(lambda progress: FixedRatio(0.3 if progress < 0.2 else 0.0))
    assert by_callable.num_merged(matching, MergeContext(num_tokens=100, step=1, num_steps=10)) == 30
    assert by_callable.num_merged(matching, MergeContext(num_tokens=100, step=9, num_steps=10)) == 0


def _state(cache, seed: int = 0) -> MergeState:
    return MergeState(MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), cache=cache, seed=seed))


def test_recompute_at_reuses_until_a_listed_step_and_forgets_on_reset() -> None:
    state = _state(RecomputeAt((0, 3)))
    metric = torch.randn(2, 16, 4)
    plans = []
    for step in range(5):
        state.set_step(step, num_steps=5)
        plans.append(state.plan("layer", metric))
    assert plans[1] is plans[0] and plans[2] is plans[0]
    assert plans[3] is not plans[0] and plans[4] is plans[3]
    assert (state.plans_computed, state.plans_reused) == (2, 3)
    state.reset()
    assert len(state.cache) == 0
    state.set_step(1)
    assert state.plan("layer", metric) is not plans[3]


def test_a_plan_is_never_reused_for_another_shape() -> None:
    state = _state(RecomputeAt((0,)))
    state.set_step(0)
    first = state.plan("layer", torch.randn(2, 16, 4))
    state.set_step(1)
    assert state.plan("layer", torch.randn(1, 16, 4)) is not first
    assert state.plan("layer", torch.randn(1, 16, 4)).batch == 1


def test_every_k_and_no_cache() -> None:
    state = _state(EveryK(2))
    metric = torch.randn(1, 16, 4)
    computed = []
    for step in range(6):
        state.set_step(step)
        before = state.plans_computed
        state.plan("layer", metric)
        computed.append(state.plans_computed > before)
    assert computed == [True, False, True, False, True, False]
    state = _state(NoCache())
    state.set_step(0)
    state.plan("layer", metric)
    state.set_step(1)
    state.plan("layer", metric)
    assert state.plans_computed == 2 and len(state.cache) == 0


def test_drift_triggered_recomputes_only_when_pairs_drift() -> None:
    state = MergeState(
        MergeConfig(matcher=AlternatingBipartite(), threshold=FixedRatio(0.4), cache=DriftTriggered(0.05))
    )
    metric = torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(0))
    state.set_step(0)
    first = state.plan("layer", metric)
    state.set_step(1)
    assert state.plan("layer", metric + 1e-4 * torch.randn_like(metric)) is first
    state.set_step(2)
    assert state.plan("layer", torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(1))) is not first


def test_separate_cfg_calls_keep_their_own_cache() -> None:
    state = _state(RecomputeAt((0,)))
    uncond, cond = torch.randn(1, 16, 4), torch.randn(1, 16, 4)
    state.observe_timestep(999.0)
    a = state.plan("layer", uncond)
    state.observe_timestep(999.0)  # same timestep again: the conditional call
    b = state.plan("layer", cond)
    assert state.call_index == 1 and a is not b
    state.observe_timestep(979.0)
    assert state.step == 1 and state.plan("layer", uncond) is a
    state.observe_timestep(979.0)
    assert state.plan("layer", cond) is b
    state.observe_timestep(999.0)  # timestep went up: a new generation
    assert state.step == 0 and state.generation == 2 and len(state.cache) == 0


def test_same_seed_same_plans_and_global_rng_untouched() -> None:
    metric = torch.randn(2, 64, 4)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    plans = []
    for _ in range(2):
        state = _state(NoCache(), seed=7)
        state.set_step(0)
        plans.append(state.plan("layer", metric))
    assert torch.equal(plans[0].slot, plans[1].slot)
    assert torch.equal(torch.get_rng_state(), global_state)
    other = _state(NoCache(), seed=8)
    other.set_step(0)
    assert not torch.equal(other.plan("layer", metric).slot, plans[0].slot)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FixedRatio(1.0), "ratio must be a number in \\[0, 1\\)"),
        (lambda: FixedRatio(-0.1), "ratio must be a number in \\[0, 1\\)"),
        (lambda: tokenmerge.ToMeSD(ratio=0.8), "ratio must be at most 0.75"),
        (lambda: tokenmerge.ToMeSD(ratio=0.9, sx=4, sy=2), "ratio must be at most 0.875|ratio must be a number"),
        (lambda: tokenmerge.ToMe(r=0.5).threshold, "r must be an int"),
        (lambda: SimilarityThreshold(1.5), "threshold must be a number in \\[-1, 1\\]"),
        (lambda: tokenmerge.CAToMe(threshold=-2), "threshold must be a number in \\[-1, 1\\]"),
        (lambda: FixedCount(-1), "r must be >= 0"),
        (lambda: FixedCount([2, -1]), "r must be >= 0 in every layer"),
        (lambda: tokenmerge.CAToMe(recompute_at=()), "recompute_at must list at least one step"),
        (lambda: RecomputeAt((0, -3)), "recompute_at steps must be non-negative ints"),
        (lambda: EveryK(0), "k must be an int >= 1"),
        (lambda: RandomGrid(1, 1), "sx \\* sy must be at least 2"),
        (lambda: tokenmerge.ToMeSD(max_downsample=3), "max_downsample must be 1, 2, 4 or 8"),
        (lambda: tokenmerge.ToMeSD().replace(mode="max"), "mode must be one of"),
        (lambda: tokenmerge.ToMeSD().replace(blocks=(3, 1)), "blocks must be None or \\(first, last\\)"),
        (lambda: tokenmerge.ToMeSD().replace(nonsense=1), "nonsense"),
        (lambda: MergeConfig(matcher="bipartite", threshold=FixedRatio(0.5)), "matcher must be"),
    ],
)
def test_bad_arguments_raise_token_merge_error(make, message: str) -> None:
    with pytest.raises(TokenMergeError, match=message):
        make()


def test_metric_must_be_3d() -> None:
    state = _state(NoCache())
    with pytest.raises(TokenMergeError, match="metric must be 3-D"):
        state.plan("layer", torch.randn(16, 4))


def test_token_merge_error_is_a_value_error() -> None:
    assert issubclass(TokenMergeError, ValueError)


def test_ca_tome_defaults_are_the_papers_c3() -> None:
    config = tokenmerge.CAToMe()
    assert config.cache.steps == CA_TOME_C3 == (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49)
    assert config.threshold.threshold == 0.7
    assert isinstance(config.matcher, RandomGrid) and config.matcher.sx == config.matcher.sy == 2


def test_timestep_key_is_kept_per_tensor_and_follows_in_place_updates() -> None:
    from tokenmerge.policies.rng import hash_int, timestep_key

    t = torch.tensor([981.0, 981.0])
    first = timestep_key(t)
    assert timestep_key(t) is first  # the same tensor again (the next layer of a call): computed once
    assert int(timestep_key(t, hashed=True)) == hash_int(int(first))
    t.fill_(961.0)  # a buffer reused for the next step
    assert int(timestep_key(t)) == timestep_key(961.0) != int(first)
