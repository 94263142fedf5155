"""Tiny random-weight diffusers models and pipelines, built from configs (no hub download).

They have the structure of the real ones (SD 1.x/2.x and SDXL UNets, DiT, PixArt-α) at a
few hundred thousand parameters, so the tests, the examples' ``--tiny`` path and
`tokenmerge demo` run in milliseconds on a CPU. Text encoders and tokenizers are left
out: pass ``prompt_embeds`` (see `tiny_prompt_embeds`) or class labels instead of prompts.

Every model builder takes a ``seed``, an ``init`` (`INITS`) and keyword overrides of the
model's config, so one builder serves the tests (the defaults) and the demo (wider
models with the library's own initialisation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)

from ..errors import check
from .common import seeded

__all__ = [
    "INITS",
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
    "tiny_flux",
    "tiny_flux_pipeline",
    "flux_inputs",
    "tiny_sd3",
    "tiny_sd3_pipeline",
    "JOINT_TEXT_DIM",
    "FLUX_POOLED_DIM",
    "SD3_POOLED_DIM",
    "tiny_wan",
    "tiny_wan_pipeline",
    "tiny_qwen_image",
    "qwen_image_inputs",
    "tiny_qwen_image_pipeline",
    "tiny_cogvideox",
    "cogvideox_inputs",
    "tiny_cogvideox_pipeline",
    "tiny_hunyuan_video",
    "hunyuan_video_inputs",
    "tiny_hunyuan_video_pipeline",
    "tiny_flux2",
    "flux2_inputs",
]

#: How a builder initialises the weights: ``"normal"``, every parameter drawn from
#: N(0, 0.2²) with a generator seeded by ``seed`` (the tests' default: zero-initialised
#: layers get values too); ``"default"``, diffusers' own initialisation under ``seed``,
#: with the weights it sets to zero (DiT's adaLN-Zero, output layers) drawn from
#: N(0, 0.02²), so a random-weight model does not compute a constant.
INITS: tuple[str, ...] = ("normal", "default")
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


def _wake_zero_init(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Give small random values (global RNG) to the weights initialised to zero."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, std)
    return model


_Model = TypeVar("_Model", bound=torch.nn.Module)


def _build(factory: Callable[..., _Model], config: dict[str, Any], seed: int, init: str) -> _Model:
    """``factory(**config)`` in eval mode, its weights initialised by ``init`` (see `INITS`) from ``seed``."""
    check(init in INITS, f"init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "normal":
        return _randomize(factory(**config), seed)
    with seeded(seed):
        return _wake_zero_init(factory(**config)).eval()


def tiny_sd_unet(seed: int = 0, sample_size: int = 16, *, init: str = "normal", **config: Any) -> UNet2DConditionModel:
    """An SD 1.x-style UNet: attention at the full latent resolution and the next level, and in the mid block.

    Three levels (token grids ``H x W``, ``H/2 x W/2``, ``H/4 x W/4``): cross-attention
    down blocks at the first two, a plain block at the third, a cross-attention mid block
    there too, mirrored on the way up, like SD 1.5 one level shorter.

    Args:
        seed: seed of the weights.
        sample_size: latent side.
        init: how the weights are initialised (`INITS`).
        **config: overrides of the `UNet2DConditionModel` config (``block_out_channels``,
            ``down_block_types``, ...).
    """
    defaults: dict[str, Any] = dict(
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
    return _build(UNet2DConditionModel, {**defaults, **config}, seed, init)


def tiny_sdxl_unet(
    seed: int = 0, sample_size: int = 16, *, init: str = "normal", **config: Any
) -> UNet2DConditionModel:
    """An SDXL-style UNet: no attention at the full latent resolution, text-time added conditioning.

    Like SDXL, the first level is a plain down block; attention starts one level down,
    with two transformer layers per block at the lowest level and linear projections.
    Call it with ``added_cond_kwargs={"text_embeds": (B, POOLED_DIM), "time_ids": (B, 6)}``;
    ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    time_dim = 8
    defaults: dict[str, Any] = dict(
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
    return _build(UNet2DConditionModel, {**defaults, **config}, seed, init)


def tiny_dit(
    seed: int = 0, sample_size: int = 16, num_layers: int = 4, *, init: str = "normal", **config: Any
) -> DiTTransformer2DModel:
    """A DiT (ada_norm_zero blocks, class-conditional, learned sigma) with 2x2 patches.

    ``seed``, ``init`` and ``config`` (overrides of the `DiTTransformer2DModel` config) as
    in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return _build(DiTTransformer2DModel, {**defaults, **config}, seed, init)


def tiny_pixart(
    seed: int = 0, sample_size: int = 16, num_layers: int = 4, *, init: str = "normal", **config: Any
) -> PixArtTransformer2DModel:
    """A PixArt-α transformer (ada_norm_single blocks, cross-attention to captions) with 2x2 patches.

    ``seed``, ``init`` and ``config`` (overrides of the `PixArtTransformer2DModel` config)
    as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
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
    return _build(PixArtTransformer2DModel, {**defaults, **config}, seed, init)


def tiny_vae(seed: int = 0, levels: int = 1) -> AutoencoderKL:
    """A VAE with ``levels`` resolution levels: images are ``2**(levels - 1)`` times larger than latents."""
    config: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=8,
    )
    return _build(AutoencoderKL, config, seed, "normal")


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


# ---------------------------------------------------------------------------- MM-DiT and video families
#: Width of the tiny MM-DiTs' text embeddings (T5 features in the real models).
JOINT_TEXT_DIM = 16
#: Width of the tiny Flux's pooled text embedding (CLIP's in the real model).
FLUX_POOLED_DIM = 8


def _pipeline_without_text_models(pipeline_cls: type, **components: Any) -> Any:
    """``pipeline_cls(**components)`` on the CPU, every text encoder and tokenizer it takes set to None.

    Tiny pipelines are driven with ``prompt_embeds``, so they need neither (nothing to download).
    """
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    text_models = {name: None for name in parameters if name.startswith(("text_encoder", "tokenizer"))}
    return pipeline_cls(**text_models, **components).to("cpu")


def tiny_flux(
    seed: int = 0,
    num_layers: int = 2,
    num_single_layers: int = 2,
    *,
    guidance_embeds: bool = False,
    init: str = "normal",
    **config: Any,
) -> FluxTransformer2DModel:
    """A Flux.1 transformer: ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks.

    Takes packed latents ``(B, N, 16)`` (2x2 patches of a 4-channel latent), text
    ``(B, T, JOINT_TEXT_DIM)``, pooled text ``(B, FLUX_POOLED_DIM)``, ``img_ids``/``txt_ids``
    (see `flux_inputs`); ``guidance_embeds=True`` is Flux-dev's guidance-distilled form.
    ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    return _build(FluxTransformer2DModel, {**defaults, **config}, seed, init)


def flux_inputs(
    batch: int = 1, height: int = 8, width: int = 8, text: int = 5, seed: int = 0, guidance: float | None = None
) -> dict[str, Any]:
    """Keyword arguments of one `tiny_flux` call on a ``height x width`` token grid (packed latent).

    ``img_ids`` are ``(0, row, column)`` per token, as FluxPipeline makes them; ``txt_ids``
    are zeros; the timestep is ``t / 1000`` as the pipeline passes it.
    """
    gen = _seeded(seed)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()  # (N, 3)
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=gen),  # (B, N, C) packed
        encoder_hidden_states=torch.randn(batch, text, JOINT_TEXT_DIM, generator=gen),
        pooled_projections=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
    )
    if guidance is not None:
        inputs["guidance"] = torch.full((batch,), guidance)
    return inputs


def _vae8(seed: int, latent_channels: int = 4) -> AutoencoderKL:
    """A VAE of scale factor 8 (four levels) without shift or scaling, like the MM-DiT pipelines expect."""
    config: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    return _build(AutoencoderKL, config, seed, "normal")


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = False, **config: Any) -> FluxPipeline:
    """`FluxPipeline` around `tiny_flux`, with a VAE of scale factor 8 and no text encoders.

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)`` and ``pooled_prompt_embeds``
    ``(B, FLUX_POOLED_DIM)``, a ``height``/``width`` divisible by 16 (a 2x2-packed latent
    of ``height / 8 x width / 8``), ``output_type="latent"`` or ``"pt"``.
    """
    vae = _vae8(seed)
    return _pipeline_without_text_models(
        FluxPipeline,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        transformer=tiny_flux(seed, guidance_embeds=guidance_embeds, **config),
    )


#: Width of the tiny SD3's pooled text embedding (two CLIPs' in the real model).
SD3_POOLED_DIM = 8


def tiny_sd3(
    seed: int = 0, sample_size: int = 16, num_layers: int = 3, *, dual: bool = True, init: str = "normal", **config: Any
) -> SD3Transformer2DModel:
    """An SD3 / SD3.5 MM-DiT with 2x2 patches: joint attention with the text after the image tokens.

    ``dual=True`` gives the first block SD3.5's second, image-only self-attention
    (``attn2``) and every block RMS query/key norms; ``dual=False`` is SD3's plain form.
    Call it with a latent ``(B, 4, H, W)``, ``encoder_hidden_states`` ``(B, T,
    JOINT_TEXT_DIM)``, ``pooled_projections`` ``(B, SD3_POOLED_DIM)``, ``timestep``.
    ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=SD3_POOLED_DIM,
        pos_embed_max_size=32,
    )
    if dual:
        defaults.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    return _build(SD3Transformer2DModel, {**defaults, **config}, seed, init)


def tiny_sd3_pipeline(seed: int = 0, **config: Any) -> StableDiffusion3Pipeline:
    """`StableDiffusion3Pipeline` around `tiny_sd3`, a VAE of scale factor 8 and no text encoders.

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)`` and ``pooled_prompt_embeds``
    ``(B, SD3_POOLED_DIM)`` (and their negatives with guidance: classifier-free guidance
    runs both branches in one batched call), a ``height``/``width`` divisible by 16.
    """
    return _pipeline_without_text_models(
        StableDiffusion3Pipeline,
        transformer=tiny_sd3(seed, **config),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae8(seed),
    )


def tiny_wan(seed: int = 0, num_layers: int = 2, *, init: str = "normal", **config: Any) -> WanTransformer3DModel:
    """A Wan 2.1 video transformer: 1x2x2 patches, rotary (frame, row, column) embeddings, cross-attention to text.

    Call it with a latent ``(B, 4, F, H, W)``, ``encoder_hidden_states`` ``(B, T,
    JOINT_TEXT_DIM)`` and a ``timestep``; ``seed``, ``init`` and ``config`` as in
    `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=JOINT_TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    return _build(WanTransformer3DModel, {**defaults, **config}, seed, init)


def tiny_wan_pipeline(seed: int = 0, **config: Any) -> WanPipeline:
    """`WanPipeline` around `tiny_wan`, without VAE or text encoder (latents out).

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)`` (and
    ``negative_prompt_embeds``: classifier-free guidance runs the two branches as separate
    calls), ``num_frames = 4k + 1``, ``height``/``width`` divisible by 16 and
    ``output_type="latent"``: the latent is ``(B, 4, (num_frames - 1) / 4 + 1, height / 8,
    width / 8)``, as Wan's VAE would make it.
    """
    return _pipeline_without_text_models(
        WanPipeline,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan(seed, **config),
    )


def tiny_qwen_image(
    seed: int = 0, num_layers: int = 2, *, init: str = "normal", **config: Any
) -> QwenImageTransformer2DModel:
    """A Qwen-Image MM-DiT: packed latents ``(B, N, 16)`` (2x2 patches of 4 channels), complex rotary tables.

    See `qwen_image_inputs` for a call; ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    )
    return _build(QwenImageTransformer2DModel, {**defaults, **config}, seed, init)


def qwen_image_inputs(batch: int = 1, height: int = 8, width: int = 8, text: int = 5, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one `tiny_qwen_image` call on a ``height x width`` token grid, as the pipeline has them."""
    gen = _seeded(seed)
    return dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=gen),  # (B, N, C) packed
        encoder_hidden_states=torch.randn(batch, text, JOINT_TEXT_DIM, generator=gen),
        encoder_hidden_states_mask=torch.ones(batch, text, dtype=torch.long),
        timestep=torch.full((batch,), 0.5),  # t / 1000
        img_shapes=[[(1, height, width)]] * batch,
    )


def tiny_qwen_image_pipeline(seed: int = 0, **config: Any) -> QwenImagePipeline:
    """`QwenImagePipeline` around `tiny_qwen_image`, without VAE or text encoder (packed latents out).

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)`` and ``prompt_embeds_mask``
    (and the negatives with ``true_cfg_scale`` > 1: the two branches run as separate
    calls), a ``height``/``width`` divisible by 16 and ``output_type="latent"``.
    """
    return _pipeline_without_text_models(
        QwenImagePipeline,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        transformer=tiny_qwen_image(seed, **config),
    )


def tiny_cogvideox(
    seed: int = 0, num_layers: int = 2, *, rotary: bool = True, init: str = "normal", **config: Any
) -> CogVideoXTransformer3DModel:
    """A CogVideoX video MM-DiT (5B-style rotary embeddings; ``rotary=False``: 2B's sin-cos positions).

    Latents ``(B, F, 4, H, W)`` with 2x2 patches; see `cogvideox_inputs` for a call.
    ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=JOINT_TEXT_DIM,
        num_layers=num_layers,
        sample_width=6,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=5,
        use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=False,
    )
    return _build(CogVideoXTransformer3DModel, {**defaults, **config}, seed, init)


def cogvideox_inputs(
    batch: int = 1, frames: int = 3, height: int = 8, width: int = 6, text: int = 5, seed: int = 0, rotary: bool = True
) -> dict[str, Any]:
    """Keyword arguments of one `tiny_cogvideox` call: a latent ``(B, frames, 4, height, width)`` and its rotary tables.

    The tables are CogVideoXPipeline's (``get_3d_rotary_pos_embed`` over the token grid).
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    gen = _seeded(seed)
    inputs: dict[str, Any] = dict(
        hidden_states=torch.randn(batch, frames, 4, height, width, generator=gen),
        encoder_hidden_states=torch.randn(batch, text, JOINT_TEXT_DIM, generator=gen),
        timestep=torch.full((batch,), 500),
    )
    if rotary:
        grid = (height // 2, width // 2)
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=((0, 0), grid), grid_size=grid, temporal_size=frames
        )
    return inputs


def tiny_cogvideox_pipeline(seed: int = 0, **config: Any) -> CogVideoXPipeline:
    """`CogVideoXPipeline` around `tiny_cogvideox`, without VAE or text encoder (latents out).

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)`` (and ``negative_prompt_embeds``:
    classifier-free guidance batches both branches), ``num_frames = 4k + 1``,
    ``height``/``width`` divisible by 16 and ``output_type="latent"``.
    """
    return _pipeline_without_text_models(
        CogVideoXPipeline,
        vae=None,
        transformer=tiny_cogvideox(seed, **config),
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),
    )


def tiny_hunyuan_video(
    seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, *, init: str = "normal", **config: Any
) -> HunyuanVideoTransformer3DModel:
    """A HunyuanVideo transformer: double- then single-stream blocks, [video | text], 1x2x2 patches.

    See `hunyuan_video_inputs` for a call; ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=JOINT_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    return _build(HunyuanVideoTransformer3DModel, {**defaults, **config}, seed, init)


def hunyuan_video_inputs(
    batch: int = 1, frames: int = 3, height: int = 8, width: int = 6, text: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments of one `tiny_hunyuan_video` call: a latent ``(B, 4, frames, height, width)``, text, guidance.

    The last text token of the first sample is padding (``encoder_attention_mask`` 0), as
    prompts shorter than the text length are.
    """
    gen = _seeded(seed)
    mask = torch.ones(batch, text, dtype=torch.long)
    mask[0, -1] = 0
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=gen),
        encoder_hidden_states=torch.randn(batch, text, JOINT_TEXT_DIM, generator=gen),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
        timestep=torch.full((batch,), 500),
        guidance=torch.full((batch,), 6000.0),
    )


def tiny_hunyuan_video_pipeline(seed: int = 0, **config: Any) -> HunyuanVideoPipeline:
    """`HunyuanVideoPipeline` around `tiny_hunyuan_video`, without VAE or text encoders (latents out).

    Call it with ``prompt_embeds`` ``(B, T, JOINT_TEXT_DIM)``, ``pooled_prompt_embeds``
    ``(B, FLUX_POOLED_DIM)`` and ``prompt_attention_mask`` ``(B, T)``; guidance is
    distilled (one call per step); ``num_frames = 4k + 1``, ``height``/``width`` divisible
    by 16, ``output_type="latent"``.
    """
    return _pipeline_without_text_models(
        HunyuanVideoPipeline,
        transformer=tiny_hunyuan_video(seed, **config),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def tiny_flux2(
    seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, *, init: str = "normal", **config: Any
) -> Flux2Transformer2DModel:
    """A Flux.2 transformer: double-stream blocks, then parallel single-stream blocks on ``[text | image]``.

    See `flux2_inputs` for a call; ``seed``, ``init`` and ``config`` as in `tiny_sd_unet`.
    """
    defaults: dict[str, Any] = dict(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT_TEXT_DIM,
        timestep_guidance_channels=8,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    )
    return _build(Flux2Transformer2DModel, {**defaults, **config}, seed, init)


def flux2_inputs(batch: int = 1, height: int = 8, width: int = 8, text: int = 5, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one `tiny_flux2` call: packed latent, text, ``(t, h, w, l)`` position ids, guidance."""
    gen = _seeded(seed)
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=gen),  # (B, N, C) packed
        encoder_hidden_states=torch.randn(batch, text, JOINT_TEXT_DIM, generator=gen),
        timestep=torch.full((batch,), 0.5),  # t / 1000
        img_ids=grid.expand(batch, -1, -1),  # (B, N, 4)
        txt_ids=text_ids.expand(batch, -1, -1),  # (B, T, 4)
        guidance=torch.full((batch,), 4.0),
    )
