"""The three interfaces a merging policy is composed from.

* `Matcher`: splits tokens into sources and destinations and pairs each source with
  its most similar destination.
* `ThresholdPolicy`: decides how many of those pairs are merged this time.
* `PairCache`: decides whether a plan computed earlier for a layer is reused.

A new policy is a subclass of one of them; nothing else in the library needs editing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..layout import TokenLayout
from ..plan import MergePlan
from .best_match import best_match
from .checks import check_matching, check_merge_count, needs_check

__all__ = ["MergeContext", "Matching", "Matcher", "ThresholdPolicy", "PairCache", "CacheEntry", "unit_rows"]


@dataclass
class MergeContext:
    """What a policy may know about the call it is deciding for.

    Attributes:
        layer: a key naming the layer (unique within a model, e.g. its module path).
        layer_index: 0-based position of the layer among the merged layers.
        num_layers: how many layers merge in the model.
        num_tokens: mergeable tokens N (the protected prefix and suffix excluded).
        grid: shape of the mergeable tokens' grid, row-major: ``(n,)``, ``(height,
            width)`` for image patches or ``(frames, height, width)`` for video (the
            layout's `~tokenmerge.layout.TokenLayout.grid`); None when unknown (the
            grid matchers then assume a square image).
        step: 0-based denoising step of the current generation, or None outside a
            sampling loop (ViTs, a bare forward).
        num_steps: steps in the current generation when known.
        call_index: which forward call within the current step (separate
            classifier-free-guidance calls get 0 and 1), so each keeps its own cache.
        generator: the seeded random generator of this model's merging state (for
            custom policies; the built-in matchers draw with `seed` instead).
        seed: the merging state's seed. When set, random matchers draw with the
            counter-based `tokenmerge.policies.rng` keyed by ``(seed, layer_index,
            timestep)``: no `torch.Generator`, so the draw traces under `torch.compile`
            and replays in CUDA graphs.
        timestep: the timestep the denoiser was called with (a tensor, kept on its
            device), or None outside a sampling loop. Keys the random draws.
    """

    layer: str = "layer"
    layer_index: int = 0
    num_layers: int = 1
    num_tokens: int = 0
    grid: tuple[int, ...] | None = None
    step: int | None = None
    num_steps: int | None = None
    call_index: int = 0
    generator: torch.Generator | None = None
    seed: int | None = None
    timestep: Tensor | float | None = None

    @property
    def progress(self) -> float | None:
        """Fraction of the generation done, ``step / num_steps`` in [0, 1), or None."""
        if self.step is None or not self.num_steps:
            return None
        return self.step / self.num_steps


@dataclass(frozen=True, eq=False)
class Matching:
    """Sources, destinations and each source's best destination.

    Token positions count from the first mergeable token. Every token is either a source
    or a destination: ``num_src + num_dst == N``.

    Attributes:
        src_idx: ``(B, Ns)`` positions of the source tokens.
        dst_idx: ``(B, Nd)`` positions of the destination tokens.
        best: ``(B, Ns)`` for each source, the index into ``dst_idx`` of its destination.
        score: ``(B, Ns)`` similarity of that pair (cosine for the built-in matchers);
            the plan merges the highest scores first.
    """

    src_idx: Tensor
    dst_idx: Tensor
    best: Tensor
    score: Tensor

    @property
    def num_src(self) -> int:
        """Number of source tokens Ns: the most that can be merged."""
        return self.src_idx.shape[1]

    @property
    def num_dst(self) -> int:
        """Number of destination tokens Nd: the fewest tokens a full merge leaves."""
        return self.dst_idx.shape[1]

    @property
    def max_merge(self) -> int:
        """The most sources that can be merged: all of them, or none without a destination."""
        return self.num_src if self.num_dst > 0 else 0

    @classmethod
    def by_similarity(cls, metric: Tensor, src_idx: Tensor, dst_idx: Tensor) -> Matching:
        """Pair each source with its most cosine-similar destination (bipartite soft matching).

        Args:
            metric: ``(B, N, C)`` token features to compare.
            src_idx: ``(Ns,)`` or ``(B, Ns)`` source positions.
            dst_idx: ``(Nd,)`` or ``(B, Nd)`` destination positions.
        """
        batch, _, channels = metric.shape
        src_idx = src_idx.expand(batch, -1) if src_idx.dim() == 1 else src_idx  # (B, Ns)
        dst_idx = dst_idx.expand(batch, -1) if dst_idx.dim() == 1 else dst_idx  # (B, Nd)
        unit = unit_rows(metric)  # (B, N, C)
        src = unit.gather(1, src_idx[..., None].expand(-1, -1, channels))  # (B, Ns, C)
        dst = unit.gather(1, dst_idx[..., None].expand(-1, -1, channels))  # (B, Nd, C)
        return cls.by_features(src, dst, src_idx, dst_idx)

    @classmethod
    def by_features(cls, src: Tensor, dst: Tensor, src_idx: Tensor, dst_idx: Tensor) -> Matching:
        """Pair each source with the destination of largest dot product, features already split.

        Args:
            src: ``(B, Ns, C)`` source features (unit rows for cosine similarity; views are fine).
            dst: ``(B, Nd, C)`` destination features.
            src_idx: ``(Ns,)`` or ``(B, Ns)`` positions of the sources.
            dst_idx: ``(Nd,)`` or ``(B, Nd)`` positions of the destinations.
        """
        batch = src.shape[0]
        src_idx = src_idx.expand(batch, -1) if src_idx.dim() == 1 else src_idx  # (B, Ns)
        dst_idx = dst_idx.expand(batch, -1) if dst_idx.dim() == 1 else dst_idx  # (B, Nd)
        if dst.shape[1] == 0:
            score = src.new_full(src.shape[:2], float("-inf"))  # (B, Ns)
            best = torch.zeros(src.shape[:2], dtype=torch.long, device=src.device)  # (B, Ns)
        else:
            # max over destinations of src @ dst^T; fused on CUDA (see best_match)
            score, best = best_match(src, dst)  # (B, Ns), (B, Ns)
        return cls(src_idx=src_idx, dst_idx=dst_idx, best=best, score=score)


def unit_rows(metric: Tensor) -> Tensor:
    """``metric`` ``(B, N, C)`` with every row scaled to unit length (zero rows stay zero)."""
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)


class Matcher(ABC):
    """Splits tokens into sources and destinations and pairs them.

    Subclasses implement `match`. `max_ratio` is the largest fraction of tokens the
    matcher can ever merge (used to validate ratios before anything is applied).
    """

    #: Largest fraction of the tokens this matcher can merge (its sources' share).
    max_ratio: float = 0.5
    #: True when `match` is pure tensor code with shapes fixed by the input's shape (no
    #: host reads, no `torch.Generator`, no Python state): `torch.compile` then traces
    #: planning inline. False (the safe default for custom matchers) runs planning
    #: outside the compiled graph.
    traceable: bool = False

    @abstractmethod
    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match the tokens of ``metric`` ``(B, N, C)``; see `Matching`."""

    def build_plan(
        self, metric: Tensor, ctx: MergeContext, threshold: ThresholdPolicy, protected: int | TokenLayout = 0
    ) -> MergePlan:
        """Match ``metric`` ``(B, N, C)`` (protected tokens included) and build the plan.

        The default matches the mergeable tokens, asks ``threshold`` how many merge and
        builds a `MergePlan`. A matcher that can build its plan more directly (the
        zero-overhead reference in `tokenmerge.tools.ideal`) overrides this.

        Args:
            metric: ``(B, N, C)`` features of all N tokens.
            ctx: the call's context (``ctx.grid`` is the mergeable span's grid).
            threshold: decides how many sources merge.
            protected: the number of protected prefix tokens (the rest merges), or the
                whole `~tokenmerge.layout.TokenLayout` (prefix, span, suffix). `MergeState`
                passes an int whenever the layout has no suffix, so an override written
                for ints keeps working.
        """
        if isinstance(protected, TokenLayout):
            protected.check_tokens(metric.shape[1])
            span = metric[:, protected.merge_start : protected.merge_stop]  # (B, M, C) the mergeable tokens
            where: dict[str, Any] = {"layout": protected}
        else:
            span = metric[:, protected:]  # (B, N - P, C)
            where = {"protected": protected}
        matching = self.match(span, ctx)
        if needs_check(self):  # a user's matcher: shapes, dtypes, ranges, partition (built-ins skip)
            check_matching(matching, span.shape[1], self, batch=metric.shape[0], device=metric.device)
        r = threshold.num_merged(matching, ctx)
        if needs_check(threshold):  # a user's threshold: an int in [0, max_merge]
            r = check_merge_count(r, matching, threshold)
        return MergePlan.from_matching(matching, r, **where)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_fields(self)})"


class ThresholdPolicy(ABC):
    """Decides how many source tokens are merged for one call."""

    #: True when `num_merged` depends only on shapes and static context (layer, token
    #: count), never on tensor values or the denoising step: `torch.compile` then traces
    #: planning inline without a graph break or a recompile per step.
    traceable: bool = False

    @abstractmethod
    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """How many of ``matching``'s sources to merge, ``0 <= r <= matching.num_src``.

        The plan merges the ``r`` highest-scoring sources of each batch element.
        """

    def validate(self, matcher: Matcher) -> None:  # noqa: B027 - optional hook
        """Raise `TokenMergeError` if this policy asks for more than ``matcher`` allows."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_fields(self)})"


@dataclass
class CacheEntry:
    """A cached plan with what is needed to decide on its reuse.

    Attributes:
        plan: the merge plan (index tensors only).
        step: denoising step it was computed at.
        signature: batch size, token count, protected tokens, grid and device it is valid for.
        extra: whatever a `PairCache` subclass wants to keep beside it.
    """

    plan: MergePlan
    step: int | None
    signature: tuple[Any, ...]
    extra: dict[str, Any] = field(default_factory=dict)


class PairCache(ABC):
    """Holds the plan computed for each layer and decides when to compute it afresh.

    Entries are keyed per layer (and per call within a step). A plan is never reused
    for a different batch size, token count, token layout, grid or device. ``protected`` in
    `lookup` and `store` is the protected prefix length or the whole
    `~tokenmerge.layout.TokenLayout` (as `Matcher.build_plan` takes it); subclasses that
    override only `should_recompute` need not care. `reset` forgets everything; the
    adapters call it at the start of every new generation.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, CacheEntry] = {}

    @abstractmethod
    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """Whether the cached ``entry`` must be replaced for this call."""

    def lookup(self, key: Any, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0) -> MergePlan | None:
        """The cached plan for ``key`` if it may be reused now, else None."""
        entry = self._entries.get(key)
        if entry is None or entry.signature != _signature(metric, ctx, protected):
            return None
        if self.should_recompute(entry, metric, ctx):
            return None
        return entry.plan

    def store(
        self, key: Any, plan: MergePlan, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0
    ) -> CacheEntry:
        """Remember ``plan`` for ``key``; returns the new entry."""
        entry = CacheEntry(plan=plan, step=ctx.step, signature=_signature(metric, ctx, protected))
        self._entries[key] = entry
        return entry

    def reset(self) -> None:
        """Forget every cached plan."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stateless(self) -> bool:
        """True when this cache never reuses a plan (so it needs no state)."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_fields(self)})"


def _signature(metric: Tensor, ctx: MergeContext, protected: int | TokenLayout) -> tuple[Any, ...]:
    # A layout with no suffix is its prefix count (its grid is ctx.grid): the same entry
    # whichever form was passed.
    if isinstance(protected, TokenLayout) and not protected.suffix:
        protected = protected.prefix
    return (metric.shape[0], metric.shape[1], protected, ctx.grid, metric.device)


def _fields(obj: object) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(obj).items() if not k.startswith("_"))
