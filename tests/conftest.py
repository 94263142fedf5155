"""Shared fixtures. Tiny models only; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class PlainBlock(nn.Module):
    """A pre-norm transformer block with ``attn`` and ``mlp``, as the generic adapter expects."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    """Self-attention taking one tensor, so it can be merged around."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x, x, need_weights=False)[0]


class GenericBlock(nn.Module):
    """Pre-norm block whose attention takes the normed tokens as its one input."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """A tiny transformer: a ``blocks`` stack of `GenericBlock`."""

    def __init__(self, depth: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[GenericBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


@pytest.fixture
def block_stack() -> BlockStack:
    """A seeded tiny `BlockStack` in eval mode."""
    torch.manual_seed(0)
    return BlockStack().eval()


# ---------------------------------------------------------------------------- timm ViTs
TIMM_TINY_VIT_KWARGS: dict = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)


@pytest.fixture
def timm_tiny_vit():
    """Builder of seeded, random-weight timm ViTs: 32 px images, 4 px patches (an 8x8 grid), width 64, depth 4.

    Call it as ``timm_tiny_vit(arch="vit_tiny_patch16_224", **overrides)``; the model is in eval mode.
    """
    import timm

    def build(arch: str = "vit_tiny_patch16_224", **overrides: object) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, **{**TIMM_TINY_VIT_KWARGS, **overrides}).eval()

    return build


@pytest.fixture
def timm_image_folder(tmp_path):
    """An ImageNet-style folder: ``root/<class>/<image>.png``, 2 classes of 3 random 40x40 images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label in ("class_a", "class_b"):
        (root / label).mkdir(parents=True)
        for index in range(3):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


# ---------------------------------------------------------------------------- diffusers
DIFFUSERS_TINY_MODELS: tuple[str, ...] = ("sd_unet", "sdxl_unet", "dit_pipeline", "pixart_pipeline")


class DiffusersTinyTarget:
    """A tiny diffusers target for the adapter tests, and a deterministic way to run it.

    Attributes:
        name: one of `DIFFUSERS_TINY_MODELS`.
        target: what `tokenmerge.apply` gets (a bare UNet, or a pipeline).
        denoiser: the module that carries the hooks.
    """

    def __init__(self, name: str, target, denoiser: nn.Module, run) -> None:
        self.name, self.target, self.denoiser, self._run = name, target, denoiser, run

    def run(self) -> torch.Tensor:
        """One UNet forward (timestep 500), or one 3-step pipeline call returning latents or images."""
        with torch.no_grad():
            return self._run()


def _diffusers_tiny_target(
    name: str,
    batch: int = 2,
    size: tuple[int, int] = (16, 16),
    dtype: torch.dtype = torch.float32,
    guidance: bool = True,
) -> DiffusersTinyTarget:
    from tokenmerge.tools import tiny

    gen = torch.Generator().manual_seed(123)
    height, width = size
    if name in ("sd_unet", "sdxl_unet"):
        unet = tiny.tiny_sd_unet() if name == "sd_unet" else tiny.tiny_sdxl_unet()
        if dtype != torch.float32:
            unet.to(dtype)
        sample = torch.randn(batch, 4, height, width, generator=gen).to(dtype)
        text = tiny.tiny_prompt_embeds(batch).to(dtype)
        kwargs: dict = {"encoder_hidden_states": text}
        if name == "sdxl_unet":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, tiny.POOLED_DIM, generator=gen).to(dtype),
                "time_ids": torch.tensor([[height * 8.0, width * 8.0, 0.0, 0.0, height * 8.0, width * 8.0]] * batch).to(
                    dtype
                ),
            }
        return DiffusersTinyTarget(name, unet, unet, lambda: unet(sample, torch.tensor(500), **kwargs).sample)
    scale = 4.0 if guidance else 1.0
    if name == "dit_pipeline":
        assert height == width, "DiT pipelines generate square latents (the transformer's sample_size)"
        pipe = tiny.tiny_dit_pipeline()
        pipe.transformer = tiny.tiny_dit(sample_size=height)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)

        def run_dit() -> torch.Tensor:
            out = pipe(
                class_labels=list(range(batch)),
                guidance_scale=scale,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            )
            return out.images

        return DiffusersTinyTarget(name, pipe, pipe.transformer, run_dit)
    if name == "pixart_pipeline":
        pipe = tiny.tiny_pixart_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        caption = torch.randn(batch, 5, tiny.CAPTION_DIM, generator=gen).to(dtype)
        mask = torch.ones(batch, 5)

        def run_pixart() -> torch.Tensor:
            out = pipe(
                prompt_embeds=caption,
                prompt_attention_mask=mask,
                negative_prompt=None,
                negative_prompt_embeds=torch.zeros_like(caption),
                negative_prompt_attention_mask=mask,
                guidance_scale=scale,
                num_inference_steps=3,
                height=8 * height,
                width=8 * width,
                use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )
            return out.images

        return DiffusersTinyTarget(name, pipe, pipe.transformer, run_pixart)
    raise ValueError(f"unknown tiny diffusers model {name!r}; choose from {DIFFUSERS_TINY_MODELS}")


@pytest.fixture
def diffusers_tiny():
    """Builder of tiny random-weight diffusers targets: ``diffusers_tiny(name, batch=2, size=(16, 16), dtype=...)``.

    ``name`` is one of ``DIFFUSERS_TINY_MODELS``: bare SD-style / SDXL-style UNets (one
    forward at timestep 500) or DiT / PixArt pipelines (3 steps with guidance unless
    ``guidance=False``). Returns a `DiffusersTinyTarget`.
    """
    return _diffusers_tiny_target


@pytest.fixture
def diffusers_tiny_sd_pipeline():
    """A tiny `StableDiffusionPipeline` (DDIM, progress bar off); call it with ``prompt_embeds``."""
    from tokenmerge.tools.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def diffusers_one_thread():
    """Run the test on one CPU thread (tiny models gain nothing from more; restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
