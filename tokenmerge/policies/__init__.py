"""Merging policies: the `Matcher`, `ThresholdPolicy` and `PairCache` interfaces and their implementations."""

from .base import CacheEntry, Matcher, Matching, MergeContext, PairCache, ThresholdPolicy, unit_rows
from .caches import CA_TOME_C3, DriftTriggered, EveryK, NoCache, RecomputeAt
from .matchers import AlternatingBipartite, RandomGrid, StridedGrid, grid_partition
from .thresholds import FixedCount, FixedRatio, Scheduled, SimilarityThreshold, layer_schedule

__all__ = [
    "Matcher",
    "ThresholdPolicy",
    "PairCache",
    "Matching",
    "unit_rows",
    "MergeContext",
    "CacheEntry",
    "AlternatingBipartite",
    "RandomGrid",
    "StridedGrid",
    "grid_partition",
    "FixedRatio",
    "FixedCount",
    "SimilarityThreshold",
    "Scheduled",
    "layer_schedule",
    "NoCache",
    "RecomputeAt",
    "EveryK",
    "DriftTriggered",
    "CA_TOME_C3",
]
