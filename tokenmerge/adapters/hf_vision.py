"""Hugging Face ``transformers`` vision encoders: ToMe through the shared residual stream.

Supported: ``ViTModel`` / ``ViTForImageClassification``, ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, ``Dinov2Model`` /
``Dinov2ForImageClassification`` and the register variants
(``Dinov2WithRegistersModel`` / ``...ForImageClassification``), with the ``sdpa`` and
``eager`` attention implementations. Every encoder layer is pre-norm::

    h = h + dropout(attention(layernorm_before(h), attention_mask))   # ViTLayer
    h = h + dropout(mlp(layernorm_after(h)))

(CLIP and SigLIP: ``self_attn``/``layer_norm1``/``layer_norm2``, no dropout; DINOv2:
``norm1``/``norm2``, LayerScale and a drop-path module shared by both branches.) The
description for `tokenmerge.adapters.stream` names, per layer, the attention (the
proportional-attention bias goes into its ``attention_mask``, which both the
``eager`` and the ``sdpa`` implementations add to the logits), the key projection
``k_proj`` (``(B, N, H * d)``: the metric is ToMe's ``k.mean(heads)``), the MLP's norm
and the branch's last module (the dropout or drop-path the attention branch also
calls is ignored on that first call). This module imports ``transformers`` and is
itself imported only when a ``transformers`` model is applied to.

Outputs:

* ``last_hidden_state`` comes back **merged** by default: ``(B, N', C)``, the prefix
  tokens (class, registers) first, then the merged patch tokens (`merge_record` gives
  their sizes and, with ``trace_source=True``, the token map; `unmerge_to_patches`
  spreads them back). ``placement=TokenStream(dense=True)`` returns it **dense**
  instead, one row per patch in input order (the feature-extraction form).
* ``pooler_output``: ViT: its pooler on the class token; CLIP: ``post_layernorm`` on the
  class token; DINOv2: the normed class token. None of them is touched by merging.
  SigLIP: its attention-pooling head runs over the merged tokens with ``log(size)``
  added to the probe's logits (proportional attention in the head), which is what the
  head computes over the unmerged tokens. ``Dinov2ForImageClassification`` also
  averages the patch tokens, so for it ``last_hidden_state`` is always dense (the mean
  of the unmerged tokens is the size-weighted mean).
* ``output_hidden_states=True`` returns every layer's output in its own (merged) layout.

Refused: other attention implementations (``flash_attention_2``, ``flex_attention``:
no additive bias), gradient checkpointing while training, ``mode="sum"``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.dinov2.modeling_dinov2 import Dinov2ForImageClassification, Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel
from transformers.models.vit.modeling_vit import ViTForImageClassification, ViTLayer, ViTModel

from ..config import MergeConfig
from ..errors import TokenMergeError
from ..hooks import HookSet
from ..placements import TokenStream
from ..state import MergeState
from .base import Adapter
from .specs import Argument
from .stream import StreamBlock, StreamSpec, attach_stream, check_stream, nchw_grid

__all__ = ["HFVisionAdapter", "SUPPORTED_FAMILIES", "hf_stream_spec"]

#: The model families this adapter handles, as shown in error messages.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "transformers ViTModel / ViTForImageClassification",
    "transformers CLIPVisionModel / CLIPVisionModelWithProjection",
    "transformers SiglipVisionModel",
    "transformers Dinov2Model / Dinov2ForImageClassification (and the WithRegisters variants)",
)

#: Attention implementations that add an additive mask to the logits.
_ATTENTION = ("eager", "sdpa")

_TOKENS = Argument("hidden_states", 0)
_MASK = Argument("attention_mask", 1)


def _vit_layer(layer: nn.Module) -> StreamBlock:
    attn = layer.attention
    return StreamBlock(layer, attn, attn.k_proj, attn.num_attention_heads, layer.layernorm_after, layer.dropout)


def _clip_layer(layer: nn.Module) -> StreamBlock:
    attn = layer.self_attn
    return StreamBlock(layer, attn, attn.k_proj, attn.num_heads, layer.layer_norm2, layer.mlp)


def _dinov2_layer(layer: nn.Module) -> StreamBlock:
    attn = layer.attention
    return StreamBlock(layer, attn, attn.k_proj, attn.num_attention_heads, layer.norm2, layer.drop_path)


#: Layer class -> its description.
_LAYERS: dict[type[nn.Module], Any] = {
    ViTLayer: _vit_layer,
    CLIPEncoderLayer: _clip_layer,
    SiglipEncoderLayer: _clip_layer,
    Dinov2Layer: _dinov2_layer,
    Dinov2WithRegistersLayer: _dinov2_layer,
}


def _encoder_of(target: Any) -> nn.Module | None:
    """The module holding the embeddings and the layers (the target itself, or its ``vit``/``dinov2``/...)."""
    if isinstance(target, ViTForImageClassification):
        return target.vit
    if isinstance(target, CLIPVisionModelWithProjection):
        return target.vision_model
    if isinstance(target, Dinov2ForImageClassification):
        return target.dinov2
    if isinstance(target, Dinov2WithRegistersForImageClassification):
        return target.dinov2_with_registers
    if isinstance(target, ViTModel | CLIPVisionModel | SiglipVisionModel | Dinov2Model | Dinov2WithRegistersModel):
        return target
    return None


def _layers_of(encoder: nn.Module) -> nn.ModuleList:
    if isinstance(encoder, ViTModel):
        return encoder.layers
    if isinstance(encoder, Dinov2Model | Dinov2WithRegistersModel):
        return encoder.encoder.layer
    return encoder.encoder.layers


def _mean_pools(target: nn.Module) -> bool:
    """Whether the head averages the patch tokens (DINOv2's classifier): it needs every token."""
    return isinstance(target, Dinov2ForImageClassification | Dinov2WithRegistersForImageClassification)


def _checkpointing(target: nn.Module) -> bool:
    return bool(getattr(target, "is_gradient_checkpointing", False)) and target.training


def hf_stream_spec(target: nn.Module) -> StreamSpec:
    """The `StreamSpec` of a supported ``transformers`` vision model."""
    encoder = _encoder_of(target)
    assert encoder is not None
    layers = _layers_of(encoder)
    embeddings = encoder.embeddings
    if isinstance(encoder, ViTModel):
        grid, stream, output, prefix = embeddings.patch_embeddings.projection, encoder, encoder.layernorm, 1
    elif isinstance(encoder, CLIPVisionModel):
        grid, stream, output, prefix = embeddings.patch_embedding, encoder.encoder, encoder.encoder, 1
    elif isinstance(encoder, SiglipVisionModel):
        grid, stream, output, prefix = embeddings.patch_embedding, encoder.encoder, encoder.post_layernorm, 0
    else:
        registers = int(getattr(encoder.config, "num_register_tokens", 0))
        grid, stream, output = embeddings.patch_embeddings.projection, encoder.encoder, encoder.layernorm
        prefix = 1 + registers
    head = getattr(encoder, "head", None) if isinstance(encoder, SiglipVisionModel) else None
    return StreamSpec(
        blocks=tuple(_LAYERS[type(layer)](layer) for layer in layers),
        tokens=_TOKENS,
        mask=_MASK,
        causal=None,
        rope=None,
        attn_tokens=_TOKENS,
        attn_mask=_MASK,
        num_prefix=prefix,
        grid=grid,
        grid_of=nchw_grid,
        stream=stream,
        output=output,
        pool_reads_all=_mean_pools,
        checkpointing=_checkpointing,
        pool_attn=head.attention if head is not None else None,
    )


def _unsupported(target: Any) -> str | None:
    encoder = _encoder_of(target)
    if encoder is None:
        return f"got {type(target).__module__}.{type(target).__qualname__}"
    for index, layer in enumerate(_layers_of(encoder)):
        if type(layer) not in _LAYERS:
            return f"layer {index} is a {type(layer).__qualname__}"
    implementation = getattr(encoder.config, "_attn_implementation", None)
    if implementation not in _ATTENTION:
        return (
            f"config._attn_implementation is {implementation!r}; merging needs 'sdpa' or 'eager' (an additive "
            "attention bias): load the model with attn_implementation='sdpa'"
        )
    return None


class HFVisionAdapter(Adapter):
    """ToMe merging for Hugging Face ``transformers`` vision encoders (ViT, CLIP, SigLIP, DINOv2).

    The one placement is `TokenStream` (the default): every layer in
    ``TokenStream.blocks`` merges its residual stream between attention and MLP, with
    any `Matcher`/`ThresholdPolicy`. ``TokenStream.dense`` defaults to False here:
    ``last_hidden_state`` holds the merged tokens; True returns one row per patch. The
    module docstring of `tokenmerge.adapters.hf_vision` describes the pooled outputs.
    """

    name = "transformers-vision"
    supported = SUPPORTED_FAMILIES
    placements = (TokenStream,)

    def accepts(self, target: Any) -> bool:
        """True for the supported vision models; other ``transformers`` models go on to the generic adapter."""
        return isinstance(target, PreTrainedModel) and _encoder_of(target) is not None

    def family(self, target: Any) -> str:
        """``"a transformers vision encoder (<class>)"``, for error messages."""
        return f"a transformers vision encoder ({type(target).__name__})"

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject unsupported models and settings; changes nothing."""
        reason = _unsupported(target)
        if reason is not None:
            raise TokenMergeError(f"target must be one of: {'; '.join(SUPPORTED_FAMILIES)}; {reason}")
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        check_stream(config, placement, len(_layers_of(_encoder_of(target))))  # type: ignore[arg-type]

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook the patch convolution, every layer, the final features and (SigLIP) the pooling head."""
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        if placement.dense is None:
            placement = TokenStream(placement.blocks, placement.prop_attn, placement.trace_source, False)
        attach_stream(target, hf_stream_spec(target), config, placement, state, hooks)
