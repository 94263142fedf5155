"""Threshold policies: how many source tokens merge in a call.

* `FixedRatio` (ToMeSD): a fraction of the tokens.
* `FixedCount` (ToMe): ``r`` tokens per layer, as an int, a per-layer list or ToMe's
  ``(r, inflection)`` schedule.
* `SimilarityThreshold` (CA-ToMe): every source whose best similarity is at least T.
* `Scheduled`: any of these, changing with denoising progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import (
    MAX_TOKENS,
    TokenMergeError,
    check,
    check_float,
    check_instance,
    check_int,
    check_sequence,
    is_int,
)
from .base import Matcher, Matching, MergeContext, ThresholdPolicy
from .checks import check_merge_count, needs_check

__all__ = ["FixedRatio", "FixedCount", "SimilarityThreshold", "Scheduled", "layer_schedule"]


class FixedRatio(ThresholdPolicy):
    """Merge ``int(ratio * N)`` tokens, N the mergeable tokens of the call (tomesd's rule).

    Capped by what the matcher allows in this call (its number of sources).

    Args:
        ratio: fraction of tokens to remove, in ``[0, 1)`` and at most the matcher's
            ``max_ratio``.
    """

    traceable = True

    def __init__(self, ratio: float) -> None:
        self.ratio = check_float("ratio", ratio, 0.0, 1.0, hi_open=True)

    def validate(self, matcher: Matcher) -> None:
        """Reject a ratio above the matcher's ``max_ratio``."""
        if self.ratio > matcher.max_ratio + 1e-9:
            raise TokenMergeError(
                f"ratio must be at most {matcher.max_ratio:g} for {matcher!r} "
                f"(1 - 1/(sx*sy) for grid matchers); got {self.ratio:g}"
            )

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """``min(int(ratio * N), matching.max_merge)``."""
        num_tokens = ctx.num_tokens or (matching.num_src + matching.num_dst)
        return min(int(num_tokens * self.ratio), matching.max_merge)


def _is_inflection_schedule(r: object) -> bool:
    """ToMe's ``(r, inflection)``: a 2-tuple whose second entry is a float."""
    return isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)


def layer_schedule(r: int | Sequence[int] | tuple[int, float], num_layers: int) -> list[int]:
    """Expand ToMe's ``r`` argument to one count per layer.

    Args:
        r: an int (the same for every layer), a list with one int per layer, or ToMe's
            ``(r, inflection)`` pair: ToMe's linear ramp from ``a = int(r * (1 - inflection))``
            at the first layer to ``2 * r - a`` at the last (negative inflection ramps
            down), each rounded down. The ramp keeps the total near ``r * layers``.
        num_layers: number of merging layers.
    """
    if _is_inflection_schedule(r):
        base, inflection = r
        if num_layers == 1:
            return [max(int(base), 0)]
        first = int(base * (1.0 - inflection))  # ToMe's parse_r: round the start, mirror the end
        last = 2 * base - first
        step = (last - first) / (num_layers - 1)
        return [max(int(first + step * i), 0) for i in range(num_layers)]
    if is_int(r):
        return [int(r)] * num_layers
    counts = list(r)
    if len(counts) != num_layers:
        raise TokenMergeError(f"r as a list must have one entry per layer ({num_layers}); got {len(counts)}")
    return counts


class FixedCount(ThresholdPolicy):
    """Merge ``r`` tokens in each layer (ToMe).

    Args:
        r: an int, a per-layer list, or ToMe's ``(r, inflection)`` schedule (see
            `layer_schedule`). Counts above what a layer can merge are clamped to its
            number of source tokens (ToMe's rule); negative counts are rejected, and so
            are counts above `MAX_TOKENS` (more tokens than any model has).
    """

    traceable = True

    def __init__(self, r: int | Sequence[int] | tuple[int, float]) -> None:
        self.r: int | list[int] | tuple[int, float]
        if _is_inflection_schedule(r):
            check(
                is_int(r[0]) and 0 <= r[0] <= MAX_TOKENS,
                f"r must be a non-negative int (at most {MAX_TOKENS}) in (r, inflection); got {r!r}",
            )
            inflection = check_float("inflection", r[1], -1.0, 1.0)
            self.r = (int(r[0]), inflection)
        elif is_int(r):
            check(0 <= r <= MAX_TOKENS, f"r must be >= 0 and at most {MAX_TOKENS}; got {r!r}")
            self.r = int(r)
        else:
            allowed = "an int, a list of ints or an (r, inflection) tuple"
            counts = check_sequence("r", r, min_len=1, what=allowed)
            check(all(is_int(v) for v in counts), f"r must be {allowed}; got {r!r}")
            check(all(v >= 0 for v in counts), f"r must be >= 0 in every layer; got {list(counts)}")
            check(all(v <= MAX_TOKENS for v in counts), f"r must be at most {MAX_TOKENS} in every layer; got {r!r}")
            self.r = [int(v) for v in counts]  # a copy: changing the caller's list later changes nothing

    def count_for(self, ctx: MergeContext) -> int:
        """The requested count for the layer ``ctx.layer_index`` before clamping."""
        return layer_schedule(self.r, ctx.num_layers)[ctx.layer_index]

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """The layer's count, clamped to ``matching.max_merge``."""
        return min(self.count_for(ctx), matching.max_merge)


class SimilarityThreshold(ThresholdPolicy):
    """CA-ToMe's adaptive count: merge every source whose best similarity is at least T.

    The count is the largest over the batch, so the batch shares one ``r`` (the other
    elements merge their ``r`` best pairs). It changes per image, layer and step.

    Args:
        threshold: T in ``[-1, 1]``; 1.0 merges only exact duplicates, -1 merges all.
        max_ratio: optional cap on the fraction of tokens merged.
        buckets: optional number of static counts, an int in ``[1, MAX_TOKENS]``: ``r``
            is rounded *down* to a multiple of ``max_merge / buckets``, so
            `torch.compile` sees at most ``buckets + 1`` token counts per layer (never
            merging a pair below T).

    Note:
        Counting needs the scores on the host: one device synchronisation per
        recomputed plan (a cached plan costs none).
    """

    def __init__(self, threshold: float = 0.7, max_ratio: float | None = None, buckets: int | None = None) -> None:
        self.threshold = check_float("threshold", threshold, -1.0, 1.0)
        self.max_ratio = check_float("max_ratio", max_ratio, 0.0, 1.0, hi_open=True, allow_none=True)
        self.buckets = check_int("buckets", buckets, 1, MAX_TOKENS, allow_none=True)

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """``max over the batch of #(score >= T)``, capped, optionally bucketed."""
        cap = matching.max_merge
        if self.max_ratio is not None:
            num_tokens = ctx.num_tokens or (matching.num_src + matching.num_dst)
            cap = min(cap, int(num_tokens * self.max_ratio))
        if cap == 0:
            return 0
        above = (matching.score >= self.threshold).sum(dim=-1)  # (B,)
        r = min(int(above.max().item()), cap)
        if self.buckets is not None:
            width = cap / self.buckets
            r = int(math.floor(r / width + 1e-9) * width)
        return r


PolicyFactory = Callable[[float], ThresholdPolicy]


class Scheduled(ThresholdPolicy):
    """Switch between threshold policies as denoising progresses.

    Args:
        stages: ``[(start, policy), ...]``: ``policy`` (a `ThresholdPolicy`) applies
            from progress ``start`` (fraction of steps done, in [0, 1)) until the next
            stage. The first stage must start at 0; starts must be distinct.
            Alternatively a callable ``progress -> policy``.
        default: a `ThresholdPolicy` used when progress is unknown (outside a sampling
            loop); defaults to the first stage.

    Example:
        Merge more early, when the image is still noise::

            Scheduled([(0.0, FixedRatio(0.6)), (0.5, FixedRatio(0.3))])
    """

    def __init__(
        self,
        stages: Sequence[tuple[float, ThresholdPolicy]] | PolicyFactory,
        default: ThresholdPolicy | None = None,
    ) -> None:
        self.stages: list[tuple[float, ThresholdPolicy]] | None = None
        self.factory: PolicyFactory | None = None
        if callable(stages) and not isinstance(stages, ThresholdPolicy):
            self.factory = stages
        else:
            allowed = "a list of (start, policy) pairs or a callable progress -> policy"
            items = check_sequence("stages", stages, what=allowed)
            check(len(items) > 0, "stages must not be empty")
            parsed = []
            for i, stage in enumerate(items):
                start, policy = check_sequence(f"stages[{i}]", stage, length=2, what="a (start, policy) pair")
                start = check_float(f"stages[{i}] start", start, 0.0, 1.0, hi_open=True)
                check_instance(f"stages[{i}] policy", policy, ThresholdPolicy, "a tokenmerge ThresholdPolicy")
                parsed.append((start, policy))
            parsed.sort(key=lambda s: s[0])
            check(parsed[0][0] == 0, f"stages must start at progress 0; got {parsed[0][0]!r}")
            starts = [start for start, _ in parsed]
            check(len(set(starts)) == len(starts), f"stage starts must be distinct; got {starts}")
            self.stages = parsed
        if default is not None:
            check_instance("default", default, ThresholdPolicy, "None or a tokenmerge ThresholdPolicy")
        self.default = default

    def validate(self, matcher: Matcher) -> None:
        """Validate every stage against ``matcher``."""
        for _, policy in self.stages or []:
            policy.validate(matcher)
        if self.default is not None:
            self.default.validate(matcher)

    def policy_at(self, progress: float | None) -> ThresholdPolicy:
        """The policy in force at ``progress`` (None: the default)."""
        if progress is None:
            if self.default is not None:
                return self.default
            progress = 0.0
        if self.factory is not None:
            policy = self.factory(progress)
            check(
                isinstance(policy, ThresholdPolicy),
                f"the schedule callable must return a ThresholdPolicy; got {policy!r}",
            )
            return policy
        assert self.stages is not None
        current = self.stages[0][1]
        for start, policy in self.stages:
            if progress >= start:
                current = policy
        return current

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """Delegate to the stage in force at ``ctx.progress`` (a custom stage's count is checked)."""
        policy = self.policy_at(ctx.progress)
        r = policy.num_merged(matching, ctx)
        if needs_check(policy):
            check_merge_count(r, matching, policy)
        return r
