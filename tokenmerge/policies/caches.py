"""Pair caches: when a layer's merge plan is reused across denoising steps.

* `NoCache`: recompute every call.
* `RecomputeAt`: recompute at the listed step indices only (CA-ToMe).
* `EveryK`: recompute every k steps (ToMA).
* `DriftTriggered`: recompute when the cached pairs have stopped being similar.

All of them recompute when there is no step information (a bare forward), when the
batch size, token count, token layout, grid or device changed, and after `reset`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import MAX_STEPS, check, check_float, check_int, check_sequence, is_int
from ..layout import TokenLayout
from ..plan import MergePlan
from .base import CacheEntry, MergeContext, PairCache

__all__ = ["NoCache", "RecomputeAt", "EveryK", "DriftTriggered", "CA_TOME_C3"]

#: CA-ToMe's best cache configuration ("C3") for 50 steps.
CA_TOME_C3: tuple[int, ...] = (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49)


class NoCache(PairCache):
    """Never reuse a plan: match afresh in every call."""

    def lookup(self, key: Any, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0) -> MergePlan | None:
        """Always None."""
        return None

    def store(
        self, key: Any, plan: MergePlan, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0
    ) -> CacheEntry:
        """Keeps nothing."""
        return CacheEntry(plan=plan, step=ctx.step, signature=())

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """Always True."""
        return True

    @property
    def stateless(self) -> bool:
        """True: this cache holds nothing."""
        return True


class RecomputeAt(PairCache):
    """Recompute the plans at the listed 0-based denoising steps; reuse them in between.

    Args:
        steps: step indices, ints in ``[0, MAX_STEPS]``, at least one, in any order
            (a list, tuple, range, set or NumPy array; not a bare int). CA-ToMe's best
            configuration for 50 steps is `CA_TOME_C3`. A step before the first listed
            one (or any step with nothing cached yet) computes a plan too.
    """

    def __init__(self, steps: Iterable[int] = CA_TOME_C3) -> None:
        items = check_sequence("recompute_at", steps, iterables=True, what="a list of step indices (ints)")
        check(len(items) > 0, "recompute_at must list at least one step; got an empty list")
        check(
            all(is_int(s) and 0 <= s <= MAX_STEPS for s in items),
            f"recompute_at steps must be non-negative ints (at most {MAX_STEPS}); got {items!r}",
        )
        super().__init__()
        self.steps = tuple(sorted({int(s) for s in items}))

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """True at a listed step (once per step), or without step information."""
        if ctx.step is None or entry.step is None:
            return True
        return ctx.step in self.steps and entry.step != ctx.step


class EveryK(PairCache):
    """Recompute every ``k`` steps (ToMA's reuse of merge patterns).

    Args:
        k: reuse a plan for ``k`` consecutive steps, an int in ``[1, MAX_STEPS]`` (1
            recomputes every step).
    """

    def __init__(self, k: int = 3) -> None:
        k = check_int("k", k, 1, MAX_STEPS)
        super().__init__()
        self.k = k

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """True once ``k`` steps have passed since the plan was computed."""
        if ctx.step is None or entry.step is None:
            return True
        return ctx.step - entry.step >= self.k or ctx.step < entry.step


class DriftTriggered(PairCache):
    """Recompute when the cached pairs have drifted apart.

    When a plan is cached it records the mean cosine similarity of its merged pairs
    (a scalar). At each later call it measures that similarity again on the current
    metric, for the same pairs only (no new matching, no sort), and recomputes when it
    has dropped by more than ``tolerance``. The metric itself is never stored.

    Args:
        tolerance: allowed drop in mean pair similarity, in ``(0, 2]``.
        max_age: optional bound on the steps a plan is reused, whatever the drift: None
            or an int in ``[1, MAX_STEPS]``.

    Note:
        The decision reads one scalar on the host: a device synchronisation per call.
    """

    def __init__(self, tolerance: float = 0.05, max_age: int | None = None) -> None:
        tolerance = check_float("tolerance", tolerance, 0.0, 2.0, lo_open=True)
        max_age = check_int("max_age", max_age, 1, MAX_STEPS, allow_none=True)
        super().__init__()
        self.tolerance = tolerance
        self.max_age = max_age

    @staticmethod
    def pair_similarity(plan: MergePlan, metric: Tensor) -> Tensor:
        """Mean cosine similarity, over the batch, of each merged source and its destination."""
        if plan.r == 0:
            return metric.new_ones(())
        channels = metric.shape[-1]
        dst_idx = plan.keep_idx.gather(1, plan.merged_slot)  # (B, r) input position of each destination
        src = metric.gather(1, plan.merged_idx[..., None].expand(-1, -1, channels))  # (B, r, C)
        dst = metric.gather(1, dst_idx[..., None].expand(-1, -1, channels))  # (B, r, C)
        return torch.nn.functional.cosine_similarity(src.float(), dst.float(), dim=-1).mean()

    def store(
        self, key: Any, plan: MergePlan, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0
    ) -> CacheEntry:
        """Cache ``plan`` with the mean similarity of its pairs."""
        entry = super().store(key, plan, metric, ctx, protected)
        entry.extra["similarity"] = float(self.pair_similarity(plan, metric))
        return entry

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """True when the pairs' similarity fell by more than ``tolerance`` (or the plan is too old)."""
        if self.max_age is not None and ctx.step is not None and entry.step is not None:
            if ctx.step - entry.step >= self.max_age or ctx.step < entry.step:
                return True
        now = float(self.pair_similarity(entry.plan, metric))
        return entry.extra["similarity"] - now > self.tolerance
