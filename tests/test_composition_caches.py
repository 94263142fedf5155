"""Merging together with diffusers' caches (``enable_cache``) on the tiny MM-DiT and video pipelines.

Each pipeline calls its transformer inside ``cache_context`` as it does for the real
models. For every cache that acts on the family: the outputs stay finite, merging plus
the cache computes fewer FLOPs than the cache alone and than merging alone over the same
steps, ``remove()`` leaves the cache-enabled model as the cache-enabled model that was
never merged (outputs bit for bit, state_dict equal), and ``disable_cache()`` then gives
the plain model back. The combinations that cannot be right are refused, naming the
cache config, at apply time and when the cache is enabled after merging.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge

pytest.importorskip("diffusers")

from diffusers.hooks import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
)

from tokenmerge import MergeConfig  # noqa: E402
from tokenmerge.errors import TokenMergeError  # noqa: E402
from tokenmerge.placements import ResidualRange  # noqa: E402
from tokenmerge.policies import FixedRatio, RandomGrid  # noqa: E402
from tokenmerge.tools.tiny import (  # noqa: E402
    FLUX_POOLED_DIM,
    JOINT_TEXT_DIM,
    tiny_cogvideox_pipeline,
    tiny_flux_pipeline,
    tiny_hunyuan_video_pipeline,
    tiny_qwen_image_pipeline,
    tiny_wan_pipeline,
)

STEPS = 4


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flux() -> tuple[Any, dict[str, Any]]:
    pipe = tiny_flux_pipeline(0)
    call = dict(
        prompt_embeds=_randn(1, 5, JOINT_TEXT_DIM, seed=1),  # (B, T, D)
        pooled_prompt_embeds=_randn(1, FLUX_POOLED_DIM, seed=2),  # (B, D)
        height=64,
        width=64,
        output_type="latent",
    )
    return pipe, call


def _wan() -> tuple[Any, dict[str, Any]]:
    pipe = tiny_wan_pipeline(0)
    call = dict(
        prompt_embeds=_randn(1, 5, JOINT_TEXT_DIM, seed=1),  # (B, T, D)
        height=64,
        width=64,
        num_frames=5,
        guidance_scale=1.0,
        output_type="latent",
    )
    return pipe, call


def _qwen() -> tuple[Any, dict[str, Any]]:
    pipe = tiny_qwen_image_pipeline(0)
    call = dict(
        prompt_embeds=_randn(1, 5, JOINT_TEXT_DIM, seed=1),  # (B, T, D)
        prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),  # (B, T)
        height=64,
        width=64,
        output_type="latent",
    )
    return pipe, call


def _cogvideox() -> tuple[Any, dict[str, Any]]:
    pipe = tiny_cogvideox_pipeline(0)
    embeds = _randn(1, 5, JOINT_TEXT_DIM, seed=1)  # (B, T, D)
    call = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),  # guidance: both branches in one batched call
        guidance_scale=6.0,
        num_frames=9,
        height=64,
        width=48,
        output_type="latent",
    )
    return pipe, call


def _hunyuan_video() -> tuple[Any, dict[str, Any]]:
    pipe = tiny_hunyuan_video_pipeline(0)
    call = dict(
        prompt_embeds=_randn(1, 5, JOINT_TEXT_DIM, seed=1),  # (B, T, D)
        pooled_prompt_embeds=_randn(1, FLUX_POOLED_DIM, seed=2),  # (B, D)
        prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),  # (B, T)
        num_frames=9,
        height=64,
        width=48,
        output_type="latent",
    )
    return pipe, call


FAMILIES: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "flux": _flux,
    "wan": _wan,
    "qwen-image": _qwen,
    "cogvideox": _cogvideox,
    "hunyuan-video": _hunyuan_video,
}


def _pab(pipe: Any) -> PyramidAttentionBroadcastConfig:
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,  # every other call of each attention reuses its last output
        spatial_attention_timestep_skip_range=(-1, 1001),  # at every step
        current_timestep_callback=lambda: pipe.current_timestep,
    )


#: The caches that act on each family's tiny pipeline. A large threshold makes the block caches skip.
#: FluxPipeline passes no step_index/sigma to cache_context, so SeaCache computes every block there;
#: Wan's attentions are attn1/attn2, which TaylorSeer's default patterns do not name: its lite mode runs.
CACHES: dict[str, Callable[[Any], Any]] = {
    "first_block": lambda pipe: FirstBlockCacheConfig(threshold=10.0),
    "pab": _pab,
    "mag": lambda pipe: MagCacheConfig(threshold=10.0, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
    "sea": lambda pipe: SeaCacheConfig(threshold=10.0),
    "taylorseer_lite": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=True, taylor_factors_dtype=torch.float32
    ),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
    ),
}
CASES = [
    ("flux", "first_block"),
    ("flux", "pab"),
    ("flux", "mag"),
    ("flux", "taylorseer_lite"),
    ("wan", "first_block"),
    ("wan", "pab"),
    ("wan", "mag"),
    ("wan", "sea"),
    ("wan", "taylorseer_lite"),
    ("qwen-image", "first_block"),
    ("qwen-image", "pab"),
    ("cogvideox", "first_block"),
    ("cogvideox", "pab"),
    ("hunyuan-video", "first_block"),
    ("hunyuan-video", "pab"),
]


@pytest.fixture(scope="module")
def pipelines() -> dict[str, tuple[Any, dict[str, Any]]]:
    built = {}
    for name, make in FAMILIES.items():
        pipe, call = make()
        pipe.set_progress_bar_config(disable=True)
        built[name] = (pipe, call)
    return built


def _run(pipe: Any, call: dict[str, Any]) -> torch.Tensor:
    out = pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **call)
    return out.images if hasattr(out, "images") else out.frames


def _flops(pipe: Any, call: dict[str, Any]) -> int:
    """FLOPs of one generation, attention included (the math SDPA kernel: matmuls the counter sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _run(pipe, call)
    return counter.get_total_flops()


_MERGED_FLOPS: dict[str, int] = {}


def _merged_flops(pipe: Any, call: dict[str, Any], family: str) -> int:
    """FLOPs of one merged generation without a cache (once per family)."""
    if family not in _MERGED_FLOPS:
        with tokenmerge.apply(pipe, _config()):
            _MERGED_FLOPS[family] = _flops(pipe, call)
    return _MERGED_FLOPS[family]


def _config() -> tokenmerge.MergeConfig:
    return tokenmerge.ToMeSD(ratio=0.5, seed=0)


def _range(first: int, last: int) -> tokenmerge.MergeConfig:
    """ToMe-style merging of the residual stream over blocks ``first..last``."""
    return MergeConfig(
        matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), placement=ResidualRange(first, last, False), seed=0
    )


@pytest.mark.parametrize(("family", "cache"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_merging_with_a_cache(pipelines: dict[str, Any], family: str, cache: str) -> None:
    pipe, call = pipelines[family]
    model = pipe.transformer
    with torch.no_grad():
        plain = _run(pipe, call)
        merged_flops = _merged_flops(pipe, call, family)
        model.enable_cache(CACHES[cache](pipe))
        try:
            cached = _run(pipe, call)
            cached_flops = _flops(pipe, call)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            with tokenmerge.apply(pipe, _config()) as handle:
                both = _run(pipe, call)
                both_flops = _flops(pipe, call)
                assert handle.state.merged_tokens
            again = _run(pipe, call)
            state = model.state_dict()
        finally:
            model.disable_cache()
        after = _run(pipe, call)
    assert not torch.equal(cached, plain)  # the cache acts on this pipeline
    assert torch.isfinite(both).all()
    assert both_flops < cached_flops and both_flops < merged_flops
    assert torch.equal(again, cached)  # remove() leaves the cache-enabled model as it was
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    assert torch.equal(after, plain)  # disable_cache() then gives the plain model back


class _Outputs:
    """Forward hook recording an attention's output (its image stream), as the block receives it."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.seen.append((output[0] if isinstance(output, tuple) else output).clone())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pyramid_attention_broadcast_reuses_the_full_output(pipelines: dict[str, Any], family: str) -> None:
    """A skipped attention hands the block exactly its earlier output on all tokens, merged or not."""
    pipe, call = pipelines[family]
    model = pipe.transformer
    blocks = getattr(model, "transformer_blocks", None) or model.blocks
    attn = blocks[0].attn if hasattr(blocks[0], "attn") else blocks[0].attn1  # the first block's self-attention
    model.enable_cache(_pab(pipe))
    try:
        with torch.no_grad(), tokenmerge.apply(pipe, _config()) as handle:
            outputs = _Outputs()
            hook = attn.register_forward_hook(outputs)  # after merging's hooks: sees the unmerged output
            try:
                _run(pipe, call)
            finally:
                hook.remove()
            assert handle.state.merged_tokens
    finally:
        model.disable_cache()
    seen = outputs.seen
    assert len(seen) == STEPS
    tokens = seen[0].shape[1]
    assert all(x.shape[1] == tokens for x in seen)  # every output on all image tokens
    assert not torch.equal(seen[0], seen[2])  # computed at steps 0 and 2 ...
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[3], seen[2])  # ... reused at steps 1 and 3


@pytest.mark.parametrize(
    ("family", "config", "cache"),
    [
        ("flux", _config, lambda pipe: CACHES["taylorseer"](pipe)),
        (
            "flux",
            _config,
            lambda pipe: FasterCacheConfig(
                spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep
            ),
        ),
        ("wan", lambda: _range(0, 1), lambda pipe: CACHES["first_block"](pipe)),
        ("flux", lambda: _range(0, 2), _pab),
    ],
    ids=["flux-taylorseer", "flux-faster", "wan-range-first_block", "flux-range-pab"],
)
def test_a_cache_that_cannot_compose_is_refused(
    pipelines: dict[str, Any], family: str, config: Callable[[], Any], cache: Callable[[Any], Any]
) -> None:
    pipe, _ = pipelines[family]
    model = pipe.transformer
    cache_config = cache(pipe)
    name = type(cache_config).__name__
    model.enable_cache(cache_config)
    try:
        hooks = dict(model._forward_pre_hooks)
        with pytest.raises(TokenMergeError, match=name):
            tokenmerge.apply(pipe, config())  # at apply: the model is left as it was
        assert dict(model._forward_pre_hooks) == hooks
    finally:
        model.disable_cache()
    handle = tokenmerge.apply(pipe, config())  # without a cache: merges
    model.enable_cache(cache(pipe))  # enabled after merging: refused at the next call
    try:
        _, call = pipelines[family]
        with torch.no_grad(), pytest.raises(TokenMergeError, match=name):
            _run(pipe, call)
    finally:
        model.disable_cache()
        handle.remove()


def test_keys_values_merging_with_taylorseer_on_attention(pipelines: dict[str, Any]) -> None:
    """ToDo keeps every query: attention outputs are on all tokens, so TaylorSeer may predict them."""
    pipe, call = pipelines["flux"]
    model = pipe.transformer
    model.enable_cache(CACHES["taylorseer"](pipe))
    try:
        with torch.no_grad():
            cached = _run(pipe, call)
            with tokenmerge.apply(pipe, tokenmerge.ToDo(downsample=2, seed=0)) as handle:
                both = _run(pipe, call)
                assert handle.state.merged_tokens
            again = _run(pipe, call)
    finally:
        model.disable_cache()
    assert torch.isfinite(both).all() and not torch.equal(both, cached)
    assert torch.equal(again, cached)


def _composes(pipe: Any, call: dict[str, Any], cache: Any, config: tokenmerge.MergeConfig) -> None:
    """Merging with ``config`` beside ``cache``: finite, fewer FLOPs than the cache alone, remove() exact."""
    model = pipe.transformer
    model.enable_cache(cache)
    try:
        with torch.no_grad():
            cached = _run(pipe, call)
            cached_flops = _flops(pipe, call)
            with tokenmerge.apply(pipe, config) as handle:
                both = _run(pipe, call)
                both_flops = _flops(pipe, call)
                assert handle.state.merged_tokens
            again = _run(pipe, call)
    finally:
        model.disable_cache()
    assert torch.isfinite(both).all() and not torch.equal(both, cached)
    assert both_flops < cached_flops
    assert torch.equal(again, cached)


def test_feed_forward_merging_with_taylorseer_on_attention(pipelines: dict[str, Any]) -> None:
    """Only the feed-forward merges: the attention outputs TaylorSeer predicts are on all tokens."""
    pipe, call = pipelines["flux"]
    only_mlp = tokenmerge.ToMeSD(ratio=0.5, merge_attn=False, merge_mlp=True, seed=0)
    _composes(pipe, call, CACHES["taylorseer"](pipe), only_mlp)


def test_keys_values_merging_with_faster_cache(pipelines: dict[str, Any]) -> None:
    """FasterCache (batched guidance, CogVideoX) beside ToDo, whose attention outputs are on all tokens."""
    pipe, call = pipelines["cogvideox"]
    cache = FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        unconditional_batch_skip_range=2,
        unconditional_batch_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep,
        tensor_format="BFCHW",
    )
    _composes(pipe, call, cache, tokenmerge.ToDo(downsample=2, seed=0))
