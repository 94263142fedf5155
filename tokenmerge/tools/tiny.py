"""Tiny random-weight diffusers models and pipelines, built from configs (no hub download).

They have the structure of the real ones (SD 1.x/2.x and SDXL UNets, DiT, PixArt-α) at a
few hundred thousand parameters, so the tests, the examples' ``--tiny`` path and demos run
in milliseconds on a CPU. Text encoders and tokenizers are left out: pass
``prompt_embeds`` (see `tiny_prompt_embeds`) or class labels instead of prompts.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

__all__ = [
    "TEXT_DIM",
    "POOLED_DIM",
    "CAPTION_DIM",
    "tiny_sd_unet",
    "tiny_sdxl_unet",
    "tiny_dit",
    "tiny_pixart",
    "tiny_vae",
    "tiny_sd_pipeline",
    "tiny_sd_img2img_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_dit_pipeline",
    "tiny_pixart_pipeline",
    "tiny_prompt_embeds",
]

#: Width of the text embeddings the tiny UNets cross-attend to.
TEXT_DIM = 32
#: Width of the tiny SDXL UNet's pooled text embedding.
POOLED_DIM = 32
#: Width of the tiny PixArt's caption embeddings (T5 features in the real model).
CAPTION_DIM = 32


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddim() -> DDIMScheduler:
    """DDIM configured like the Stable Diffusion checkpoints (no deprecation warnings)."""
    return DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter small random values from ``seed`` (zero-initialised layers included)."""
    gen = _seeded(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def tiny_sd_unet(seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """An SD 1.x-style UNet: attention at the full latent resolution and the next level, and in the mid block.

    Three levels (token grids ``H x W``, ``H/2 x W/2``, ``H/4 x W/4``): cross-attention
    down blocks at the first two, a plain block at the third, a cross-attention mid block
    there too, mirrored on the way up, like SD 1.5 one level shorter.
    """
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return _randomize(unet, seed)


def tiny_sdxl_unet(seed: int = 0, sample_size: int = 16) -> UNet2DConditionModel:
    """An SDXL-style UNet: no attention at the full latent resolution, text-time added conditioning.

    Like SDXL, the first level is a plain down block; attention starts one level down,
    with two transformer layers per block at the lowest level and linear projections.
    Call it with ``added_cond_kwargs={"text_embeds": (B, POOLED_DIM), "time_ids": (B, 6)}``.
    """
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + POOLED_DIM,
    )
    return _randomize(unet, seed)


def tiny_dit(seed: int = 0, sample_size: int = 16, num_layers: int = 4) -> DiTTransformer2DModel:
    """A DiT (ada_norm_zero blocks, class-conditional, learned sigma) with 2x2 patches."""
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return _randomize(model, seed)


def tiny_pixart(seed: int = 0, sample_size: int = 16, num_layers: int = 4) -> PixArtTransformer2DModel:
    """A PixArt-α transformer (ada_norm_single blocks, cross-attention to captions) with 2x2 patches."""
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        caption_channels=CAPTION_DIM,
        sample_size=sample_size,
        patch_size=2,
        norm_type="ada_norm_single",
    )
    return _randomize(model, seed)


def tiny_vae(seed: int = 0, levels: int = 1) -> AutoencoderKL:
    """A VAE with ``levels`` resolution levels: images are ``2**(levels - 1)`` times larger than latents."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
    )
    return _randomize(vae, seed)


def tiny_sd_pipeline(seed: int = 0, scheduler: Any = None) -> StableDiffusionPipeline:
    """`StableDiffusionPipeline` around `tiny_sd_unet`; call it with ``prompt_embeds``."""
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=None,
        tokenizer=None,
        unet=tiny_sd_unet(seed),
        scheduler=scheduler or _ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to("cpu")


def tiny_sd_img2img_pipeline(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """`StableDiffusionImg2ImgPipeline` around `tiny_sd_unet`; call it with ``prompt_embeds`` and ``image``."""
    return StableDiffusionImg2ImgPipeline(
        vae=tiny_vae(seed),
        text_encoder=None,
        tokenizer=None,
        unet=tiny_sd_unet(seed),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to("cpu")


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """`StableDiffusionXLPipeline` around `tiny_sdxl_unet`.

    Call it with ``prompt_embeds``, ``pooled_prompt_embeds`` and (with guidance) their
    negative counterparts.
    """
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=tiny_sdxl_unet(seed),
        scheduler=_ddim(),
        add_watermarker=False,
    ).to("cpu")


def tiny_dit_pipeline(seed: int = 0, num_layers: int = 4) -> DiTPipeline:
    """`DiTPipeline` around `tiny_dit`; call it with ``class_labels``."""
    return DiTPipeline(transformer=tiny_dit(seed, num_layers=num_layers), vae=tiny_vae(seed), scheduler=_ddim()).to(
        "cpu"
    )


def tiny_pixart_pipeline(seed: int = 0, num_layers: int = 4) -> PixArtAlphaPipeline:
    """`PixArtAlphaPipeline` around `tiny_pixart`, with a VAE of scale factor 8 like the real one.

    The pipeline requires image sizes divisible by 8; the scale factor 8 lets latents of
    any size through (``height = 8 * latent_height``). Call it with ``prompt_embeds`` and
    ``prompt_attention_mask`` (and the negative ones with guidance),
    ``use_resolution_binning=False`` and an explicit ``height``/``width``.
    """
    return PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(seed, levels=4),
        transformer=tiny_pixart(seed, num_layers=num_layers),
        scheduler=DPMSolverMultistepScheduler(steps_offset=1),
    ).to("cpu")


def tiny_prompt_embeds(batch: int = 1, tokens: int = 7, dim: int = TEXT_DIM, seed: int = 0) -> torch.Tensor:
    """Random text embeddings ``(batch, tokens, dim)`` standing in for a text encoder's output."""
    return torch.randn(batch, tokens, dim, generator=_seeded(seed))
