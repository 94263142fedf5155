"""tomesd 0.1.3 as an oracle: tokenmerge's ToMeSD reproduces it on an SD-style UNet, and goes further on SDXL.

The merged tokens may come out in another order than tomesd's, but attention and the
feed-forward layer are permutation-equivariant and both unmerge back to the original
order, so the UNet outputs agree to float32 rounding.
"""

from __future__ import annotations

import itertools

import pytest
import tomesd
import torch

import tokenmerge
from tokenmerge.adapters.diffusion_layout import describe_denoiser

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

FLAGS = {
    "attn": dict(merge_attn=True, merge_crossattn=False, merge_mlp=False),
    "attn+cross+mlp": dict(merge_attn=True, merge_crossattn=True, merge_mlp=True),
    "mlp": dict(merge_attn=False, merge_crossattn=False, merge_mlp=True),
}
ORACLE_CASES = list(itertools.product((0.3, 0.5, 0.75), (1, 2, 4, 8), FLAGS))


def outputs(case, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokenmerge, tomesd) outputs of the same UNet and input."""
    with tokenmerge.apply(case.target, tokenmerge.ToMeSD(use_rand=False, **kwargs)) as handle:
        ours = case.run()
        assert handle.state.merged_tokens
    tomesd.apply_patch(case.target, use_rand=False, **kwargs)
    try:
        theirs = case.run()
    finally:
        tomesd.remove_patch(case.target)
    return ours, theirs


@pytest.mark.parametrize(("ratio", "max_downsample", "flags"), ORACLE_CASES)
def test_tomesd_sd_unet_matches_the_reference(diffusers_tiny, ratio, max_downsample, flags):
    case = diffusers_tiny("sd_unet")
    plain = case.run()
    kwargs = dict(ratio=ratio, max_downsample=max_downsample, **FLAGS[flags])
    ours, theirs = outputs(case, kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # merging did something
    assert torch.equal(case.run(), plain)


@pytest.mark.parametrize(
    "shape", [dict(size=(14, 14)), dict(size=(16, 12)), dict(batch=3), dict(batch=1, size=(12, 20))], ids=str
)
def test_tomesd_matches_the_reference_on_awkward_shapes(diffusers_tiny, shape):
    case = diffusers_tiny("sd_unet", **shape)
    ours, theirs = outputs(case, dict(ratio=0.5, max_downsample=2, **FLAGS["attn+cross+mlp"]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sdxl_tomesd_merges_nothing_while_tokenmerge_merges_its_top_attention_level(diffusers_tiny):
    """The measurement behind "SDXL support": same ratio, same default max_downsample=1."""
    case = diffusers_tiny("sdxl_unet")
    plain = case.run()

    tomesd.apply_patch(case.target, ratio=0.5, use_rand=False)
    try:
        theirs = case.run()
    finally:
        tomesd.remove_patch(case.target)
    assert torch.equal(theirs, plain)  # tomesd: no attention at full resolution, so no merge at all

    layout = describe_denoiser(case.denoiser)
    assert layout is not None and layout.base_level == 1
    top_level = {site.name for site in layout.sites if site.level == 1}
    with tokenmerge.apply(case.target, tokenmerge.ToMeSD(ratio=0.5, use_rand=False)) as handle:
        ours = case.run()
        merged = handle.state.merged_tokens
    assert set(merged) == top_level  # exactly the highest-resolution level with attention
    assert all(n_out == n_in // 2 for n_in, n_out in merged.values())  # 8x8 latent grid: 64 -> 32 tokens
    assert not torch.equal(ours, plain)


def test_sd_levels_are_read_from_the_structure(diffusers_tiny):
    layout = describe_denoiser(diffusers_tiny("sd_unet").denoiser)
    assert layout is not None and layout.base_level == 0
    levels = {site.name: site.level for site in layout.sites}
    assert levels["down_blocks.0.attentions.0.transformer_blocks.0"] == 0
    assert levels["down_blocks.1.attentions.0.transformer_blocks.0"] == 1
    assert levels["mid_block.attentions.0.transformer_blocks.0"] == 2
    assert levels["up_blocks.1.attentions.0.transformer_blocks.0"] == 1
    assert levels["up_blocks.2.attentions.1.transformer_blocks.0"] == 0
