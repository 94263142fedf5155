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
