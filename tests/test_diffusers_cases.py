"""One table of (tiny diffusers model, merging config) cases through common tests.

Models: SD-style and SDXL-style UNets (bare forwards), DiT and PixArt pipelines.
Configs: ToMeSD, CA-ToMe, ToDo, a user-defined policy and (DiT/PixArt) block-range merging.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DIFFUSERS_TINY_MODELS
from torch import nn

import tokenmerge
from tokenmerge import MergeConfig
from tokenmerge.policies import FixedRatio, Matching, MergeContext, RandomGrid, StridedGrid, ThresholdPolicy

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")


class OddStepsOff(ThresholdPolicy):
    """A user-defined threshold policy: merge half of the sources, except at odd denoising steps."""

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        if ctx.step is not None and ctx.step % 2 == 1:
            return 0
        return matching.max_merge // 2


def user_policy() -> MergeConfig:
    return MergeConfig(matcher=RandomGrid(2, 2), threshold=OddStepsOff(), seed=0, merge_mlp=True)


CONFIGS = {
    "tomesd": lambda: tokenmerge.ToMeSD(ratio=0.5, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.3, recompute_at=(0, 2), seed=0),
    "todo": lambda: tokenmerge.ToDo(downsample=2),
    "user": user_policy,
    "range": lambda: MergeConfig(
        matcher=StridedGrid(2, 2), threshold=FixedRatio(0.5), blocks=(1, 2), mode="weighted", seed=0
    ),
}
TRANSFORMERS = ("dit_pipeline", "pixart_pipeline")
CASES = [(model, config) for model in DIFFUSERS_TINY_MODELS for config in CONFIGS if config != "range"]
CASES += [(model, "range") for model in TRANSFORMERS]


def hook_count(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        for name in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_hooks_always_called",
            "_forward_hooks_with_kwargs",
        ):
            total += len(getattr(module, name))
        total += len(module._forward_pre_hooks_with_kwargs)
    return total


def attributes(model: nn.Module) -> list[set[str]]:
    return [set(vars(module)) for module in model.modules()]


def merged_somewhere(handle: tokenmerge.MergeHandle) -> bool:
    return any(n_out < n_in for n_in, n_out in handle.state.merged_tokens.values())


@pytest.mark.parametrize(("model", "config"), CASES)
def test_merging_changes_output_and_remove_restores_it_bitwise(diffusers_tiny, model, config):
    case = diffusers_tiny(model)
    plain = case.run()
    hooks_before, attrs_before = hook_count(case.denoiser), attributes(case.denoiser)
    state_before = {k: v.clone() for k, v in case.denoiser.state_dict().items()}

    handle = tokenmerge.apply(case.target, CONFIGS[config]())
    merged = case.run()
    assert merged_somewhere(handle)
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)

    handle.remove()
    assert torch.equal(case.run(), plain)
    assert hook_count(case.denoiser) == hooks_before
    assert attributes(case.denoiser) == attrs_before
    state_after = case.denoiser.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert tokenmerge.get_handle(case.target) is None


NOOP_CONFIGS = {
    "ratio 0": lambda: tokenmerge.ToMeSD(ratio=0.0, seed=0, merge_crossattn=True, merge_mlp=True),
    "threshold 1.0": lambda: tokenmerge.CAToMe(threshold=1.0, seed=0),
    "todo ratio 0": lambda: tokenmerge.ToDo(downsample=2, ratio=0.0),
}


@pytest.mark.parametrize("model", DIFFUSERS_TINY_MODELS)
@pytest.mark.parametrize("config", NOOP_CONFIGS)
def test_configs_that_merge_nothing_are_bitwise_identical(diffusers_tiny, model, config):
    case = diffusers_tiny(model)
    plain = case.run()
    noop = NOOP_CONFIGS[config]()
    if model == "dit_pipeline":
        noop = noop.replace(merge_crossattn=False)  # DiT has no cross-attention
    with tokenmerge.apply(case.target, noop):
        assert torch.equal(case.run(), plain)


@pytest.mark.parametrize("model", TRANSFORMERS)
def test_block_range_with_ratio_zero_is_bitwise_identical(diffusers_tiny, model):
    case = diffusers_tiny(model)
    plain = case.run()
    with tokenmerge.apply(case.target, CONFIGS["range"]().replace(threshold=FixedRatio(0.0))):
        assert torch.equal(case.run(), plain)


# Latent sizes: not a multiple of the 2x2 stride at some level, non-square, batch 1 and odd batches.
SHAPES = {
    "odd 14x14": dict(size=(14, 14)),
    "non-square 16x12": dict(size=(16, 12)),
    "non-square odd 18x10": dict(size=(18, 10)),
    "batch 1": dict(batch=1),
    "batch 3": dict(batch=3, guidance=False),
}
ROTATION = ("tomesd", "todo", "catome", "user")
SHAPE_CASES = [
    (model, ROTATION[(i + j) % len(ROTATION)], shape)
    for i, model in enumerate(DIFFUSERS_TINY_MODELS)
    for j, shape in enumerate(SHAPES)
    # diffusers' DiT generates square latents of its configured size only
    if not (model == "dit_pipeline" and "non-square" in shape)
]
SHAPE_CASES += [("dit_pipeline", "range", "odd 14x14"), ("pixart_pipeline", "range", "non-square odd 18x10")]
SHAPE_CASES += [("dit_pipeline", "range", "batch 3"), ("pixart_pipeline", "range", "batch 1")]


@pytest.mark.parametrize(("model", "config", "shape"), SHAPE_CASES)
def test_awkward_shapes_merge_and_restore(diffusers_tiny, model, config, shape):
    options = dict(SHAPES[shape])
    if model in ("sd_unet", "sdxl_unet"):
        options.pop("guidance", None)
    case = diffusers_tiny(model, **options)
    plain = case.run()
    with tokenmerge.apply(case.target, CONFIGS[config]()) as handle:
        merged = case.run()
        assert merged_somewhere(handle)
        for layer, (n_in, n_out) in handle.state.merged_tokens.items():
            assert 0 < n_out <= n_in, layer
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert torch.equal(case.run(), plain)


HALF_CASES = [
    (model, dtype, config)
    for model in DIFFUSERS_TINY_MODELS
    for dtype, config in ((torch.float16, "tomesd"), (torch.bfloat16, "todo"))
]
HALF_CASES += [("dit_pipeline", torch.bfloat16, "range"), ("pixart_pipeline", torch.float16, "range")]
HALF_CASES += [("sd_unet", torch.float16, "catome"), ("pixart_pipeline", torch.bfloat16, "user")]


@pytest.mark.parametrize(("model", "dtype", "config"), HALF_CASES, ids=str)
def test_half_precision(diffusers_tiny, model, dtype, config):
    case = diffusers_tiny(model, dtype=dtype)
    plain = case.run()
    with tokenmerge.apply(case.target, CONFIGS[config]()) as handle:
        merged = case.run()
        assert merged_somewhere(handle)
    assert merged.dtype == plain.dtype
    assert torch.isfinite(merged.float()).all()
    assert not torch.equal(merged, plain)
    assert torch.equal(case.run(), plain)
