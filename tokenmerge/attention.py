"""Proportional attention (ToMe's size-weighted attention) on fused attention kernels.

A merged token of size ``s`` stands for ``s`` input tokens, and ToMe's proportional
attention weighs it so: ``softmax(q k^T * scale + log s)``. Two exact forms compute it:

* ``"mask"``: ``log s`` as an additive ``(B, 1, 1, N)`` mask
  (`tokenmerge.plan.proportional_attention_bias`) to
  `torch.nn.functional.scaled_dot_product_attention`. Simple, but a mask rules out the
  flash kernel on CUDA, and for ``N`` not a multiple of 16 SDPA first pads it into a
  full ``(B, H, N, N + pad)`` copy.
* ``"value"`` (value-weighted): no mask. With ``e_j = exp(q k_j^T * scale)``,
  proportional attention is ``sum_j e_j s_j v_j / sum_j e_j s_j``, which is plain
  attention over the values ``[v * s | s]`` with the first ``D`` channels divided by
  the last. The sizes multiply values, not logits, so the softmax's scaling is the
  plain one; they are divided by their largest value per sample first (the ratio does
  not change, and ``v * s`` cannot overflow float16). The extra channel makes the value
  head ``D + 1``; it is padded with zeros to a multiple of 8 and the queries and keys
  with zero channels to the same size (flash kernels want one head size, a multiple of
  8, at most 256): zero channels leave every score unchanged, and ``scale`` is passed
  as the unpadded one.

`proportional_attention` picks a form with ``form="auto"`` (`auto_form`): the
value-weighted form on CUDA, where it keeps the flash kernel (a choice made from
PyTorch's kernel-selection rules: a mask excludes flash; not yet measured on a GPU
here); on the CPU the mask form, which measured faster at ViT-B/16 sizes (SDPA's CPU
flash kernel takes a mask at no cost, so the extra channel and division are pure
overhead); under attention dropout the mask form (dropout would also drop the
value-weighted form's denominator).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check
from .plan import proportional_attention_bias

__all__ = ["AttentionForm", "FORMS", "auto_form", "proportional_attention", "padded_head_dim"]

#: How `proportional_attention` computes: ``"mask"``, ``"value"`` or ``"auto"``.
AttentionForm = Literal["auto", "mask", "value"]

#: The accepted values of ``form``.
FORMS: tuple[str, ...] = ("auto", "mask", "value")

#: Largest head size the flash kernels accept.
_FLASH_MAX_HEAD = 256


def padded_head_dim(head_dim: int) -> int:
    """The value-weighted form's head size for ``head_dim``: ``head_dim + 1`` rounded up to a multiple of 8."""
    return -(-(head_dim + 1) // 8) * 8


def auto_form(device: torch.device, head_dim: int, *, dropout_p: float = 0.0) -> Literal["mask", "value"]:
    """The form ``form="auto"`` uses for attention on ``device`` with heads of ``head_dim`` channels.

    ``"value"`` on CUDA when the padded head size fits the flash kernels (at most 256)
    and there is no dropout; ``"mask"`` otherwise (the CPU, other devices, dropout).
    """
    if dropout_p > 0.0 or device.type != "cuda":
        return "mask"
    return "value" if padded_head_dim(head_dim) <= _FLASH_MAX_HEAD else "mask"


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An SDPA mask as an additive float bias: bool True -> 0, False -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def proportional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: Tensor,
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    form: AttentionForm = "auto",
) -> Tensor:
    """``softmax(q k^T * scale + log size + mask) v``: attention weighted by token size.

    Args:
        q: ``(B, H, L, D)`` queries.
        k: ``(B, H, N, D)`` keys.
        v: ``(B, H, N, Dv)`` values.
        size: ``(B, N)`` positive token sizes (any float dtype; float32 in the stream).
        scale: the logits' scale; None for ``1 / sqrt(D)`` (SDPA's default).
        mask: an SDPA attention mask broadcastable to ``(B, H, L, N)`` (bool: True
            attends; float: added to the logits), or None.
        dropout_p: attention dropout (training only; ``"auto"`` then takes ``"mask"``).
        form: ``"mask"``, ``"value"`` (value-weighted) or ``"auto"`` (`auto_form`); the
            module docstring compares them. Both give the same result up to rounding.

    Returns:
        ``(B, H, L, Dv)`` in ``v``'s dtype.
    """
    check(form in FORMS, f"form must be one of {FORMS}; got {form!r}")
    check(
        size.dim() == 2 and size.shape[-1] == k.shape[-2],
        f"size must be (B, N) with N = {k.shape[-2]} keys; got shape {tuple(size.shape)}",
    )
    if form == "auto":
        form = auto_form(q.device, q.shape[-1], dropout_p=dropout_p)
    if form == "mask":
        bias = proportional_attention_bias(size, q.dtype)  # (B, 1, 1, N)
        if mask is not None:
            bias = _additive(mask, q.dtype) + bias  # broadcast to (B, H, L, N) at most
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return _value_weighted(q, k, v, size, scale=scale, mask=mask, dropout_p=dropout_p)


def _value_weighted(
    q: Tensor, k: Tensor, v: Tensor, size: Tensor, *, scale: float | None, mask: Tensor | None, dropout_p: float
) -> Tensor:
    """The value-weighted form: ``SDPA(q, k, [v * s | s])[..., :Dv] / [..., Dv]``, heads padded to a multiple of 8."""
    batch, heads, num, channels = v.shape
    if scale is None:
        scale = q.shape[-1] ** -0.5  # the unpadded head size's
    exact = torch.promote_types(torch.promote_types(size.dtype, v.dtype), torch.float32)
    weight = size.to(exact)
    weight = (weight / weight.amax(dim=-1, keepdim=True)).to(v.dtype)  # (B, N) in (0, 1]: the ratio is unchanged
    weight = weight[:, None, :, None].expand(batch, heads, num, 1)  # (B, H, N, 1)
    width = padded_head_dim(max(channels, q.shape[-1] - 1))
    values = [v * weight, weight]
    if width > channels + 1:
        values.append(v.new_zeros(batch, heads, num, width - channels - 1))
    values_ = torch.cat(values, dim=-1)  # (B, H, N, width)
    if q.shape[-1] != width:
        q = F.pad(q, (0, width - q.shape[-1]))  # (B, H, L, width): zero channels add nothing to the scores
        k = F.pad(k, (0, width - k.shape[-1]))  # (B, H, N, width)
    out = F.scaled_dot_product_attention(q, k, values_, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out[..., :channels] / out[..., channels : channels + 1]  # (B, H, L, Dv)
