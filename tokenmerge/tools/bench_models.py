"""The architectures `tokenmerge bench` builds, and the inputs it feeds them.

Every built-in architecture is typed in here from its public model config and built
with random weights (speed does not depend on the weights; nothing is downloaded).
``*-tiny`` variants keep the structure at a few hundred thousand parameters, for CPU
runs and CI. Local weights can replace the random ones (`load_weights`).

A `Workload` is one model with fixed, seeded inputs: `Workload.step` runs one
denoising step (one batch for a ViT) at the k-th timestep of a schedule, and
`Workload.sample` runs a short sampling loop for the fidelity figures.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TokenMergeError
from .common import seeded

__all__ = [
    "ArchSpec",
    "VISION_FAMILIES",
    "ARCHS",
    "INPUT_KINDS",
    "arch_names",
    "get_arch",
    "build_model",
    "load_weights",
    "smooth_noise",
    "video_size",
    "pack_flux_latents",
    "flux_image_ids",
    "Workload",
]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture the benchmark can build.

    Attributes:
        name: the name on the command line (``sd15``, ``dit-xl-2-tiny``, ...).
        family: ``"unet"``, ``"dit"``, ``"pixart"``, ``"flux"``, ``"sd3"``, ``"wan"``, ``"vit"``
            (timm: ViT, EVA) or ``"hf-vit"`` (transformers' ``ViTModel``); picks the builder and
            the inputs.
        source: where the config comes from (shown in reports).
        config: keyword arguments of the model class (diffusers) or of ``timm.create_model``.
        resolution: default image size in pixels (the height for ``wan``; its ``extra`` holds
            the width and the frame count).
        batch: default batch of the denoiser (2 = one prompt with classifier-free guidance).
        extra: family-specific input sizes (text tokens, caption width, ...).
    """

    name: str
    family: str
    source: str
    config: dict[str, Any]
    resolution: int
    batch: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def diffusion(self) -> bool:
        """True for denoisers (timed per denoising step; fidelity includes a sampling loop)."""
        return self.family not in VISION_FAMILIES


#: The families that are image encoders, not denoisers: one call per input, no sampling loop.
VISION_FAMILIES: tuple[str, ...] = ("vit", "hf-vit")


_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_SD2 = {
    **_SD15,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": True,
}
_SDXL = {
    **_SD15,
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_TINY_UNET = {
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
_DIT_XL2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
_PIXART_ALPHA = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "use_additional_conditions": True,
    "interpolation_scale": 2,
}
_TINY_DIT = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 4, "norm_num_groups": 8}
# FLUX.1-dev: 19 double-stream (MM-DiT) blocks and 38 single-stream blocks of width 3072;
# 16-channel latents packed 2x2 into 64 channels, so 1024 px is a 64x64 grid of 4096 tokens.
_FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
_TINY_FLUX = {
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "axes_dims_rope": (4, 6, 6),
}
# SD3.5 Medium (MMDiT-X): 24 joint blocks, the first 13 with a second image-only attention.
_SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
_TINY_SD35 = {
    "sample_size": 16,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 16,
    "pos_embed_max_size": 32,
    "dual_attention_layers": (0,),
}
# Wan 2.1 T2V 1.3B: 30 blocks of width 1536 (12 heads of 128); patch (1, 2, 2) over the
# VAE's 4x-in-time, 8x-in-space latents: 81 frames at 480x832 px are 21x30x52 = 32760 tokens.
_WAN_13B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
_TINY_WAN = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 16,
    "ffn_dim": 48,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}


def _spec(*args: Any, **kwargs: Any) -> tuple[str, ArchSpec]:
    spec = ArchSpec(*args, **kwargs)
    return spec.name, spec


#: The built-in architectures by name.
ARCHS: dict[str, ArchSpec] = dict(
    [
        _spec("sd15", "unet", "runwayml/stable-diffusion-v1-5 unet/config.json", _SD15, 512, 2, {"text": (77, 768)}),
        _spec("sd2", "unet", "stabilityai/stable-diffusion-2-1 unet/config.json", _SD2, 768, 2, {"text": (77, 1024)}),
        _spec(
            "sdxl",
            "unet",
            "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
            _SDXL,
            1024,
            2,
            {"text": (77, 2048), "pooled": 1280},
        ),
        _spec("dit-xl-2", "dit", "facebook/DiT-XL-2-512 transformer/config.json", _DIT_XL2, 512, 8),
        _spec(
            "pixart-alpha",
            "pixart",
            "PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json",
            _PIXART_ALPHA,
            1024,
            2,
            {"text": (120, 4096)},
        ),
        _spec(
            "flux-dev",
            "flux",
            "black-forest-labs/FLUX.1-dev transformer/config.json",
            _FLUX_DEV,
            1024,
            1,  # guidance-distilled: one call per step, no classifier-free batch
            {"text": (512, 4096), "latent_channels": 16, "guidance": 3.5},
        ),
        _spec(
            "sd35-medium",
            "sd3",
            "stabilityai/stable-diffusion-3.5-medium transformer/config.json",
            _SD35_MEDIUM,
            1024,
            2,
            {"text": (333, 4096)},  # 77 CLIP + 256 T5 tokens, as the pipeline joins them
        ),
        _spec(
            "wan-1.3b",
            "wan",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json",
            _WAN_13B,
            480,
            1,  # the pipeline calls the conditional and unconditional passes apart
            {"text": (512, 4096), "width": 832, "frames": 81},
        ),
        _spec("vit-b16", "vit", "timm vit_base_patch16_224", {"model_name": "vit_base_patch16_224"}, 224, 256),
        _spec("vit-l16", "vit", "timm vit_large_patch16_224", {"model_name": "vit_large_patch16_224"}, 224, 256),
        _spec("eva02-b14", "vit", "timm eva02_base_patch14_224", {"model_name": "eva02_base_patch14_224"}, 224, 256),
        _spec("hf-vit-b16", "hf-vit", "transformers ViTConfig() (google/vit-base-patch16-224 sizes)", {}, 224, 256),
        _spec("sd15-tiny", "unet", "sd15 structure, tiny widths", {**_SD15, **_TINY_UNET}, 128, 2, {"text": (7, 32)}),
        _spec(
            "sdxl-tiny",
            "unet",
            "sdxl structure, tiny widths",
            {
                **_SDXL,
                **_TINY_UNET,
                "block_out_channels": (32, 64, 64),
                "transformer_layers_per_block": (1, 1, 2),
                "attention_head_dim": (4, 8, 8),
                "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 80,
            },
            128,
            2,
            {"text": (7, 32), "pooled": 32},
        ),
        _spec("dit-xl-2-tiny", "dit", "dit-xl-2 structure, tiny widths", {**_DIT_XL2, **_TINY_DIT}, 128, 2),
        _spec(
            "pixart-alpha-tiny",
            "pixart",
            "pixart-alpha structure, tiny widths",
            # widths divisible by 3: the resolution/aspect-ratio embeddings take a third each
            {**_PIXART_ALPHA, **_TINY_DIT, "attention_head_dim": 24, "cross_attention_dim": 48, "caption_channels": 32},
            128,
            2,
            {"text": (7, 32)},
        ),
        _spec(
            "flux-dev-tiny",
            "flux",
            "flux-dev structure, tiny widths",
            {**_FLUX_DEV, **_TINY_FLUX},
            128,
            1,
            {"text": (7, 32), "latent_channels": 16, "guidance": 3.5},
        ),
        _spec(
            "sd35-medium-tiny",
            "sd3",
            "sd35-medium structure, tiny widths",
            {**_SD35_MEDIUM, **_TINY_SD35},
            128,
            2,
            {"text": (7, 32)},
        ),
        _spec(
            "wan-1.3b-tiny",
            "wan",
            "wan-1.3b structure, tiny widths",
            {**_WAN_13B, **_TINY_WAN},
            64,
            1,
            {"text": (7, 32), "width": 96, "frames": 5},
        ),
        _spec(
            "vit-tiny",
            "vit",
            "timm VisionTransformer, tiny widths",
            {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 10},
            64,
            4,
        ),
    ]
)


def arch_names() -> list[str]:
    """Names of the built-in architectures."""
    return list(ARCHS)


def get_arch(name: str | ArchSpec) -> ArchSpec:
    """The `ArchSpec` called ``name`` (an `ArchSpec` as is); `TokenMergeError` listing the names otherwise."""
    if isinstance(name, ArchSpec):
        return name
    spec = ARCHS.get(str(name).lower())
    if spec is None:
        raise TokenMergeError(f"arch must be one of {', '.join(ARCHS)}; got {name!r}")
    return spec


# ---------------------------------------------------------------------- building
def _build_unet(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**spec.config)


def _build_dit(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**{**spec.config, "sample_size": resolution // 8})


def _build_pixart(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**{**spec.config, "sample_size": resolution // 8})


def _build_flux(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**spec.config)


def _build_sd3(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**spec.config)


def _build_wan(spec: ArchSpec, resolution: int) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**spec.config)


def _build_vit(spec: ArchSpec, resolution: int) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    config = dict(spec.config)
    name = config.pop("model_name", None)
    if name is None:
        return VisionTransformer(**{**config, "img_size": resolution})
    return timm.create_model(name, pretrained=False, img_size=resolution, **config)


def _build_hf_vit(spec: ArchSpec, resolution: int) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(**{**spec.config, "image_size": resolution})
    config._attn_implementation = spec.extra.get("attention", "sdpa")  # the default of from_pretrained
    return transformers.ViTModel(config)


_BUILDERS: dict[str, Callable[[ArchSpec, int], nn.Module]] = {
    "unet": _build_unet,
    "dit": _build_dit,
    "pixart": _build_pixart,
    "flux": _build_flux,
    "sd3": _build_sd3,
    "wan": _build_wan,
    "vit": _build_vit,
    "hf-vit": _build_hf_vit,
}


def build_model(
    spec: ArchSpec,
    resolution: int | None = None,
    weights: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build ``spec`` in eval mode with random weights drawn from ``seed`` (or ``weights`` loaded).

    Parameters are created and initialised directly on ``device`` (fast for the
    billion-parameter UNets), then cast to ``dtype``. The global RNG is left as it was.
    """
    resolution = resolution or spec.resolution
    check_resolution(spec, resolution)
    device = torch.device(device)
    with seeded(seed, device):
        with device:
            model = _BUILDERS[spec.family](spec, resolution)
    if weights is not None:
        load_weights(model, weights)
    with _quiet_diffusers():  # its note on keeping modules in fp32 concerns from_pretrained only
        model = model.to(device=device, dtype=dtype)  # also moves buffers a builder made on the CPU
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: Resolutions must be a multiple of this (64 where none is listed: the UNets' three downsamplings).
_RESOLUTION_MULTIPLE = {"vit": 16, "hf-vit": 16, "flux": 16, "sd3": 16, "wan": 16}


def check_resolution(spec: ArchSpec, resolution: int) -> None:
    """Reject a resolution the architecture cannot take."""
    multiple = _RESOLUTION_MULTIPLE.get(spec.family, 64)
    if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise TokenMergeError(
            f"resolution for {spec.name} must be a positive multiple of {multiple}; got {resolution!r}"
        )


def load_weights(model: nn.Module, path: str) -> None:
    """Load local weights into ``model``: a ``.safetensors``/``.bin``/``.pt(h)`` state dict, or a
    diffusers model folder (its ``diffusion_pytorch_model.safetensors``; a pipeline folder's
    ``unet``/``transformer`` sub-folder is found too). Nothing is downloaded."""
    if os.path.isdir(path):
        for sub in ("", "unet", "transformer"):
            for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin"):
                candidate = os.path.join(path, sub, name)
                if os.path.isfile(candidate):
                    return load_weights(model, candidate)
        raise TokenMergeError(f"weights folder {path!r} holds no diffusion_pytorch_model.safetensors or model file")
    if not os.path.isfile(path):
        raise TokenMergeError(f"weights must be a local file or folder; {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict) if isinstance(state_dict, dict) else state_dict
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing:
        raise TokenMergeError(
            f"weights in {path!r} do not fit the architecture: {len(missing)} missing keys, e.g. {missing[:3]}"
        )
    del unexpected  # extra keys (EMA copies, heads) are ignored


# ---------------------------------------------------------------------- inputs
def _timesteps(count: int, device: torch.device, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """``count`` evenly spaced timesteps from 999 down (DDIM-like), each a 0-d tensor on ``device``."""
    values = torch.linspace(999, 0, count + 1)[:-1].round()
    return [v.to(device=device, dtype=dtype) for v in values]


class Workload:
    """A model with fixed seeded inputs: one denoising step, or one ViT batch.

    Args:
        spec: the architecture.
        model: the model (already on ``device`` in ``dtype``).
        batch: denoiser batch (images for a ViT).
        resolution: image size in pixels.
        device, dtype: where and how the inputs are made.
        seed: seed of the inputs.
        schedule: number of timesteps in the timing cycle (diffusion).
        inputs: ``"noise"`` (i.i.d. Gaussian latents or images) or ``"smooth"``
            (`smooth_noise`: Gaussian noise drawn at 1/8 of the size and upsampled,
            so neighbouring tokens are alike, as in the latents of a real image).
            Fixed-ratio methods take the same time on either; a similarity threshold
            merges almost nothing on random weights fed i.i.d. noise and about as much
            as on trained weights fed smooth inputs (the ``merged`` column shows it).
    """

    def __init__(
        self,
        spec: ArchSpec,
        model: nn.Module,
        batch: int,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        schedule: int = 50,
        inputs: str = "noise",
    ) -> None:
        if inputs not in INPUT_KINDS:
            raise TokenMergeError(f"inputs must be one of {INPUT_KINDS}; got {inputs!r}")
        self.spec, self.model, self.batch, self.resolution = spec, model, batch, resolution
        self.device, self.dtype = device, dtype
        gen = torch.Generator().manual_seed(seed)
        self.inputs = _INPUTS[spec.family](spec, model, batch, resolution, gen)
        if inputs == "smooth":
            pack = _PACKED.get(spec.family)
            if pack is None:
                self.inputs["latents"] = smooth_noise(self.inputs["latents"].shape, gen)
            else:  # smooth in the latent grid, then packed as the family's pipeline packs it
                self.inputs["latents"] = pack(smooth_noise(_grid_shape(spec, batch, resolution), gen))
        self.inputs = {k: _to(v, device, dtype) for k, v in self.inputs.items()}
        self.timesteps = _timesteps(schedule, device) if spec.diffusion else [torch.zeros((), device=device)]

    @property
    def cycle(self) -> int:
        """Length of the timing cycle (the schedule; 1 for a ViT)."""
        return len(self.timesteps)

    def fewer_tokens(self, fraction: float) -> Workload:
        """The same workload with ``fraction`` of the image-token grid's rows left out.

        Text, timesteps and every other input stay as they are (Flux's image position ids
        are cut with its tokens). Running the denoiser on it is the zero-overhead ideal of
        a merge that removes ``fraction`` of the image tokens before the first block and
        restores them after the last: no matching, no merge, no unmerge. Whole rows of the
        patch grid are left out (``round(rows * (1 - fraction))`` kept, at least one), so
        the model's own position embeddings still apply.

        Raises:
            TokenMergeError: ``fraction`` not in ``[0, 1)``, or a family whose latents are
                not an image-token grid (UNets, ViTs).
        """
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
            raise TokenMergeError(f"fraction must be a number in [0, 1); got {fraction!r}")
        family = self.spec.family
        if family not in _TOKEN_ROWS:
            raise TokenMergeError(f"fewer_tokens takes a patch transformer ({', '.join(_TOKEN_ROWS)}); got {family!r}")
        copy = object.__new__(Workload)
        copy.__dict__.update(self.__dict__)
        copy.inputs = _TOKEN_ROWS[family](self, dict(self.inputs), fraction)
        return copy

    def step(self, fn: Callable[..., Any], index: int = 0) -> Tensor:
        """Run ``fn`` (the model, or a compiled or patched version of it) at the ``index``-th timestep."""
        t = self.timesteps[index % len(self.timesteps)]
        return _CALLS[self.spec.family](fn, self.inputs, t, self.batch)

    def sample(self, fn: Callable[..., Any], steps: int, seed: int = 0) -> Tensor:
        """A DDIM sampling loop of ``steps`` steps from seeded noise; returns the final latents (fp32).

        The conditioning is the workload's; no guidance. Learned-variance outputs (DiT,
        PixArt) keep their noise prediction only.
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(steps, device=self.device)
        latents = self.inputs["latents"]
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(latents.shape, generator=gen).to(self.device, self.dtype)
        for t in scheduler.timesteps:
            eps = _CALLS[self.spec.family](fn, {**self.inputs, "latents": x}, t, self.batch)
            eps = eps[:, : x.shape[1]]
            x = scheduler.step(eps, t, x).prev_sample.to(self.dtype)
        return x.float()


#: What `Workload` can feed the model: i.i.d. noise, or noise smooth over space.
INPUT_KINDS: tuple[str, ...] = ("noise", "smooth")


def smooth_noise(shape: Sequence[int], gen: torch.Generator, factor: int = 8) -> Tensor:
    """Gaussian noise that is smooth over space: drawn at ``1/factor`` of the size, upsampled.

    Args:
        shape: ``(B, C, H, W)`` of the result, or ``(B, C, T, H, W)`` for video latents
            (smooth over time too).
        gen: the generator to draw from.
        factor: how much smaller the drawn noise is (at least 1 pixel per side).

    Returns:
        float32 of ``shape`` with zero mean and unit standard deviation per sample and
        channel; neighbouring positions are strongly correlated.
    """
    batch, channels, *size = shape
    if len(size) not in (2, 3):
        raise TokenMergeError(f"shape must be (B, C, H, W) or (B, C, T, H, W); got {tuple(shape)}")
    coarse = torch.randn(batch, channels, *(max(n // factor, 1) for n in size), generator=gen)
    mode = "bicubic" if len(size) == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=tuple(size), mode=mode, align_corners=False)
    dims = tuple(range(2, field.dim()))
    field = field - field.mean(dim=dims, keepdim=True)  # (B, C, *size)
    return field / field.std(dim=dims, keepdim=True).clamp_min(1e-6)


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen)


def _unet_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    tokens, width = spec.extra["text"]
    inputs: dict[str, Any] = {
        "latents": _randn(gen, batch, model.config.in_channels, res // 8, res // 8),
        "text": _randn(gen, batch, tokens, width),
    }
    if "pooled" in spec.extra:
        size = torch.tensor([res, res, 0, 0, res, res], dtype=torch.float32)
        inputs["added"] = {"text_embeds": _randn(gen, batch, spec.extra["pooled"]), "time_ids": size.repeat(batch, 1)}
    return inputs


def _dit_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    return {
        "latents": _randn(gen, batch, model.config.in_channels, res // 8, res // 8),
        "labels": torch.randint(0, 1000, (batch,), generator=gen),
    }


def _pixart_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    tokens, width = spec.extra["text"]
    inputs: dict[str, Any] = {
        "latents": _randn(gen, batch, model.config.in_channels, res // 8, res // 8),
        "text": _randn(gen, batch, tokens, width),
    }
    if model.config.use_additional_conditions:
        inputs["added"] = {
            "resolution": torch.tensor([[float(res), float(res)]]).repeat(batch, 1),
            "aspect_ratio": torch.ones(batch, 1),
        }
    return inputs


def video_size(spec: ArchSpec, resolution: int) -> tuple[int, int, int]:
    """``(frames, height, width)`` in pixels of a video architecture at ``resolution`` (its height).

    The width keeps the architecture's aspect ratio, rounded to a multiple of 16.
    """
    width = max(16, round(spec.extra["width"] * resolution / spec.resolution / 16) * 16)
    return spec.extra["frames"], resolution, width


def _grid_shape(spec: ArchSpec, batch: int, res: int) -> tuple[int, ...]:
    """The unpacked latent shape of a ``flux`` or ``wan`` workload: ``(B, C, H, W)`` or ``(B, C, T, H, W)``."""
    if spec.family == "flux":
        return (batch, spec.extra["latent_channels"], res // 8, res // 8)
    frames, height, width = video_size(spec, res)
    return (batch, spec.config["in_channels"], (frames - 1) // 4 + 1, height // 8, width // 8)


def pack_flux_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents as Flux takes them: 2x2 patches, ``(B, H/2 * W/2, 4C)`` (as `FluxPipeline`)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)  # (B, N, 4C)


def flux_image_ids(height: int, width: int) -> Tensor:
    """``(H * W, 3)`` rotary position ids of a Flux image grid: ``(0, row, column)`` (as `FluxPipeline`)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()  # (H*W, 3)


_PACKED: dict[str, Callable[[Tensor], Tensor]] = {"flux": pack_flux_latents, "wan": lambda latents: latents}


def _flux_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    tokens, width = spec.extra["text"]
    grid = res // 16  # VAE 8x, then 2x2 packing
    return {
        "latents": pack_flux_latents(_randn(gen, *_grid_shape(spec, batch, res))),  # (B, grid^2, 64)
        "text": _randn(gen, batch, tokens, width),
        "pooled": _randn(gen, batch, model.config.pooled_projection_dim),
        "img_ids": flux_image_ids(grid, grid),
        "txt_ids": torch.zeros(tokens, 3),
        "guidance": torch.full((batch,), float(spec.extra["guidance"])),
    }


def _sd3_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    tokens, width = spec.extra["text"]
    return {
        "latents": _randn(gen, batch, model.config.in_channels, res // 8, res // 8),
        "text": _randn(gen, batch, tokens, width),
        "pooled": _randn(gen, batch, model.config.pooled_projection_dim),
    }


def _wan_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    tokens, width = spec.extra["text"]
    return {"latents": _randn(gen, *_grid_shape(spec, batch, res)), "text": _randn(gen, batch, tokens, width)}


def _vit_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    return {"latents": _randn(gen, batch, 3, res, res)}


_INPUTS: dict[str, Callable[..., dict[str, Any]]] = {
    "unet": _unet_inputs,
    "dit": _dit_inputs,
    "pixart": _pixart_inputs,
    "flux": _flux_inputs,
    "sd3": _sd3_inputs,
    "wan": _wan_inputs,
    "vit": _vit_inputs,
    "hf-vit": _vit_inputs,
}


def _kept_rows(rows: int, fraction: float, multiple: int = 1) -> int:
    """Rows of a grid of ``rows`` kept when ``fraction`` of them go, in whole ``multiple``-row patches."""
    patches = rows // multiple
    return max(1, round(patches * (1 - fraction))) * multiple


def _fewer_latent_rows(work: Workload, inputs: dict[str, Any], fraction: float) -> dict[str, Any]:
    latents = inputs["latents"]  # (B, C, H, W) or (B, C, T, H, W); patches of 2 latent rows
    keep = _kept_rows(latents.shape[-2], fraction, multiple=2)
    inputs["latents"] = latents[..., :keep, :]
    return inputs


def _fewer_flux_rows(work: Workload, inputs: dict[str, Any], fraction: float) -> dict[str, Any]:
    grid = work.resolution // 16  # square packed grid, row-major
    keep = _kept_rows(grid, fraction) * grid
    inputs["latents"] = inputs["latents"][:, :keep]  # (B, N', 64)
    inputs["img_ids"] = inputs["img_ids"][:keep]  # (N', 3)
    return inputs


_TOKEN_ROWS: dict[str, Callable[[Workload, dict[str, Any], float], dict[str, Any]]] = {
    "dit": _fewer_latent_rows,
    "pixart": _fewer_latent_rows,
    "flux": _fewer_flux_rows,
    "sd3": _fewer_latent_rows,
    "wan": _fewer_latent_rows,
}


def _call_unet(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(
        inputs["latents"],
        t,
        encoder_hidden_states=inputs["text"],
        added_cond_kwargs=inputs.get("added"),
        return_dict=False,
    )[0]


def _call_dit(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(inputs["latents"], timestep=t.expand(batch), class_labels=inputs["labels"], return_dict=False)[0]


def _call_pixart(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(
        inputs["latents"],
        encoder_hidden_states=inputs["text"],
        timestep=t.expand(batch),
        added_cond_kwargs=inputs.get("added", {"resolution": None, "aspect_ratio": None}),
        return_dict=False,
    )[0]


def _call_flux(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(
        hidden_states=inputs["latents"],
        encoder_hidden_states=inputs["text"],
        pooled_projections=inputs["pooled"],
        timestep=t.expand(batch) / 1000,  # FluxPipeline passes t / 1000; the model scales it back
        img_ids=inputs["img_ids"],
        txt_ids=inputs["txt_ids"],
        guidance=inputs["guidance"],
        return_dict=False,
    )[0]


def _call_sd3(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(
        hidden_states=inputs["latents"],
        encoder_hidden_states=inputs["text"],
        pooled_projections=inputs["pooled"],
        timestep=t.expand(batch),
        return_dict=False,
    )[0]


def _call_wan(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    latents, text = inputs["latents"], inputs["text"]
    return fn(hidden_states=latents, timestep=t.expand(batch), encoder_hidden_states=text, return_dict=False)[0]


def _call_vit(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(inputs["latents"])


def _call_hf_vit(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(pixel_values=inputs["latents"]).pooler_output  # (B, C): the class token's, never merged


_CALLS: dict[str, Callable[[Callable[..., Any], dict[str, Any], Tensor, int], Tensor]] = {
    "unet": _call_unet,
    "dit": _call_dit,
    "pixart": _call_pixart,
    "flux": _call_flux,
    "sd3": _call_sd3,
    "wan": _call_wan,
    "vit": _call_vit,
    "hf-vit": _call_hf_vit,
}
