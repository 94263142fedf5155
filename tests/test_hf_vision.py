"""Hugging Face transformers vision encoders (ViT, CLIP, SigLIP, DINOv2): ToMe through the shared residual stream.

Tiny models from configs, float64, both attention implementations (``sdpa``, ``eager``). The reference below is
ToMe written here around each layer's own sub-modules on an unpatched copy (`reference_merge` of test_timm_vit:
explicit groups, size-weighted means; ``log(size)`` added to the attention logits through the attention's
``attention_mask``), with the pooled outputs computed from the dense (unmerged) final tokens.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from test_timm_vit import assert_partition, assert_same_snapshot, reference_merge, snapshot, unmerge_tokens
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.adapters.stream import merge_record, unmerge_to_patches
from tokenmerge.placements import TokenStream

T = pytest.importorskip("transformers")

IMAGE, PATCH, LAYERS = 32, 4, 3  # an 8 x 8 grid
SMALL = dict(
    hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=IMAGE,
    patch_size=PATCH,
)  # fmt: skip


@dataclass
class HFCase:
    name: str
    model: Callable[[Any], nn.Module]
    config: Callable[..., Any]
    extra: dict[str, Any]


CASES = [
    HFCase("vit", T.ViTModel, T.ViTConfig, {}),
    HFCase("clip", T.CLIPVisionModel, T.CLIPVisionConfig, {}),
    HFCase("siglip", T.SiglipVisionModel, T.SiglipVisionConfig, {}),
    HFCase("dinov2", T.Dinov2Model, T.Dinov2Config, dict(layerscale_value=0.5)),
    HFCase("dinov2_registers", T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig, dict(num_register_tokens=4)),
    HFCase("dinov2_swiglu", T.Dinov2Model, T.Dinov2Config, dict(use_swiglu_ffn=True)),
]


def build(case: HFCase, attn: str) -> nn.Module:
    torch.manual_seed(0)
    config = case.config(**SMALL, **case.extra)
    config._attn_implementation = attn
    model = case.model(config).eval().double().requires_grad_(False)
    for param in model.parameters():  # larger random weights: outputs that depend clearly on every token
        param.add_(torch.randn_like(param) * 0.1)
    return model


def images(seed: int = 1, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, Any, nn.Module, nn.Module, Any]:
    """(norm1, attention, scale1, norm2, mlp, scale2) of one encoder layer."""
    keep = nn.Identity()
    if hasattr(layer, "layernorm_before"):  # ViTLayer
        return layer.layernorm_before, layer.attention, keep, layer.layernorm_after, layer.mlp, keep
    if hasattr(layer, "layer_norm1"):  # CLIP / SigLIP
        return layer.layer_norm1, layer.self_attn, keep, layer.layer_norm2, layer.mlp, keep
    return layer.norm1, layer.attention, layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2


def reference(model: nn.Module, pixels: Tensor, r: int) -> tuple[Tensor, Tensor | None, list[int]]:
    """ToMe on the unpatched ``model``: dense final tokens (B, N0, C), pooled output, tokens after each layer."""
    x = model.embeddings(pixels)
    if hasattr(model, "pre_layrnorm"):
        x = model.pre_layrnorm(x)
    layers = model.layers if hasattr(model, "layers") else getattr(model.encoder, "layers", None)
    layers = layers if layers is not None else model.encoder.layer
    protected = 0 if isinstance(model, T.SiglipVisionModel) else 1 + getattr(model.config, "num_register_tokens", 0)
    batch, num, _ = x.shape
    size = torch.ones(batch, num, dtype=x.dtype)
    token_map = torch.arange(num).repeat(batch, 1)
    counts = []
    for layer in layers:
        norm1, attn, scale1, norm2, mlp, scale2 = _parts(layer)
        keys: list[Tensor] = []
        grab = attn.k_proj.register_forward_hook(lambda _m, _a, out, keys=keys: keys.append(out))
        bias = size.log()[:, None, None, :] if num < token_map.shape[1] else None
        a, _ = attn(norm1(x), attention_mask=bias)
        grab.remove()
        x = x + scale1(a)
        metric = keys[0].reshape(batch, num, 2, -1).mean(2)  # ToMe's k.mean(heads)
        split = lambda n: (torch.arange(0, n, 2), torch.arange(1, n, 2))  # noqa: E731
        x_new, size_new, _, position = reference_merge(
            x, metric, size, None, protected, split, lambda s: min(r, s.shape[1])
        )
        if x_new.shape[1] < num:
            x, size, num = x_new, size_new, x_new.shape[1]
            token_map = position.gather(1, token_map)
        x = x + scale2(mlp(norm2(x)))
        counts.append(num)
    dense = unmerge_tokens(x, token_map)  # (B, N0, C)
    if isinstance(model, T.ViTModel):
        dense = model.layernorm(dense)
        return dense, model.pooler(dense), counts
    if isinstance(model, T.CLIPVisionModel):
        return dense, model.post_layernorm(dense[:, 0]), counts
    if isinstance(model, T.SiglipVisionModel):
        dense = model.post_layernorm(dense)
        return dense, model.head(dense), counts  # attention pooling over every patch = size-weighted over merged
    dense = model.layernorm(dense)
    return dense, dense[:, 0], counts


def flops(model: nn.Module, pixels: Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    return counter.get_total_flops()


def assert_outputs_equal(a: Any, b: Any) -> None:
    assert list(a.keys()) == list(b.keys())
    for key in a.keys():
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_hf_encoder(case: HFCase, attn: str) -> None:
    model = build(case, attn)
    unpatched = copy.deepcopy(model)
    pixels = images()
    with torch.no_grad():
        plain = model(pixel_values=pixels)
    before = snapshot(model)
    plain_flops = flops(model, pixels)
    r = 8

    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)), torch.no_grad():  # r = 0: bit for bit
        assert_outputs_equal(model(pixel_values=pixels), plain)

    # Default: last_hidden_state merged.
    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=r, trace_source=True))
    with torch.no_grad():
        merged = model(pixel_values=pixels)
    record = merge_record(model)
    num_input = plain.last_hidden_state.shape[1]
    assert record is not None and record.num_input == num_input and record.grid == (8, 8)
    assert merged.last_hidden_state.shape[1] == record.num_tokens < num_input
    assert_partition(record, batch=2)
    assert flops(model, pixels) < plain_flops  # fewer FLOPs
    handle.remove()

    with torch.no_grad():
        dense_ref, pooled_ref, counts = reference(unpatched, pixels, r)
    assert counts[-1] == record.num_tokens
    tol = dict(atol=1e-6, rtol=1e-5)  # sizes (so log(size)) are float32; eager runs its softmax in float32
    patches = unmerge_to_patches(merged.last_hidden_state, record)
    torch.testing.assert_close(patches, dense_ref[:, record.num_prefix :], **tol)
    torch.testing.assert_close(
        merged.last_hidden_state[:, : record.num_prefix], dense_ref[:, : record.num_prefix], **tol
    )
    torch.testing.assert_close(merged.pooler_output, pooled_ref, **tol)
    assert (merged.pooler_output - plain.pooler_output).abs().max() > 1e-6  # merging changed it

    # On request: dense, one row per patch.
    with tokenmerge.apply(model, tokenmerge.ToMe(r=r).replace(placement=TokenStream(dense=True))), torch.no_grad():
        dense = model(pixel_values=pixels)
    assert dense.last_hidden_state.shape == plain.last_hidden_state.shape
    torch.testing.assert_close(dense.last_hidden_state, dense_ref, **tol)
    torch.testing.assert_close(dense.pooler_output, pooled_ref, **tol)

    with torch.no_grad():  # removed: the plain model, bit for bit
        assert_outputs_equal(model(pixel_values=pixels), plain)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    ("model", "config", "extra"),
    [
        (T.ViTForImageClassification, T.ViTConfig, {}),
        (T.CLIPVisionModelWithProjection, T.CLIPVisionConfig, {}),
        (T.Dinov2ForImageClassification, T.Dinov2Config, {}),
        (T.Dinov2WithRegistersForImageClassification, T.Dinov2WithRegistersConfig, dict(num_register_tokens=2)),
    ],
    ids=["vit_classifier", "clip_projection", "dinov2_classifier", "dinov2_registers_classifier"],
)
def test_heads_read_the_pooled_tokens(model: Any, config: Any, extra: dict[str, Any]) -> None:
    """Heads over the class token (ViT, CLIP) or class token + patch mean (DINOv2) give the dense model's result."""
    net = build(HFCase("head", model, config, extra), "sdpa")
    pixels = images(2)
    with torch.no_grad():
        plain = net(pixel_values=pixels)[0]
        with tokenmerge.apply(net, tokenmerge.ToMe(r=8)):
            merged = net(pixel_values=pixels)[0]
        with tokenmerge.apply(net, tokenmerge.ToMe(r=8).replace(placement=TokenStream(dense=True))):
            dense = net(pixel_values=pixels)[0]
    torch.testing.assert_close(merged, dense, atol=1e-10, rtol=1e-9)
    assert (merged - plain).abs().max() > 1e-6


def test_siglip_head_weights_merged_tokens_by_size() -> None:
    """The pooled output over merged tokens needs the head's log(size): without it, it differs."""
    net = build(CASES[2], "sdpa")
    pixels = images(3)
    with torch.no_grad(), tokenmerge.apply(net, tokenmerge.ToMe(r=8)):
        merged = net(pixel_values=pixels)
    with torch.no_grad():  # removed: the plain head over the same merged tokens
        unweighted = net.head(merged.last_hidden_state)
    assert (unweighted - merged.pooler_output).abs().max() > 1e-6


def test_hidden_states_and_blocks_range() -> None:
    net = build(CASES[0], "sdpa")
    config = tokenmerge.ToMe(r=6).replace(placement=TokenStream(blocks=(1, 2)))
    with torch.no_grad(), tokenmerge.apply(net, config):
        out = net(pixel_values=images(4), output_hidden_states=True)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts == [65, 65, 59, 53]


def test_refuses_other_attention_implementations_and_models() -> None:
    net = build(CASES[0], "sdpa")
    net.config._attn_implementation = "flash_attention_2"
    before = snapshot(net)
    with pytest.raises(TokenMergeError, match="attn_implementation"):
        tokenmerge.apply(net, tokenmerge.ToMe(r=4))
    assert_same_snapshot(before, snapshot(net))
    bert = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TokenMergeError, match="ViTModel"):
        tokenmerge.apply(bert, tokenmerge.ToMe(r=4))
    with pytest.raises(TokenMergeError, match="mode must be"):
        tokenmerge.apply(build(CASES[1], "sdpa"), tokenmerge.ToMe(r=4).replace(mode="sum"))


def test_compiles_fullgraph() -> None:
    import torch._dynamo

    net = build(CASES[0], "sdpa").float()
    pixels = images(5).float()
    torch._dynamo.reset()
    with torch.no_grad(), tokenmerge.apply(net, tokenmerge.ToMe(r=8)):
        expected = net(pixel_values=pixels).pooler_output
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(pixel_values=pixels).pooler_output, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_transformers_adapter_is_imported_only_for_transformers_models() -> None:
    code = (
        "import sys, torch, transformers as T, tokenmerge; "
        "m = T.ViTModel(T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=32, image_size=16, patch_size=4)); "
        "before = 'tokenmerge.adapters.hf_vision' in sys.modules; tokenmerge.apply(m, tokenmerge.ToMe(2)); "
        "print(before, 'tokenmerge.adapters.hf_vision' in sys.modules, 'tokenmerge.adapters.vit' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True False"


def test_a_timm_model_does_not_import_transformers() -> None:
    code = (
        "import sys, timm, tokenmerge; "
        "m = timm.create_model('eva02_tiny_patch14_224', pretrained=False, img_size=16, patch_size=4, depth=1, "
        "embed_dim=16, num_heads=2); tokenmerge.apply(m, tokenmerge.ToMe(2)); "
        "print('transformers' in sys.modules, 'tokenmerge.adapters.hf_vision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
