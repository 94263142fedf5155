"""Where the transformer blocks of a diffusers denoiser sit, and their token grids.

A `DenoiserLayout` lists every `BasicTransformerBlock` of a UNet, DiT or PixArt model
with its *level*: how many 2x downsamplings separate its token grid from the latent
(UNets), or 0 for every block of a patch transformer. Levels are read from the model's
structure (which down/up blocks carry a downsampler/upsampler), not from token counts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ..errors import TokenMergeError

__all__ = ["BlockSite", "DenoiserLayout", "describe_denoiser", "token_grid", "SUPPORTED_MODELS"]

#: The denoiser classes the diffusers adapter handles, by name (for error messages).
SUPPORTED_MODELS: tuple[str, ...] = ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")


@dataclass(frozen=True)
class BlockSite:
    """One transformer block of a denoiser.

    Attributes:
        name: the block's module path inside the denoiser (the merge layer key).
        block: the `BasicTransformerBlock`.
        level: number of 2x downsamplings between the latent and this block's token grid.
    """

    name: str
    block: BasicTransformerBlock
    level: int

    @property
    def has_cross_attention(self) -> bool:
        """Whether the block has a cross-attention layer (``attn2``)."""
        return getattr(self.block, "attn2", None) is not None


@dataclass(frozen=True)
class DenoiserLayout:
    """What the adapter needs to know about a denoiser.

    Attributes:
        kind: ``"unet"``, ``"dit"`` or ``"pixart"``.
        model: the denoiser.
        sites: its transformer blocks, in execution order for patch transformers.
        patch_size: latent pixels per token side (1 for UNets).
        latent_index, latent_name: where the latent ``(B, C, H, W)`` is in the forward call.
        timestep_index, timestep_name: where the timestep is in the forward call.
    """

    kind: str
    model: nn.Module
    sites: tuple[BlockSite, ...]
    patch_size: int
    latent_index: int
    latent_name: str
    timestep_index: int
    timestep_name: str = "timestep"

    @property
    def base_level(self) -> int:
        """The level of the highest-resolution blocks that have attention (0 for SD, 1 for SDXL)."""
        return min((site.level for site in self.sites), default=0)

    @property
    def is_unet(self) -> bool:
        """True for UNets (several resolutions), False for patch transformers (one)."""
        return self.kind == "unet"

    def relative_downsample(self, site: BlockSite) -> int:
        """How much coarser ``site``'s grid is than the finest grid with attention (1, 2, 4, ...)."""
        return 2 ** (site.level - self.base_level)

    def grid(self, latent_hw: tuple[int, int] | None, site: BlockSite, num_tokens: int) -> tuple[int, int] | None:
        """The ``(h, w)`` token grid of ``site`` for a latent of size ``latent_hw``; None if it does not fit."""
        if latent_hw is None:
            return None
        return token_grid(latent_hw, site.level, self.patch_size, num_tokens)


def token_grid(latent_hw: tuple[int, int], level: int, patch_size: int, num_tokens: int) -> tuple[int, int] | None:
    """The token grid ``(h, w)`` with ``h * w == num_tokens`` of a block ``level`` halvings below the latent.

    Patch transformers: ``(H // p, W // p)``. UNets: ``(ceil(H / 2**level), ceil(W / 2**level))``,
    which is what repeated stride-2 convolutions with padding 1 give; failing that, tomesd's
    rule ``ds = ceil(sqrt(H*W // N))``, ``(ceil(H / ds), ceil(W / ds))``. None when neither
    covers ``num_tokens`` (the block runs unmerged then).
    """
    height, width = latent_hw
    if patch_size > 1:
        candidates = [(height // patch_size, width // patch_size)]
    else:
        scale = 2**level
        candidates = [(-(-height // scale), -(-width // scale)), (height // scale, width // scale)]
    if num_tokens > 0:
        ds = math.ceil(math.sqrt(height * width // num_tokens)) if height * width >= num_tokens else 1
        candidates.append((-(-height // ds), -(-width // ds)))
    for h, w in candidates:
        if h * w == num_tokens and h > 0 and w > 0:
            return h, w
    return None


def _blocks_in(module: nn.Module, prefix: str) -> list[tuple[str, BasicTransformerBlock]]:
    return [(f"{prefix}.{name}", m) for name, m in module.named_modules() if isinstance(m, BasicTransformerBlock)]


def _unet_sites(unet: UNet2DConditionModel) -> list[BlockSite]:
    sites: list[BlockSite] = []
    level = 0
    for i, down in enumerate(unet.down_blocks):
        sites += [BlockSite(name, block, level) for name, block in _blocks_in(down, f"down_blocks.{i}")]
        if getattr(down, "downsamplers", None):
            level += 1
    if unet.mid_block is not None:
        sites += [BlockSite(name, block, level) for name, block in _blocks_in(unet.mid_block, "mid_block")]
    for j, up in enumerate(unet.up_blocks):
        sites += [BlockSite(name, block, level) for name, block in _blocks_in(up, f"up_blocks.{j}")]
        if getattr(up, "upsamplers", None):
            level -= 1
    return sites


def _transformer_sites(model: nn.Module) -> list[BlockSite]:
    return [BlockSite(f"transformer_blocks.{i}", block, 0) for i, block in enumerate(model.transformer_blocks)]


def _forward_params(model: nn.Module) -> list[str]:
    return [name for name in inspect.signature(model.forward).parameters if name != "self"]


# (denoiser class, kind, sites builder, patch size getter): one row per model family.
_FAMILIES: tuple[tuple[type, str, Callable[[Any], list[BlockSite]], Callable[[Any], int]], ...] = (
    (UNet2DConditionModel, "unet", _unet_sites, lambda m: 1),
    (DiTTransformer2DModel, "dit", _transformer_sites, lambda m: int(m.config.patch_size)),
    (PixArtTransformer2DModel, "pixart", _transformer_sites, lambda m: int(m.config.patch_size)),
)


def describe_denoiser(model: Any) -> DenoiserLayout | None:
    """The `DenoiserLayout` of ``model``, or None when it is not a supported denoiser."""
    for cls, kind, sites_of, patch_of in _FAMILIES:
        if isinstance(model, cls):
            params = _forward_params(model)
            if "timestep" not in params:
                raise TokenMergeError(
                    f"model {type(model).__name__}.forward has no timestep argument; cannot track steps"
                )
            return DenoiserLayout(
                kind=kind,
                model=model,
                sites=tuple(sites_of(model)),
                patch_size=patch_of(model),
                latent_index=0,
                latent_name=params[0],
                timestep_index=params.index("timestep"),
            )
    return None
