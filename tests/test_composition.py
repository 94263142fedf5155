"""Merging together with what diffusers users already combine: ControlNet, LoRA, compile_repeated_blocks, CPU offload.

Tiny models built in code, on the CPU: the outputs stay finite, ``remove()`` gives the plain
outputs back bit for bit, and merging plus the other feature computes fewer FLOPs than the
feature alone.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge

pytest.importorskip("diffusers")

from diffusers import ControlNetModel, StableDiffusionControlNetPipeline  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

from tokenmerge.tools.tiny import tiny_prompt_embeds, tiny_sd_pipeline, tiny_sd_unet  # noqa: E402


def _flops(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def controlnet_pipe() -> StableDiffusionControlNetPipeline:
    base = tiny_sd_pipeline(0)
    channels = tuple(16 * 2**i for i in range(base.vae_scale_factor.bit_length()))  # downsamples like the VAE
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet).to("cpu")
    for model in (pipe.unet, pipe.controlnet):  # attention as matrix products, which the FLOP counter sees
        model.set_attn_processor(AttnProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_merging_with_a_controlnet(controlnet_pipe: StableDiffusionControlNetPipeline) -> None:
    pipe = controlnet_pipe
    side = 2 * pipe.unet.config.sample_size * pipe.vae_scale_factor  # enough tokens for merging to pay
    with torch.random.fork_rng():
        torch.manual_seed(0)
        condition = torch.rand(1, 3, side, side)  # (B, 3, H, W) a control image in [0, 1]

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        embeds = tiny_prompt_embeds(seed=0)
        out = pipe(
            prompt_embeds=embeds,
            image=condition,
            guidance_scale=1.0,
            num_inference_steps=2,
            generator=generator,
            output_type="pt",
            height=side,
            width=side,
        )
        return out.images

    with torch.no_grad():
        plain = run()
        plain_flops = _flops(run)
        with tokenmerge.apply(pipe, tokenmerge.ToMeSD(ratio=0.5, seed=0)) as handle:
            merged = run()
            merged_flops = _flops(run)
            assert handle.state.merged_tokens  # the UNet merged while the ControlNet ran beside it
        again = run()
    assert torch.isfinite(merged).all()
    assert torch.equal(again, plain)
    assert merged_flops < plain_flops


def test_merging_with_compile_repeated_blocks() -> None:
    unet = tiny_sd_unet(0).eval()
    x = torch.randn(1, 4, 16, 16)  # (B, C, H, W)
    text = tiny_prompt_embeds(seed=0)  # (B, L, D)
    t = torch.tensor([500])

    def run() -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=text).sample

    with torch.no_grad():
        plain = run()
        handle = tokenmerge.apply(unet, tokenmerge.ToMeSD(ratio=0.5, seed=0))
        eager_merged = run()
        torch._dynamo.reset()
        unet.compile_repeated_blocks(backend="eager")  # diffusers compiles each BasicTransformerBlock
        compiled_merged = run()
        handle.remove()
        torch._dynamo.reset()  # compiled blocks keep the hooks they were traced with: recompile after remove
        again = run()
    torch.testing.assert_close(compiled_merged, eager_merged, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager_merged, plain)
    assert torch.equal(again, plain)


def test_merging_with_a_lora_adapter() -> None:
    """A LoRA adapter added in code (peft) on the attention projections, then merging around it."""
    pytest.importorskip("peft")
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig

    unet = tiny_sd_unet(0, 32).eval()  # a 32 x 32 latent: 1024 tokens at the top level
    unet.set_attn_processor(AttnProcessor())  # attention as matrix products, which the FLOP counter sees
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # a LoRA that does something: its up-projections start at zero
        for name, weight in unet.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    text = tiny_prompt_embeds(seed=0)  # (B, L, D)
    t = torch.tensor([500])

    def run() -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=text).sample

    with torch.no_grad():
        plain = run()
        unet.disable_adapters()
        without_lora = run()
        unet.enable_adapters()
        lora_flops = _flops(run)
        with tokenmerge.apply(unet, tokenmerge.ToMeSD(ratio=0.5, seed=0)):
            merged = run()
            merged_flops = _flops(run)
        again = run()
    assert not torch.equal(plain, without_lora)  # the adapter is live
    assert torch.isfinite(merged).all() and not torch.equal(merged, plain)
    assert torch.equal(again, plain)
    assert merged_flops < lora_flops


def test_merging_with_model_cpu_offload() -> None:
    """accelerate's offload hooks on each model of the pipeline, merging's hooks on the transformer's blocks.

    On a machine without an accelerator diffusers refuses ``enable_model_cpu_offload()``;
    with ``device="cpu"`` it installs the same accelerate hooks, which then move nothing.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenmerge.tools.tiny import FLUX_POOLED_DIM, JOINT_TEXT_DIM, tiny_flux_pipeline

    pipe = tiny_flux_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    call = dict(
        prompt_embeds=torch.randn(1, 5, JOINT_TEXT_DIM, generator=gen),  # (B, T, D)
        pooled_prompt_embeds=torch.randn(1, FLUX_POOLED_DIM, generator=gen),  # (B, D)
        height=64,
        width=64,
        output_type="latent",
    )

    def run() -> torch.Tensor:
        return pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0), **call).images

    def flops() -> int:
        with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls the counter sees
            return _flops(run)

    with torch.no_grad():
        plain = run()
        if not torch.cuda.is_available() and not torch.backends.mps.is_available():
            with pytest.raises(RuntimeError, match="requires accelerator"):
                pipe.enable_model_cpu_offload()
        pipe.enable_model_cpu_offload(device="cpu")
        assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's hook wraps the transformer's forward
        offloaded = run()
        offloaded_flops = flops()
        with tokenmerge.apply(pipe, tokenmerge.ToMeSD(ratio=0.5, seed=0)) as handle:
            merged = run()
            merged_flops = flops()
            assert handle.state.merged_tokens
        again = run()
        pipe.remove_all_hooks()
        after = run()
    assert torch.equal(offloaded, plain)
    assert torch.isfinite(merged).all() and not torch.equal(merged, plain)
    assert merged_flops < offloaded_flops
    assert torch.equal(again, offloaded)
    assert torch.equal(after, plain)
