"""Proportional attention: the value-weighted form equals the masked form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.attention import auto_form, padded_head_dim, proportional_attention
from tokenmerge.errors import TokenMergeError


def _inputs(batch=2, heads=3, num=13, dim=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, num, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    size = torch.randint(1, 40, (batch, num), generator=gen).to(torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), size


def _reference(q, k, v, size, scale=None, mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-2, -1) * scale + size.log()[:, None, None, :]
    if mask is not None:
        logits = logits + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask)
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("dim", [7, 16, 64, 63])
@pytest.mark.parametrize("form", ["mask", "value"])
def test_both_forms_are_proportional_attention_in_float64(dim: int, form: str) -> None:
    q, k, v, size = _inputs(dim=dim)
    out = proportional_attention(q, k, v, size, form=form)  # type: ignore[arg-type]
    torch.testing.assert_close(out, _reference(q, k, v, size), rtol=0, atol=1e-10)


def test_value_weighted_form_takes_a_scale_and_a_mask() -> None:
    q, k, v, size = _inputs()
    bool_mask = torch.rand(2, 1, 13, 13, generator=torch.Generator().manual_seed(1)) > 0.3
    bool_mask[..., 0] = True  # every query attends somewhere
    float_mask = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    for mask in (bool_mask, float_mask):
        want = _reference(q, k, v, size, scale=0.3, mask=mask)
        for form in ("mask", "value"):
            out = proportional_attention(q, k, v, size, scale=0.3, mask=mask, form=form)  # type: ignore[arg-type]
            torch.testing.assert_close(out, want, rtol=0, atol=1e-10)


def test_value_weighted_form_handles_large_sizes_and_other_value_widths() -> None:
    q, k, _, size = _inputs(num=9)
    v = torch.randn(2, 3, 9, 24, dtype=torch.float64)
    size = size * 1000  # sizes far above 1 (a token covering many)
    torch.testing.assert_close(proportional_attention(q, k, v, size, form="value"), _reference(q, k, v, size))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_close_to_float64_as_the_masked_form(dtype: torch.dtype) -> None:
    q, k, v, size = _inputs(batch=2, heads=4, num=61, dim=64)
    size[:, :3] = 60.0  # a few big tokens, as after many merges
    want = _reference(q, k, v, size)
    errors = {}
    for form in ("mask", "value"):
        out = proportional_attention(q.to(dtype), k.to(dtype), v.to(dtype), size.float(), form=form)  # type: ignore
        assert out.dtype == dtype
        errors[form] = (out.double() - want).abs().max().item()
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    assert errors["value"] < tolerance, errors
    assert errors["value"] < 4 * errors["mask"] + 1e-3, errors


def test_unit_sizes_are_plain_attention() -> None:
    q, k, v, size = _inputs()
    plain = F.scaled_dot_product_attention(q, k, v)
    out = proportional_attention(q, k, v, torch.ones_like(size), form="value")
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)


def test_auto_form_by_device_and_dropout() -> None:
    assert auto_form(torch.device("cpu"), 64) == "mask"  # the CPU: the masked form measured faster
    assert auto_form(torch.device("meta"), 64) == "mask"
    assert auto_form(torch.device("cuda"), 64) == "value"  # keeps the flash kernel
    assert auto_form(torch.device("cuda"), 64, dropout_p=0.1) == "mask"
    assert auto_form(torch.device("cuda"), 256) == "mask"  # 257 channels: too wide for flash
    assert padded_head_dim(64) == 72 and padded_head_dim(7) == 8 and padded_head_dim(255) == 256


def test_bad_form_and_size_are_refused() -> None:
    q, k, v, size = _inputs()
    with pytest.raises(TokenMergeError, match="form must be one of"):
        proportional_attention(q, k, v, size, form="flash")  # type: ignore[arg-type]
    with pytest.raises(TokenMergeError, match="size must be"):
        proportional_attention(q, k, v, size[:, :-1])


def test_value_weighted_form_compiles_fullgraph() -> None:
    q, k, v, size = _inputs(dtype=torch.float32)
    compiled = torch.compile(lambda *a: proportional_attention(*a, form="value"), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, size.float()), proportional_attention(q, k, v, size.float()))
