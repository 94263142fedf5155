"""`tokenmerge.policies.checks` (a user policy's results) and the inference-mode timestep keying."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.plan import MergePlan
from tokenmerge.policies import (
    AlternatingBipartite,
    FixedRatio,
    Matcher,
    Matching,
    MergeContext,
    NoCache,
    PairCache,
    RandomGrid,
    Scheduled,
    SimilarityThreshold,
    ThresholdPolicy,
)
from tokenmerge.policies.checks import check_matching, check_merge_count, check_plan_from_cache, needs_check, trust
from tokenmerge.policies.rng import partition_key, timestep_key


class UserMatcher(Matcher):
    """A user's matcher (defined outside tokenmerge): its results are checked."""

    def match(self, metric, ctx):
        return AlternatingBipartite().match(metric, ctx)


class UserThreshold(ThresholdPolicy):
    def __init__(self, r):
        self.r = r

    def num_merged(self, matching, ctx):
        return self.r


class UserCache(PairCache):
    def should_recompute(self, entry, metric, ctx):
        return False


def good_matching(batch: int = 2, n: int = 10, channels: int = 4, seed: int = 0) -> Matching:
    metric = torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(seed))
    return AlternatingBipartite().match(metric, MergeContext())


def test_built_in_policies_are_not_checked_and_user_policies_are() -> None:
    built_in = [
        AlternatingBipartite(),
        RandomGrid(),
        tokenmerge.ToDo().matcher,
        FixedRatio(0.5),
        SimilarityThreshold(),
        Scheduled([(0.0, FixedRatio(0.5))]),
        NoCache(),
        tokenmerge.CAToMe().cache,
        tokenmerge.ToMe(4).threshold,
    ]
    assert not any(needs_check(p) for p in built_in)
    assert all(needs_check(p) for p in (UserMatcher(), UserThreshold(1), UserCache()))

    class SubclassOfBuiltIn(FixedRatio):  # may override what it returns: checked
        pass

    assert needs_check(SubclassOfBuiltIn(0.5))

    @trust
    class Trusted(UserMatcher):
        pass

    assert not needs_check(Trusted())
    with pytest.raises(TokenMergeError, match="trust takes a policy class"):
        trust(UserMatcher())


@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 5), st.integers(0, 1000))
def test_valid_matchings_pass(batch: int, n: int, channels: int, seed: int) -> None:
    matching = good_matching(batch, n, channels, seed)
    check_matching(matching, n, UserMatcher(), batch=batch, device="cpu")
    grid = RandomGrid(2, 2).match(torch.randn(batch, 36, channels), MergeContext(grid=(6, 6), seed=seed))
    check_matching(grid, 36, UserMatcher(), batch=batch)


def _replace(matching: Matching, **fields) -> Matching:
    values = {f: getattr(matching, f) for f in ("src_idx", "dst_idx", "best", "score")}
    values.update(fields)
    return Matching(**values)


def _broken(kind: str, m: Matching, draw) -> tuple[Matching, str]:
    """``m`` broken in one way, and a regex of the message naming what is wrong."""
    src, dst, best, score = m.src_idx, m.dst_idx, m.best, m.score
    b, ns = src.shape
    nd = dst.shape[1]
    if kind == "int32":
        field = draw(st.sampled_from(["src_idx", "dst_idx", "best"]))
        return _replace(m, **{field: getattr(m, field).int()}), f"{field} of dtype torch.int32"
    if kind == "int_score":
        return _replace(m, score=score.long()), "score of dtype torch.int64"
    if kind == "negative_best":
        best = best.clone()
        best[draw(st.integers(0, b - 1)), draw(st.integers(0, ns - 1))] = -draw(st.integers(1, 10**6))
        return _replace(m, best=best), "best from -"
    if kind == "best_too_large":
        best = best.clone()
        best[draw(st.integers(0, b - 1)), draw(st.integers(0, ns - 1))] = nd + draw(st.integers(0, 100))
        return _replace(m, best=best), "index into dst_idx"
    if kind == "overlap":  # a source that is also a destination
        src = src.clone()
        src[draw(st.integers(0, b - 1)), draw(st.integers(0, ns - 1))] = dst[0, draw(st.integers(0, nd - 1))]
        return _replace(m, src_idx=src), "do not partition"
    if kind == "out_of_range":
        dst = dst.clone()
        dst[draw(st.integers(0, b - 1)), draw(st.integers(0, nd - 1))] = draw(
            st.sampled_from([-1, ns + nd, 2**40, -(2**62)])
        )
        return _replace(m, dst_idx=dst), "must lie in \\[0, "
    if kind == "too_few":  # a token dropped: N - 1 tokens described
        return _replace(m, src_idx=src[:, 1:], best=best[:, 1:], score=score[:, 1:]), "Ns \\+ Nd == N"
    if kind == "garbage":  # uninitialised memory as indices
        garbage = torch.empty_like(src).fill_(draw(st.sampled_from([-(2**63), 2**62, -7])))
        return _replace(m, src_idx=garbage), "must lie in"
    if kind == "score_shape":
        shape = draw(st.sampled_from([(b,), (b, ns + 1), (b, ns, 1), (b + 1, ns)]))
        return _replace(m, score=torch.zeros(shape)), "score of shape"
    if kind == "best_shape":
        return _replace(m, best=best[:, :-1]), "best of shape"
    if kind == "rank":
        return _replace(m, src_idx=src[0]), "src_idx of shape .* 2-D"
    if kind == "batch":
        return _replace(m, dst_idx=dst[:1].expand(b + 1, -1)), "dst_idx for a batch of"
    if kind == "nan_score":
        score = score.clone()
        score[0, 0] = float("nan")
        return _replace(m, score=score), "NaN"
    if kind == "not_a_matching":
        return draw(st.sampled_from([None, (src, dst, best, score), {"src_idx": src}])), "must return a tokenmerge"
    raise AssertionError(kind)


KINDS = [
    "int32",
    "int_score",
    "negative_best",
    "best_too_large",
    "overlap",
    "out_of_range",
    "too_few",
    "garbage",
    "score_shape",
    "best_shape",
    "rank",
    "batch",
    "nan_score",
    "not_a_matching",
]


@settings(max_examples=80)
@given(st.sampled_from(KINDS), st.integers(1, 3), st.integers(4, 30), st.integers(0, 100), st.data())
def test_invalid_matchings_raise_naming_the_policy_and_what_is_wrong(kind, batch, n, seed, data) -> None:
    matching, message = _broken(kind, good_matching(batch, n, 3, seed), data.draw)
    with pytest.raises(TokenMergeError, match=message) as error:
        check_matching(matching, n, UserMatcher(), batch=batch)
    assert "UserMatcher.match" in str(error.value)


def test_shared_partition_is_checked_once_and_still_caught() -> None:
    m = good_matching(8, 20)
    src = torch.arange(0, 20, 2).expand(8, -1)  # (B, Ns) stride 0 over the batch, as by_similarity builds it
    dst = torch.arange(1, 20, 2).expand(8, -1)
    check_matching(_replace(m, src_idx=src, dst_idx=dst), 20, UserMatcher())
    bad = torch.arange(0, 20, 2).clone()
    bad[3] = 1  # also a destination
    with pytest.raises(TokenMergeError, match="do not partition"):
        check_matching(_replace(m, src_idx=bad.expand(8, -1), dst_idx=dst), 20, UserMatcher())


def test_value_checks_are_skipped_on_meta_but_shapes_are_not() -> None:
    m = good_matching(2, 10)
    meta = Matching(*(t.to("meta") for t in (m.src_idx, m.dst_idx, m.best, m.score)))
    check_matching(meta, 10, UserMatcher())  # no host read on meta
    with pytest.raises(TokenMergeError, match="Ns \\+ Nd == N"):
        check_matching(meta, 11, UserMatcher())


@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True),
        st.integers(-(2**70), -1),
        st.integers(6, 2**70),
        st.text(max_size=3),
        st.just(torch.tensor(2)),
        st.lists(st.integers(0, 3), max_size=2),
    )
)
def test_bad_merge_counts_are_refused(r) -> None:
    matching = good_matching(2, 10)  # max_merge 5
    with pytest.raises(TokenMergeError, match="UserThreshold.num_merged must return an int in \\[0, 5\\]"):
        check_merge_count(r, matching, UserThreshold(r))


@given(st.integers(0, 5))
def test_good_merge_counts_pass(r: int) -> None:
    import numpy as np

    matching = good_matching(2, 10)
    assert check_merge_count(r, matching, UserThreshold(r)) == r
    assert check_merge_count(np.int64(r), matching, UserThreshold(r)) == r


def test_no_destination_allows_only_zero() -> None:
    m = good_matching(1, 4)
    none = Matching(
        src_idx=torch.arange(4)[None], dst_idx=torch.zeros(1, 0, dtype=torch.long), best=m.best[:, :0].new_zeros(1, 4),
        score=torch.full((1, 4), float("-inf")),
    )  # fmt: skip
    check_matching(none, 4, UserMatcher())
    assert check_merge_count(0, none, UserThreshold(0)) == 0
    with pytest.raises(TokenMergeError, match="\\[0, 0\\]"):
        check_merge_count(1, none, UserThreshold(1))


def test_a_custom_stage_of_a_built_in_schedule_is_checked() -> None:
    matching = good_matching(2, 10)
    schedule = Scheduled([(0.0, UserThreshold(2.0))])
    with pytest.raises(TokenMergeError, match="UserThreshold.num_merged must return an int"):
        schedule.num_merged(matching, MergeContext(num_tokens=10))
    assert Scheduled([(0.0, UserThreshold(3))]).num_merged(matching, MergeContext(num_tokens=10)) == 3


def _plan(metric: torch.Tensor, r: int = 3, protected: int = 1) -> MergePlan:
    matching = AlternatingBipartite().match(metric[:, protected:], MergeContext())
    return MergePlan.from_matching(matching, r, protected=protected)


def test_plans_from_a_custom_cache_are_checked() -> None:
    metric = torch.randn(2, 11, 4)
    cache = UserCache()
    good = _plan(metric)
    check_plan_from_cache(None, metric, cache, protected=1)
    check_plan_from_cache(good, metric, cache, protected=1)
    check_plan_from_cache(_plan(metric, r=0), metric, cache, protected=1)

    def broken(**fields) -> MergePlan:
        values = {f: getattr(good, f) for f in ("slot", "keep_idx", "merged_idx", "merged_slot")}
        values.update(fields)
        return MergePlan(**values)

    bad_keep = good.keep_idx.clone()
    bad_keep[0, 2] = bad_keep[0, 3]
    bad_slot = good.slot.clone()
    bad_slot[0, 0] = 5
    cases = [
        ("not a plan", "must return a tokenmerge.MergePlan or None"),
        (_plan(torch.randn(3, 11, 4)), "it must be \\(B=2"),
        (_plan(torch.randn(2, 13, 4)), "the layer has 11 tokens"),
        (broken(keep_idx=good.keep_idx.int()), "torch.int32"),
        (broken(keep_idx=bad_keep), "do not partition"),
        (_plan(metric, r=6, protected=0), "merges a protected token"),  # token 0 merged
        (broken(slot=bad_slot), "slot does not map"),
    ]
    for plan, message in cases:
        with pytest.raises(TokenMergeError, match=message) as error:
            check_plan_from_cache(plan, metric, cache, protected=1)
        assert "UserCache.lookup" in str(error.value)


# --------------------------------------------------------------- the reproducibility hole


def test_inference_tensor_updated_in_place_gets_the_new_timesteps_partition() -> None:
    # Inference tensors keep no version counter: `t -= 200` used to keep step 1's partition.
    with torch.inference_mode():
        t = torch.tensor([981.0])
        first = [int(partition_key(7, layer, t, None)) for layer in range(3)]  # one denoiser call
        assert first == [partition_key(7, layer, 981.0, None) for layer in range(3)]
        t -= 200  # the next call, same tensor object
        second = [int(partition_key(7, layer, t, None)) for layer in range(3)]
        assert second == [partition_key(7, layer, 781.0, None) for layer in range(3)]
        assert second != first
        t.fill_(500.0)
        assert int(timestep_key(t)) == timestep_key(500.0)  # the direct key follows too


def test_random_grid_partition_follows_an_in_place_inference_timestep() -> None:
    matcher, metric = RandomGrid(2, 2), torch.randn(1, 64, 4)

    def partition(timestep) -> list[int]:
        ctx = MergeContext(grid=(8, 8), seed=3, layer_index=0, timestep=timestep)
        return matcher.match(metric, ctx).dst_idx[0].tolist()

    with torch.inference_mode():
        t = torch.tensor([981.0])
        before = partition(t)
        t -= 200
        after = partition(t)
        assert after == partition(torch.tensor([781.0])) != before


def test_tomesd_unet_under_inference_mode_follows_an_in_place_timestep() -> None:
    from tokenmerge.tools.tiny import TEXT_DIM, tiny_sd_unet

    unet = tiny_sd_unet()
    gen = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 4, TEXT_DIM, generator=gen)
    with tokenmerge.apply(unet, tokenmerge.ToMeSD(ratio=0.5, seed=1)), torch.inference_mode():
        t = torch.tensor([981.0])
        unet(sample, t, encoder_hidden_states=text)
        t -= 200
        in_place = unet(sample, t, encoder_hidden_states=text).sample
        fresh = unet(sample, torch.tensor([781.0]), encoder_hidden_states=text).sample
        stale = unet(sample, torch.tensor([981.0]), encoder_hidden_states=text).sample
    assert torch.equal(in_place, fresh)
    assert not torch.equal(fresh, stale)  # the keyed partition matters to the output


def test_compiled_partition_does_not_read_the_timestep_on_the_host() -> None:
    torch._dynamo.reset()

    def key(t: torch.Tensor) -> torch.Tensor:
        return partition_key(7, 2, t, None) + 0

    compiled = torch.compile(key, fullgraph=True, backend="eager")  # fullgraph: a host read would fail
    with torch.inference_mode():
        t = torch.tensor([981.0])
        assert int(compiled(t)) == partition_key(7, 2, 981.0, None)
        t -= 200
        assert int(compiled(t)) == partition_key(7, 2, 781.0, None)


# --------------------------------------------------------------- wired in where the library receives the results


class NegativeBest(Matcher):
    def match(self, metric, ctx):
        m = AlternatingBipartite().match(metric, ctx)
        return Matching(m.src_idx, m.dst_idx, torch.full_like(m.best, -1), m.score)  # negative whatever the draw


class GarbageIndices(Matcher):
    def match(self, metric, ctx):
        m = AlternatingBipartite().match(metric, ctx)
        return Matching(torch.empty_like(m.src_idx).fill_(2**40), m.dst_idx, m.best, m.score)


class StaleCache(UserCache):
    def lookup(self, key, metric, ctx, protected=0):
        return MergePlan.identity(metric.shape[0] + 1, metric.shape[1])


@pytest.mark.parametrize(
    ("matcher", "threshold", "cache", "message"),
    [
        (NegativeBest(), FixedRatio(0.3), NoCache(), "NegativeBest.match returned best from -1"),
        (GarbageIndices(), FixedRatio(0.3), NoCache(), "GarbageIndices.match returned token positions"),
        (AlternatingBipartite(), UserThreshold(2.0), NoCache(), "UserThreshold.num_merged must return an int"),
        (AlternatingBipartite(), UserThreshold(None), NoCache(), "UserThreshold.num_merged must return an int"),
        (AlternatingBipartite(), UserThreshold(99), NoCache(), "UserThreshold.num_merged must return an int in"),
        (AlternatingBipartite(), FixedRatio(0.3), StaleCache(), "StaleCache.lookup returned a plan"),
    ],
    ids=["negative_best", "garbage", "float_count", "none_count", "too_many", "stale_cache"],
)
def test_a_user_policys_bad_results_are_refused_when_planning(matcher, threshold, cache, message) -> None:
    state = tokenmerge.MergeState(tokenmerge.MergeConfig(matcher=matcher, threshold=threshold, cache=cache, seed=0))
    state.set_step(0)
    with pytest.raises(TokenMergeError, match=message):
        state.plan("layer", torch.randn(2, 17, 4), protected=1)
