"""The diffusers families as data: a `BlockSpec` per block class, a `DenoiserSpec` per denoiser class.

This is the one place a diffusers family is added (see the how-to "Add a model family"):
a row for its block class, if it is new, and a row for its denoiser class. The UNet's
row needs a function, `unet_sites`, because a UNet's blocks sit at several resolutions;
patch transformers name the attribute that holds their blocks.
"""

from __future__ import annotations

from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from ..placements import KeyValues, SubLayers
from .specs import BlockSpec, DenoiserSpec, blocks_in, register_block_spec, register_denoiser_spec

__all__ = ["unet_sites", "stacked_sites"]


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


def stacked_sites(*attributes: str):  # noqa: ANN201 - returns a DenoiserSpec.blocks function
    """A `DenoiserSpec.blocks` function: the blocks of several attributes, one after the other, all at level 0.

    Flux runs its double-stream ``transformer_blocks`` and then its single-stream
    ``single_transformer_blocks``: one block index space across both (so a
    `ResidualRange` may span them).
    """

    def sites(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
        found: list[tuple[str, nn.Module, int]] = []
        for attribute in attributes:
            container = getattr(model, attribute, None)
            if isinstance(container, nn.Module):
                found += [(f"{attribute}.{path}", block, 0) for path, block in blocks_in(container)]
        return found

    sites.__qualname__ = sites.__name__ = f"stacked_sites({', '.join(map(repr, attributes))})"
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

# --8<-- [start:flux]
# FluxTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...)
#   -> (encoder_hidden_states, hidden_states); its attn(hidden_states=image, encoder_hidden_states=text,
#   image_rotary_emb=(cos, sin) over [text | image]) returns (image, text).
_FLUX_JOINT = dict(
    mask=None,
    rotary="image_rotary_emb",
    hidden_output=1,
    context_output=0,
    self_attention="attn",
    cross_attention=None,
    key_value_argument=None,
    text_order="before",
    attention_rotary="image_rotary_emb",
    rotary_text=True,
    rotary_style="flux",
)
register_block_spec(
    FluxTransformerBlock, BlockSpec(**_FLUX_JOINT, feed_forward="ff", attention_context="encoder_hidden_states")
)
# FluxSingleTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...)
#   concatenates [text | image] and runs attn and proj_mlp (the feed-forward's first layer) on it.
register_block_spec(FluxSingleTransformerBlock, BlockSpec(**_FLUX_JOINT, feed_forward="proj_mlp", concatenated=True))
# The latent arrives packed (B, N, C) (2x2 patches of the VAE latent): the token grid comes from img_ids;
# the pipeline passes t / 1000.
register_denoiser_spec(
    FluxTransformer2DModel,
    DenoiserSpec(
        "flux",
        blocks=stacked_sites("transformer_blocks", "single_transformer_blocks"),
        grid_ids="img_ids",
        timestep_scale=1000.0,
    ),
)
# --8<-- [end:flux]

# --8<-- [start:sd3]
# JointTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> (encoder_hidden_states,
#   hidden_states); attn(hidden_states=image, encoder_hidden_states=text) runs on [image | text] (text last) and
#   returns (image, text); SD3.5's attn2 attends over the image alone. JointAttnProcessor2_0 takes no mask.
register_block_spec(
    JointTransformerBlock,
    BlockSpec(
        mask=None,
        hidden_output=1,
        context_output=0,
        self_attention="attn",
        cross_attention=None,
        key_value_argument=None,
        text_order="after",
        attention_context="encoder_hidden_states",
        image_attention="attn2",
        joint_mask=False,
    ),
)
register_denoiser_spec(SD3Transformer2DModel, DenoiserSpec("sd3", patch_size="patch_size"))
# --8<-- [end:sd3]

# --8<-- [start:wan]
# WanTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, rotary_emb) -> hidden_states:
#   attn1(x, None, None, rotary_emb) self-attention over the video tokens with rotary tables (1, N, 1, D)
#   applied after its norm_q / norm_k; attn2 cross-attention to the text; ffn.
register_block_spec(
    WanTransformerBlock,
    BlockSpec(
        mask=None,
        rotary="rotary_emb",
        self_attention="attn1",
        cross_attention="attn2",
        feed_forward="ffn",
        key_value_argument=None,
        attention_rotary="rotary_emb",
        rotary_style="wan",
    ),
)
# The latent is (B, C, F, H, W); patch_size is (t, h, w).
register_denoiser_spec(
    WanTransformer3DModel, DenoiserSpec("wan", blocks="blocks", patch_size="patch_size", patch_size_t="patch_size")
)
# --8<-- [end:wan]

# --8<-- [start:qwen]
# QwenImageTransformerBlock.forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
#   image_rotary_emb, ...) -> (encoder_hidden_states, hidden_states); attn(hidden_states=image,
#   encoder_hidden_states=text, image_rotary_emb=(image freqs, text freqs)) runs on [text | image] and returns
#   (image, text); its processor refuses an attention_mask.
register_block_spec(
    QwenImageTransformerBlock,
    BlockSpec(
        mask=None,
        rotary="image_rotary_emb",
        hidden_output=1,
        context_output=0,
        self_attention="attn",
        cross_attention=None,
        feed_forward="img_mlp",
        key_value_argument=None,
        text_order="before",
        attention_context="encoder_hidden_states",
        attention_rotary="image_rotary_emb",
        rotary_text=True,
        rotary_style="qwen",
        joint_mask=False,
        context_mask="encoder_hidden_states_mask",
    ),
)
# The latent arrives packed (B, N, C) (2x2 patches); the token grid is img_shapes' (1, h, w); t / 1000.
register_denoiser_spec(
    QwenImageTransformer2DModel, DenoiserSpec("qwen-image", grid_shapes="img_shapes", timestep_scale=1000.0)
)
# --8<-- [end:qwen]

# --8<-- [start:cogvideox]
# CogVideoXBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...) -> (hidden_states,
#   encoder_hidden_states); attn1(hidden_states=video, encoder_hidden_states=text, image_rotary_emb=(cos, sin) over
#   the video tokens) projects [text | video] at once and returns (video, text); ff runs on [text | video].
register_block_spec(
    CogVideoXBlock,
    BlockSpec(
        mask=None,
        rotary="image_rotary_emb",
        hidden_output=0,
        context_output=1,
        self_attention="attn1",
        cross_attention=None,
        key_value_argument=None,
        text_order="before",
        attention_context="encoder_hidden_states",
        attention_rotary="image_rotary_emb",
        rotary_style="cogvideox",
        joint_feed_forward=True,
    ),
)
# The latent is (B, F, C, H, W); CogVideoX 1.5 patches frames too (patch_size_t).
register_denoiser_spec(
    CogVideoXTransformer3DModel,
    DenoiserSpec("cogvideox", patch_size="patch_size", patch_size_t="patch_size_t", frames_first=True),
)
# --8<-- [end:cogvideox]

# --8<-- [start:hunyuan-video]
# HunyuanVideoTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)
#   -> (hidden_states, encoder_hidden_states); attn(hidden_states=video, encoder_hidden_states=text,
#   attention_mask=(B, 1, 1, N + T) over [video | text] keys, image_rotary_emb=(cos, sin) over the video).
# HunyuanVideoSingleTransformerBlock: the same call, but it concatenates [video | text] for proj_mlp and its
#   attention projects the two together.
_HUNYUAN = dict(
    mask="attention_mask",
    hidden_output=0,
    context_output=1,
    self_attention="attn",
    cross_attention=None,
    key_value_argument=None,
    text_order="after",
    attention_context="encoder_hidden_states",
    attention_rotary="image_rotary_emb",
    rotary_style="hunyuan",
)
register_block_spec(HunyuanVideoTransformerBlock, BlockSpec(**_HUNYUAN, rotary="freqs_cis", feed_forward="ff"))
register_block_spec(
    HunyuanVideoSingleTransformerBlock,
    BlockSpec(**_HUNYUAN, rotary="image_rotary_emb", feed_forward="proj_mlp", joint_feed_forward=True),
)
# The latent is (B, C, F, H, W); the transformer runs its double-stream blocks, then its single-stream ones.
register_denoiser_spec(
    HunyuanVideoTransformer3DModel,
    DenoiserSpec(
        "hunyuan-video",
        blocks=stacked_sites("transformer_blocks", "single_transformer_blocks"),
        patch_size="patch_size",
        patch_size_t="patch_size_t",
    ),
)
# --8<-- [end:hunyuan-video]

# --8<-- [start:flux2]
# Flux2TransformerBlock: Flux's double-stream block (modulation passed in: temb_mod_img, temb_mod_txt).
# Flux2SingleTransformerBlock.forward(hidden_states=[text | image], encoder_hidden_states=None, temb_mod, ...):
#   the model concatenates the streams; its attention is a parallel attention + MLP on the joint sequence.
register_block_spec(
    Flux2TransformerBlock, BlockSpec(**_FLUX_JOINT, feed_forward="ff", attention_context="encoder_hidden_states")
)
register_block_spec(
    Flux2SingleTransformerBlock,
    BlockSpec(
        **{**_FLUX_JOINT, "hidden_output": None, "context_output": None},  # returns the joint tensor
        feed_forward=None,
        concatenated=True,
    ),
)
register_denoiser_spec(
    Flux2Transformer2DModel,
    DenoiserSpec(
        "flux2",
        blocks=stacked_sites("transformer_blocks", "single_transformer_blocks"),
        grid_ids="img_ids",
        timestep_scale=1000.0,
    ),
)
# --8<-- [end:flux2]
