"""Value-weighted proportional attention in the residual stream (timm ViT and Eva), checked in float64.

On the CPU the stream passes ``log(size)`` as a mask (`tokenmerge.attention.auto_form`); these tests force the
value-weighted form, which CUDA takes, and compare it with the masked one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_eva_stream import CASES as EVA_CASES
from test_eva_stream import tiny_eva
from torch import nn

import tokenmerge
import tokenmerge.attention as attention
from tokenmerge.adapters import stream_attention

timm = pytest.importorskip("timm")

IMAGE = 32


def tiny_vit(**overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=IMAGE, patch_size=4, depth=3, embed_dim=32, num_heads=2, num_classes=5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**kwargs, **overrides})
    model = model.eval().double().requires_grad_(False)
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.2)
    return model


MODELS = {
    "vit": lambda: tiny_vit(),
    "vit_qk_norm_registers_avg": lambda: tiny_vit(qk_norm=True, reg_tokens=2, global_pool="avg"),
    **{case.name: (lambda case=case: tiny_eva(case.arch, **case.kwargs)) for case in EVA_CASES},
}


@pytest.fixture
def value_form(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the stream take the value-weighted form on the CPU; counts its attention calls."""
    calls: list[int] = []
    monkeypatch.setattr(attention, "auto_form", lambda *a, **k: "value")
    original = stream_attention.proportional_attention

    def counted(*args, **kwargs):
        calls.append(1)
        assert kwargs["form"] == "value"
        return original(*args, **kwargs)

    monkeypatch.setattr(stream_attention, "proportional_attention", counted)
    return calls


def _images() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _masked(name: str, images: torch.Tensor) -> torch.Tensor:
    model = MODELS[name]()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):
        return model(images)


@pytest.mark.parametrize("name", list(MODELS))
def test_value_weighted_stream_equals_the_masked_stream(name: str, value_form: list[int]) -> None:
    images = _images()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "auto_form", lambda *a, **k: "mask")  # the CPU's choice
        masked = _masked(name, images)
    assert not value_form
    model = MODELS[name]()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):
        out = model(images)
    assert len(value_form) == len(model.blocks) - 1  # every block after the first merge
    torch.testing.assert_close(out, masked, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["vit", "eva02_swiglu_rope"])
def test_ratio_zero_and_remove_are_the_plain_model_bit_for_bit(name: str, value_form: list[int]) -> None:
    model = MODELS[name]()
    images = _images()
    plain = model(images)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)):
        assert torch.equal(model(images), plain)
    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=8))
    assert all("forward" in block.attn.__dict__ for block in model.blocks)
    assert not torch.equal(model(images), plain)
    handle.remove()
    assert all("forward" not in block.attn.__dict__ for block in model.blocks)
    assert torch.equal(model(images), plain)
    assert value_form  # the value-weighted form ran while merged


def test_a_deep_copy_is_merged_and_removes_on_its_own(value_form: list[int]) -> None:
    model = tiny_vit()
    images = _images()
    plain = model(images)
    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=8))
    merged = model(images)
    twin = copy.deepcopy(model)
    assert twin.blocks[0].attn.forward.module is twin.blocks[0].attn
    torch.testing.assert_close(twin(images), merged, rtol=0, atol=0)
    tokenmerge.remove(twin)
    assert "forward" not in twin.blocks[1].attn.__dict__ and "forward" in model.blocks[1].attn.__dict__
    assert torch.equal(twin(images), plain)
    handle.remove()


def test_without_prop_attn_no_forward_is_set(value_form: list[int]) -> None:
    model = tiny_vit()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8, prop_attn=False)):
        assert all("forward" not in block.attn.__dict__ for block in model.blocks)
        model(_images())
    assert not value_form


def test_the_value_weighted_stream_compiles_fullgraph(value_form: list[int]) -> None:
    model = tiny_vit().float()
    images = _images().float()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):
        eager = model(images)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(images), eager, rtol=1e-5, atol=1e-5)
        compiled(images.flip(-1))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs <= 2  # fullgraph: one graph (a second once the policy-check cache has filled)
    torch._dynamo.reset()
