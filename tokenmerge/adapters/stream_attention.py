"""The attention of timm's blocks, recomputed with value-weighted proportional attention.

`tokenmerge.adapters.stream` passes proportional attention to an attention module as an
additive mask by default. Where that costs the fused kernel (CUDA: a mask rules out flash
attention, `tokenmerge.attention.auto_form`), the stream instead sets an instance-level
forward on the module (`tokenmerge.hooks.HookSet.forward`) that computes what the
library's forward computes, with the module's own projections, norms, rotary rows and
gate, and calls `tokenmerge.attention.proportional_attention` in place of
``scaled_dot_product_attention``. Each function here follows the timm 1.0 forward it
names, read from timm's source; the stream calls the library's own forward for every
call that has nothing to weigh (before the first merge, on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import proportional_attention
from .specs import Argument

__all__ = ["timm_attention", "eva_attention"]

_X = Argument("x", 0)


def _finish(attn: nn.Module, out: Tensor, gate: Tensor | None, width: int) -> Tensor:
    """Heads back to tokens, then the module's output norm, gate, projection and dropout."""
    batch, _, num, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, num, width)  # (B, N, H * d)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))  # (B, N, C)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, sizes: Tensor, mask: Tensor | None) -> Tensor:
    dropout = attn.attn_drop.p if attn.training else 0.0
    return proportional_attention(q, k, v, sizes, scale=attn.scale, mask=mask, dropout_p=dropout, form="value")


def timm_attention(attn: nn.Module, sizes: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """``timm.layers.Attention.forward(x, attn_mask=None)`` with size-weighted attention over ``sizes`` ``(B, N)``."""
    x = _X.get(args, kwargs)  # (B, N, C)
    mask = Argument("attn_mask", 1).get(args, kwargs)
    batch, num, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, num, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    return _finish(attn, _attend(attn, q, k, v, sizes, mask), gate, attn.attn_dim)


def eva_attention(attn: nn.Module, sizes: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """``EvaAttention`` / ``AttentionRope`` ``.forward(x, rope=None, attn_mask=None)``, size-weighted over ``sizes``."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    x = _X.get(args, kwargs)  # (B, N, C)
    rope = Argument("rope", 1).get(args, kwargs)
    mask = Argument("attn_mask", 2).get(args, kwargs)
    batch, num, channels = x.shape
    heads = attn.num_heads
    kv_heads = getattr(attn, "num_kv_heads", heads)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x) + bias
            else:
                qkv = nn.functional.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(batch, num, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    else:
        q = attn.q_proj(x).reshape(batch, num, heads, -1).transpose(1, 2)  # (B, H, N, d)
        k = attn.k_proj(x).reshape(batch, num, kv_heads, -1).transpose(1, 2)  # (B, Hkv, N, d)
        v = attn.v_proj(x).reshape(batch, num, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, N, d)
    width = getattr(attn, "attn_dim", channels)
    return _finish(attn, _attend(attn, q, k, v, sizes, mask), gate, width)
