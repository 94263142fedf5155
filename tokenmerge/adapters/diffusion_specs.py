"""The diffusers families as data: a `BlockSpec` per block class, a `DenoiserSpec` per denoiser class.

This is the one place a diffusers family is added (see the how-to "Add a model family"):
a row for its block class, if it is new, and a row for its denoiser class. The UNet's
row needs a function, `unet_sites`, because a UNet's blocks sit at several resolutions;
patch transformers name the attribute that holds their blocks.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ..placements import KeyValues, SubLayers
from .specs import BlockSpec, DenoiserSpec, blocks_in, register_block_spec, register_denoiser_spec

__all__ = ["unet_sites"]


def unet_sites(unet: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(path, block, level)`` of a UNet's transformer blocks; the level counts the downsamplers passed."""
    sites: list[tuple[str, nn.Module, int]] = []
    level = 0
    for i, down in enumerate(unet.down_blocks):
        sites += [(f"down_blocks.{i}.{path}", block, level) for path, block in blocks_in(down)]
        if getattr(down, "downsamplers", None):
            level += 1
    if unet.mid_block is not None:
        sites += [(f"mid_block.{path}", block, level) for path, block in blocks_in(unet.mid_block)]
    for j, up in enumerate(unet.up_blocks):
        sites += [(f"up_blocks.{j}.{path}", block, level) for path, block in blocks_in(up)]
        if getattr(up, "upsamplers", None):
            level -= 1
    return sites


# BasicTransformerBlock.forward(hidden_states, attention_mask, encoder_hidden_states, ...) -> hidden_states
register_block_spec(BasicTransformerBlock, BlockSpec())  # every field at its default: diffusers' names

# --8<-- [start:unet]
register_denoiser_spec(
    UNet2DConditionModel,
    DenoiserSpec("unet", blocks=unet_sites, latent="sample", placements=(SubLayers, KeyValues)),
)
# --8<-- [end:unet]
# --8<-- [start:dit]
register_denoiser_spec(DiTTransformer2DModel, DenoiserSpec("dit", patch_size="patch_size"))
# --8<-- [end:dit]
# --8<-- [start:pixart]
register_denoiser_spec(PixArtTransformer2DModel, DenoiserSpec("pixart", patch_size="patch_size"))
# --8<-- [end:pixart]
