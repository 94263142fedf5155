"""`MergeConfig`: a merging policy as plain data."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import TokenMergeError, check
from .plan import MERGE_MODES, MergeMode
from .policies.base import Matcher, PairCache, ThresholdPolicy
from .policies.caches import NoCache

__all__ = ["MergeConfig"]


@dataclass
class MergeConfig:
    """A merging policy composed from a matcher, a threshold policy and a pair cache.

    The presets (`ToMe`, `ToMeSD`, `CAToMe`, `ToDo`) return one; build your own for a
    custom composition. Adapters read the options that apply to their models and
    reject those that do not (cross-attention merging on a DiT, say).

    Args:
        matcher: splits tokens into sources and destinations (`Matcher`).
        threshold: decides how many sources merge (`ThresholdPolicy`).
        cache: decides when plans are recomputed (`PairCache`); `NoCache` by default.
        mode: how merged tokens combine: ``"mean"``, ``"weighted"`` (by token size)
            or ``"sum"``.
        seed: seed of the generator random matchers draw from; merging never touches
            the global RNG or the user's generator. The generator is re-seeded at the
            start of every generation, so identical calls give identical results.
        merge_attn: merge around self-attention (diffusion models).
        merge_crossattn: merge around cross-attention (diffusion models).
        merge_mlp: merge around the feed-forward layer (diffusion models).
        max_downsample: merge only in levels whose token grid is downsampled at most
            this much from the model's highest-resolution level with attention
            (1, 2, 4 or 8; UNets).
        blocks: ``(first, last)`` block range (inclusive) for residual-stream merging:
            tokens are merged before block ``first`` and unmerged after ``last``
            (DiT/PixArt). None merges around each sub-layer instead.
        prop_attn: add ``log(size)`` to attention logits (proportional attention)
            where the residual stream is merged.
        trace_source: keep which original tokens each token covers (ViTs).
        kv_only: merge only the keys and values of self-attention (ToDo): queries
            keep every token, so no unmerge is needed.
    """

    matcher: Matcher
    threshold: ThresholdPolicy
    cache: PairCache = field(default_factory=NoCache)
    mode: MergeMode = "mean"
    seed: int | None = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    max_downsample: int = 1
    blocks: tuple[int, int] | None = None
    prop_attn: bool = True
    trace_source: bool = False
    kv_only: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `TokenMergeError` naming the first argument that is out of range."""
        check(isinstance(self.matcher, Matcher), f"matcher must be a tokenmerge.policies.Matcher; got {self.matcher!r}")
        check(
            isinstance(self.threshold, ThresholdPolicy),
            f"threshold must be a tokenmerge.policies.ThresholdPolicy; got {self.threshold!r}",
        )
        check(isinstance(self.cache, PairCache), f"cache must be a tokenmerge.policies.PairCache; got {self.cache!r}")
        check(self.mode in MERGE_MODES, f"mode must be one of {MERGE_MODES}; got {self.mode!r}")
        check(
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
            f"seed must be None or an int; got {self.seed!r}",
        )
        check(self.max_downsample in (1, 2, 4, 8), f"max_downsample must be 1, 2, 4 or 8; got {self.max_downsample!r}")
        if self.blocks is not None:
            ok = (
                isinstance(self.blocks, tuple)
                and len(self.blocks) == 2
                and all(isinstance(b, int) and b >= 0 for b in self.blocks)
                and self.blocks[0] <= self.blocks[1]
            )
            check(ok, f"blocks must be None or (first, last) with 0 <= first <= last; got {self.blocks!r}")
        self.threshold.validate(self.matcher)

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with some fields changed (validated again)."""
        try:
            return replace(self, **changes)
        except TypeError as error:  # unknown field name
            raise TokenMergeError(str(error)) from None

    def fresh_cache(self) -> PairCache:
        """An empty copy of the configured cache, for one model."""
        cache = copy.deepcopy(self.cache)
        cache.reset()
        return cache
