"""Bad input, re-application, and composition with diffusers' attention processors."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.adapters.diffusion_layout import describe_denoiser
from tokenmerge.policies import FixedRatio, StridedGrid

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

SUPPORTED = ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")


def hooks_on(model: torch.nn.Module) -> int:
    return sum(
        len(module._forward_pre_hooks) + len(module._forward_hooks) + len(module._forward_hooks_always_called)
        for module in model.modules()
    )


def tiny_unconditional_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["model", "pipeline"])
def test_unsupported_targets_name_the_supported_classes(target):
    unet = tiny_unconditional_unet()
    obj = unet if target == "model" else DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(TokenMergeError) as error:
        tokenmerge.apply(obj, tokenmerge.ToMeSD())
    assert all(name in str(error.value) for name in SUPPORTED)
    assert "UNet2DModel" in str(error.value)
    assert hooks_on(unet) == 0


def range_config(blocks: tuple[int, int]) -> MergeConfig:
    return MergeConfig(matcher=StridedGrid(2, 2), threshold=FixedRatio(0.5), blocks=blocks)


BAD = [
    ("dit_pipeline", lambda: tokenmerge.ToMeSD(merge_crossattn=True), "merge_crossattn"),
    ("dit_pipeline", lambda: range_config((2, 4)), "blocks"),
    ("pixart_pipeline", lambda: range_config((0, 9)), "4 transformer blocks"),
    ("sd_unet", lambda: range_config((0, 1)), "blocks"),
    ("pixart_pipeline", lambda: range_config((0, 1)).replace(kv_only=True), "kv_only"),
    ("sd_unet", lambda: tokenmerge.ToDo().replace(merge_attn=False), "kv_only"),
    ("sd_unet", lambda: tokenmerge.ToMeSD(merge_attn=False), "merge_attn"),
    ("sdxl_unet", lambda: tokenmerge.ToMeSD().replace(trace_source=True), "trace_source"),
]


@pytest.mark.parametrize(("model", "config", "argument"), BAD, ids=[f"{m}-{a}" for m, _, a in BAD])
def test_configs_the_model_cannot_honour_raise_before_anything_changes(diffusers_tiny, model, config, argument):
    case = diffusers_tiny(model)
    plain = case.run()
    with pytest.raises(TokenMergeError, match=argument):
        tokenmerge.apply(case.target, config())
    assert hooks_on(case.denoiser) == 0
    assert tokenmerge.get_handle(case.target) is None
    assert torch.equal(case.run(), plain)


def test_a_rejected_config_leaves_the_previous_one_in_place(diffusers_tiny):
    case = diffusers_tiny("dit_pipeline")
    handle = tokenmerge.apply(case.target, tokenmerge.ToMeSD(ratio=0.5, seed=0))
    merged = case.run()
    hooks = hooks_on(case.denoiser)
    with pytest.raises(TokenMergeError):
        tokenmerge.apply(case.target, range_config((0, 7)))
    assert handle.active and tokenmerge.get_handle(case.target) is handle
    assert hooks_on(case.denoiser) == hooks
    assert torch.equal(case.run(), merged)
    handle.remove()


def test_applying_twice_replaces_cleanly(diffusers_tiny):
    case = diffusers_tiny("sd_unet")
    plain = case.run()
    second = tokenmerge.ToMeSD(ratio=0.3, seed=0, merge_mlp=True)
    with tokenmerge.apply(case.target, second):
        expected, hooks_once = case.run(), hooks_on(case.denoiser)
    first = tokenmerge.apply(case.target, tokenmerge.CAToMe(seed=0))
    handle = tokenmerge.apply(case.target, second)
    assert not first.active and hooks_on(case.denoiser) == hooks_once
    assert torch.equal(case.run(), expected)
    handle.remove()
    assert hooks_on(case.denoiser) == 0 and torch.equal(case.run(), plain)


def test_pipeline_and_denoiser_handles_replace_each_other(diffusers_tiny):
    case = diffusers_tiny("pixart_pipeline")
    plain = case.run()
    config = tokenmerge.ToMeSD(ratio=0.5, seed=0)
    with tokenmerge.apply(case.denoiser, config):
        expected, hooks_once = case.run(), hooks_on(case.denoiser)
    through_pipe = tokenmerge.apply(case.target, tokenmerge.ToDo())
    direct = tokenmerge.apply(case.denoiser, config)
    assert not through_pipe.active and direct.active
    assert hooks_on(case.denoiser) == hooks_once
    assert torch.equal(case.run(), expected)
    assert tokenmerge.remove(case.target)  # the stale pipeline handle goes quietly
    assert direct.active
    direct.remove()
    assert hooks_on(case.denoiser) == 0 and torch.equal(case.run(), plain)


@pytest.mark.parametrize("config", ["tomesd", "tomesd-all", "todo"])
def test_hooks_compose_with_the_classic_attention_processor(diffusers_tiny, config):
    configs = {
        "tomesd": tokenmerge.ToMeSD(ratio=0.5, seed=0),
        "tomesd-all": tokenmerge.ToMeSD(ratio=0.5, seed=0, merge_crossattn=True, merge_mlp=True),
        "todo": tokenmerge.ToDo(),
    }
    case = diffusers_tiny("sd_unet")
    with tokenmerge.apply(case.target, configs[config]):
        sdpa = case.run()
        case.denoiser.set_attn_processor(AttnProcessor())  # swapped after apply: the hooks stay in force
        classic = case.run()
    torch.testing.assert_close(classic, sdpa, rtol=1e-4, atol=1e-5)
    case.denoiser.set_default_attn_processor()
    assert not torch.equal(case.run(), sdpa)


def test_hooks_compose_with_fused_qkv_projections(diffusers_tiny):
    case = diffusers_tiny("sd_unet")
    config = tokenmerge.ToMeSD(ratio=0.5, seed=0, merge_crossattn=True, merge_mlp=True, max_downsample=2)
    with tokenmerge.apply(case.target, config):
        separate = case.run()
    case.denoiser.fuse_qkv_projections()
    with tokenmerge.apply(case.target, config):
        fused = case.run()
    torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-5)


def test_todo_refuses_fused_self_attention(diffusers_tiny):
    case = diffusers_tiny("sd_unet")
    case.denoiser.fuse_qkv_projections()
    with pytest.raises(TokenMergeError, match="unfuse_qkv_projections"):
        tokenmerge.apply(case.target, tokenmerge.ToDo())
    assert hooks_on(case.denoiser) == 0

    case = diffusers_tiny("sd_unet")
    with tokenmerge.apply(case.target, tokenmerge.ToDo()):
        case.denoiser.fuse_qkv_projections()  # fused after apply: refused when it runs
        with pytest.raises(TokenMergeError, match="unfuse_qkv_projections"):
            case.run()
        case.denoiser.unfuse_qkv_projections()
        assert torch.isfinite(case.run()).all()


def test_chunked_feed_forward_runs_unmerged_and_correct(diffusers_tiny):
    """With forward chunking the feed-forward sees chunks of tokens, never the whole merged set.

    The chunks (128 of the 256 top-level tokens) are as long as the merged sequence would be;
    they are left alone rather than mistaken for merged tokens and "unmerged".
    """
    case = diffusers_tiny("sd_unet")
    top_level = [site.block for site in describe_denoiser(case.denoiser).sites if site.level == 0]
    for block in top_level:
        block.set_chunk_feed_forward(128, dim=1)
    plain = case.run()
    with tokenmerge.apply(case.target, tokenmerge.ToMeSD(ratio=0.5, merge_attn=False, merge_mlp=True)) as handle:
        merged = case.run()
        assert handle.state.merged_tokens["down_blocks.0.attentions.0.transformer_blocks.0"] == (256, 128)
    assert torch.equal(merged, plain)
