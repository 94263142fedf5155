"""timm ``Eva`` models (EVA-02, DINOv3, Perception Encoder, ``vit_*rope*``) described to the stream.

timm 1.0's ``EvaBlock`` is a pre-norm block like ``vision_transformer.Block``::

    x = x + drop_path1(gamma_1 * attn(norm1(x), rope=rope, attn_mask=...))
    x = x + drop_path2(gamma_2 * mlp(norm2(x)))      # SwiGLU or GELU MLP

``Eva.forward_features`` computes one rotary table per forward and passes it to every
block as ``rope=`` (``(P, d)`` over the P patch tokens; ``(H, P, d)`` per block for the
``rope_mixed`` models; ``(B, 1, P, d)`` under patch dropout). The attention
(``EvaAttention`` or ``timm.layers.AttentionRope``) rotates queries and keys of the
patch tokens after the ``num_prefix_tokens`` class and register tokens, which have no
rotary position. Once tokens have merged, the stream hands every block the rows of the
merged tokens' seeds (`tokenmerge.adapters.stream.select_rope`): a merged token attends
at its destination's rotary position. A size-weighted mean of rotary angles is no
rotary position at all (rotations do not average; the mean of ``cos``/``sin`` rows is
not a rotation), so the destination's row, the position ToMe keeps for the group's
other data too (the class-token side, the layout), is the choice.

The keys for matching are ``attn.k_norm``'s output, before the rotation: ToMe's
``k.mean(heads)`` on content, not on position.

The blocks run as one stream inside ``Eva.forward`` (the model's call: ``forward_features``
loops over the blocks itself); ``forward_features`` or ``forward_intermediates`` called
directly take the blocks-one-by-one path of `tokenmerge.adapters.stream` (dense outputs
between blocks, exact). The final ``norm`` unmerges for dense outputs and for the
``avg``/``max``/``map`` poolings, as for ``VisionTransformer``.

Refused: ``EvaBlockPostNorm`` (post-norm blocks: the MLP branch's norm is after the
MLP) and attention classes other than ``EvaAttention``/``AttentionRope``.
"""

from __future__ import annotations

from typing import Any

from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock

from .specs import Argument
from .stream import StreamSpec
from .stream_attention import eva_attention

__all__ = ["SUPPORTED_FAMILIES", "eva_stream_spec", "eva_unsupported"]

#: The model families this description handles, as shown in error messages.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "timm Eva whose blocks are eva.EvaBlock with EvaAttention or timm.layers.AttentionRope "
    "(eva02_*, vit_*_dinov3*, vit_pe_*, vit_*rope*; register tokens, LayerScale, SwiGLU)",
)

_TOKENS = Argument("x", 0)
_ROPE = Argument("rope", 1)
_MASK = Argument("attn_mask", 2)
_CAUSAL = Argument("is_causal", 3)


def eva_unsupported(target: Any) -> str | None:
    """Why the ``Eva`` ``target`` cannot be merged, or None when it can."""
    if not isinstance(target, Eva):
        return f"got {type(target).__module__}.{type(target).__qualname__}"
    for index, block in enumerate(target.blocks):
        if type(block) is not EvaBlock:
            return f"blocks.{index} is a {type(block).__qualname__}, not an eva.EvaBlock (post-norm blocks are not)"
        if type(block.attn) not in (EvaAttention, AttentionRope):
            return f"blocks.{index}.attn is a {type(block.attn).__qualname__}, not EvaAttention or AttentionRope"
    return None


def eva_stream_spec(model: Eva) -> StreamSpec:
    """The `StreamSpec` of a timm ``Eva``: rotary table in ``rope=``, the model's call as the stream."""
    from .vit import timm_checkpointing, timm_patch_grid, timm_pool_reads_all, timm_stream_block

    return StreamSpec(
        blocks=tuple(timm_stream_block(block) for block in model.blocks),
        tokens=_TOKENS,
        mask=_MASK,
        causal=_CAUSAL,
        rope=_ROPE,
        attn_tokens=_TOKENS,
        attn_mask=_MASK,
        num_prefix=int(model.num_prefix_tokens),
        grid=model.patch_embed,
        grid_of=timm_patch_grid,
        stream=model,
        output=model.norm,
        pool_reads_all=timm_pool_reads_all,
        checkpointing=timm_checkpointing,
        attention=eva_attention,
    )
