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
    "ARCHS",
    "INPUT_KINDS",
    "arch_names",
    "get_arch",
    "build_model",
    "load_weights",
    "smooth_noise",
    "Workload",
]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture the benchmark can build.

    Attributes:
        name: the name on the command line (``sd15``, ``dit-xl-2-tiny``, ...).
        family: ``"unet"``, ``"dit"``, ``"pixart"`` or ``"vit"``; picks the input builder.
        source: where the config comes from (shown in reports).
        config: keyword arguments of the model class (diffusers) or of ``timm.create_model``.
        resolution: default image size in pixels.
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
        return self.family != "vit"


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
        _spec("vit-b16", "vit", "timm vit_base_patch16_224", {"model_name": "vit_base_patch16_224"}, 224, 256),
        _spec("vit-l16", "vit", "timm vit_large_patch16_224", {"model_name": "vit_large_patch16_224"}, 224, 256),
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


def _build_vit(spec: ArchSpec, resolution: int) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    config = dict(spec.config)
    name = config.pop("model_name", None)
    if name is None:
        return VisionTransformer(**{**config, "img_size": resolution})
    return timm.create_model(name, pretrained=False, img_size=resolution, **config)


_BUILDERS: dict[str, Callable[[ArchSpec, int], nn.Module]] = {
    "unet": _build_unet,
    "dit": _build_dit,
    "pixart": _build_pixart,
    "vit": _build_vit,
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


def check_resolution(spec: ArchSpec, resolution: int) -> None:
    """Reject a resolution the architecture cannot take."""
    multiple = 16 if spec.family == "vit" else 64
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
            self.inputs["latents"] = smooth_noise(self.inputs["latents"].shape, gen)
        self.inputs = {k: _to(v, device, dtype) for k, v in self.inputs.items()}
        self.timesteps = _timesteps(schedule, device) if spec.diffusion else [torch.zeros((), device=device)]

    @property
    def cycle(self) -> int:
        """Length of the timing cycle (the schedule; 1 for a ViT)."""
        return len(self.timesteps)

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
        shape: ``(B, C, H, W)`` of the result.
        gen: the generator to draw from.
        factor: how much smaller the drawn noise is (at least 1 pixel per side).

    Returns:
        ``(B, C, H, W)`` float32 with zero mean and unit standard deviation per sample and
        channel; neighbouring positions are strongly correlated.
    """
    batch, channels, height, width = shape
    coarse = torch.randn(batch, channels, max(height // factor, 1), max(width // factor, 1), generator=gen)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    field = field - field.mean(dim=(2, 3), keepdim=True)  # (B, C, H, W)
    return field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


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


def _vit_inputs(spec: ArchSpec, model: nn.Module, batch: int, res: int, gen: torch.Generator) -> dict[str, Any]:
    return {"latents": _randn(gen, batch, 3, res, res)}


_INPUTS: dict[str, Callable[..., dict[str, Any]]] = {
    "unet": _unet_inputs,
    "dit": _dit_inputs,
    "pixart": _pixart_inputs,
    "vit": _vit_inputs,
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


def _call_vit(fn: Callable[..., Any], inputs: dict[str, Any], t: Tensor, batch: int) -> Tensor:
    return fn(inputs["latents"])


_CALLS: dict[str, Callable[[Callable[..., Any], dict[str, Any], Tensor, int], Tensor]] = {
    "unet": _call_unet,
    "dit": _call_dit,
    "pixart": _call_pixart,
    "vit": _call_vit,
}
