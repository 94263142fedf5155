"""The classic methods, each a `MergeConfig` composed from the three interfaces."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .config import MergeConfig
from .errors import check_bool, check_int
from .placements import KeyValues, SubLayers, TokenStream
from .policies.caches import CA_TOME_C3, NoCache, RecomputeAt
from .policies.matchers import MAX_STRIDE, AlternatingBipartite, RandomGrid, StridedGrid
from .policies.thresholds import FixedCount, FixedRatio, SimilarityThreshold

__all__ = ["ToMe", "ToMeSD", "CAToMe", "ToDo"]


def _flag(name: str, value: Any) -> bool:
    """A preset's on/off argument: a `bool` only (``1``, ``"no"`` or ``None`` are refused).

    tomesd takes 0/1 as well; here a truthy ``"no"`` would turn a feature *on*, so the
    type is strict (the benchmark's method specs convert ``merge_mlp=1`` to a bool).
    """
    return check_bool(name, value)


def _sub_layers(attn: Any, cross_attn: Any, mlp: Any, max_downsample: int, min_tokens: int | None) -> SubLayers:
    return SubLayers(
        attn=_flag("merge_attn", attn),
        cross_attn=_flag("merge_crossattn", cross_attn),
        mlp=_flag("merge_mlp", mlp),
        max_downsample=max_downsample,
        min_tokens=min_tokens,
    )


def ToMe(
    r: int | Sequence[int] | tuple[int, float] = 8,
    *,
    prop_attn: bool = True,
    trace_source: bool = False,
    seed: int | None = None,
) -> MergeConfig:
    """ToMe (Bolya et al., 2023): merge ``r`` tokens per block, residual stream kept merged.

    Bipartite soft matching on alternating tokens, size-weighted averages, and
    proportional attention. Made for ViTs.

    Args:
        r: tokens merged per layer: an int, a per-layer list, or ``(r, inflection)``.
        prop_attn: proportional attention (``log(size)`` added to attention logits). It
            reaches SDPA as a mask, which rules out the flash kernel on CUDA; ``False``
            keeps attention mask-free (ToMe uses it for models not trained with merging).
        trace_source: keep which patches every token covers (for `tokenmerge.tools.vis` and
            dense outputs).
        seed: unused by ToMe's deterministic matcher; kept for a uniform signature.
    """
    return MergeConfig(
        matcher=AlternatingBipartite(),
        threshold=FixedCount(r),
        mode="weighted",
        seed=seed,
        placement=TokenStream(
            prop_attn=_flag("prop_attn", prop_attn), trace_source=_flag("trace_source", trace_source)
        ),
    )


def ToMeSD(
    ratio: float = 0.5,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    *,
    st: int = 1,
    min_tokens: int | None = None,
    seed: int | None = None,
) -> MergeConfig:
    """ToMeSD (Bolya & Hoffman, 2023) with exactly tomesd's arguments.

    Args:
        ratio: fraction of tokens merged, at most ``1 - 1/(sx*sy)``.
        max_downsample: merge in levels downsampled at most this much (1, 2, 4, 8),
            counted from the model's highest-resolution level with attention.
        sx, sy: stride of the destination grid.
        use_rand: random destination inside each cell (seeded by ``seed``).
        merge_attn, merge_crossattn, merge_mlp: which sub-layers merge.
        st: cell depth in frames on a video model's ``(t, h, w)`` token grid (1: cells
            within a frame; 2: a cell spans two consecutive frames, at most
            ``1 - 1/(sx*sy*st)`` merged).
        min_tokens: merge a block only when it has at least this many mergeable tokens;
            None takes the default of the device and family (`tokenmerge.placements.DEFAULT_MIN_TOKENS`:
            16384 for UNets on CUDA, 0 elsewhere); 0 merges every block.
        seed: seed of the partition RNG.
    """
    return MergeConfig(
        matcher=RandomGrid(sx=sx, sy=sy, use_rand=use_rand, st=st),
        threshold=FixedRatio(ratio),
        cache=NoCache(),
        mode="mean",
        seed=seed,
        placement=_sub_layers(merge_attn, merge_crossattn, merge_mlp, max_downsample, min_tokens),
    )


def CAToMe(
    threshold: float = 0.7,
    recompute_at: Iterable[int] = CA_TOME_C3,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    *,
    buckets: int | None = None,
    st: int = 1,
    min_tokens: int | None = None,
    seed: int | None = None,
) -> MergeConfig:
    """CA-ToMe (arXiv 2501.00946): adaptive threshold plus a cache of matched pairs.

    Every source whose best cosine similarity is at least ``threshold`` merges (the
    batch maximum); plans are recomputed only at the ``recompute_at`` steps and reused
    in between. The default steps are the paper's configuration C3 for 50 steps.

    Args:
        threshold: similarity threshold T in [-1, 1].
        recompute_at: 0-based steps at which plans are recomputed.
        max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp: as
            in `ToMeSD`.
        buckets: round the adaptive count down to this many static sizes
            (compile-friendly; see `SimilarityThreshold`).
        st: cell depth in frames on a video grid, as in `ToMeSD` (the threshold sees the
            same cells).
        min_tokens: merge a block only when it has at least this many mergeable tokens;
            None takes the default of the device and family (`tokenmerge.placements.DEFAULT_MIN_TOKENS`:
            16384 for UNets on CUDA, 0 elsewhere); 0 merges every block.
        seed: seed of the partition RNG.
    """
    return MergeConfig(
        matcher=RandomGrid(sx=sx, sy=sy, use_rand=use_rand, st=st),
        threshold=SimilarityThreshold(threshold, buckets=buckets),
        cache=RecomputeAt(recompute_at),
        mode="mean",
        seed=seed,
        placement=_sub_layers(merge_attn, merge_crossattn, merge_mlp, max_downsample, min_tokens),
    )


def ToDo(
    downsample: int = 2,
    max_downsample: int = 1,
    *,
    ratio: float | None = None,
    st: int = 1,
    min_tokens: int | None = None,
    seed: int | None = None,
) -> MergeConfig:
    """ToDo (Smith et al., 2024): token downsampling of keys and values.

    Queries keep every token; keys and values are average-pooled over
    ``downsample x downsample`` cells, so attention costs ``1/downsample**2`` as much
    and nothing needs unmerging.

    Args:
        downsample: pooling factor per side, an int in ``[2, 64]`` (a cell of at most
            ``64 x 64`` tokens, the grid matchers' largest stride).
        max_downsample: as in `ToMeSD`.
        ratio: fraction of tokens pooled away; defaults to all but one per cell,
            ``1 - 1/(downsample**2 * st)`` (plain average pooling).
        st: temporal downsampling on a video model's ``(t, h, w)`` token grid: keys and
            values pooled over ``st`` consecutive frames too (1: within each frame).
        seed: unused by the fixed top-left grid; kept for a uniform signature.
    """
    downsample = check_int("downsample", downsample, 2, MAX_STRIDE)  # type: ignore[assignment]
    st = check_int("st", st, 1, MAX_STRIDE)  # type: ignore[assignment]
    full = 1.0 - 1.0 / (downsample * downsample * st)
    return MergeConfig(
        matcher=StridedGrid(sx=downsample, sy=downsample, st=st),
        threshold=FixedRatio(full if ratio is None else ratio),
        mode="mean",
        seed=seed,
        placement=KeyValues(max_downsample=max_downsample, min_tokens=min_tokens),
    )
