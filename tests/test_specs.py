"""Block and denoiser specs: validation, lookup by MRO, and a toy family merged through them."""

from __future__ import annotations

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.adapters.diffusion_layout import describe_denoiser
from tokenmerge.adapters.specs import (
    Argument,
    BlockSpec,
    DenoiserSpec,
    block_call,
    block_spec,
    denoiser_spec,
    register_block_spec,
    register_denoiser_spec,
)
from tokenmerge.placements import KeyValues, ResidualRange, SubLayers
from tokenmerge.policies import FixedRatio, StridedGrid

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")


def hooks_on(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_always_called) for m in model.modules()
    )


# ---------------------------------------------------------------------------- a toy family
class ToyAttention(nn.Module):
    """Self-attention over its one input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.inner(tokens, tokens, tokens, need_weights=False)[0]  # (B, N, C)


class ToyCross(nn.Module):
    """Cross-attention of the tokens to a context of another width."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, 2, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, tokens: Tensor, context: Tensor) -> Tensor:
        return self.inner(tokens, context, context, need_weights=False)[0]  # (B, N, C)


class ToyBlock(nn.Module):
    """A block called ``block(x, context=..., mask=...)`` with sub-layers named unlike diffusers' or timm's."""

    def __init__(self, dim: int = 16, context_dim: int = 8) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = ToyAttention(dim)
        self.cross = ToyCross(dim, context_dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if context is not None:
            x = x + self.cross(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class ToyTupleBlock(ToyBlock):
    """The same block returning ``(context, x)``: the image stream second."""

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> tuple:  # type: ignore[override]
        return context, super().forward(x, context, mask)


class ToyDenoiser(ModelMixin, ConfigMixin):
    """A patch transformer called ``model(latent, t, context)`` whose blocks sit in ``layers``."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self, channels: int = 4, dim: int = 16, depth: int = 3, patch: int = 2, context_dim: int = 8, tuple_blocks=False
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        block = ToyTupleBlock if tuple_blocks else ToyBlock
        self.layers = nn.ModuleList([block(dim, context_dim) for _ in range(depth)])
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, latent: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = latent.shape
        p = self.config.patch
        x = self.embed(latent).flatten(2).transpose(1, 2)  # (B, N, dim), N = (h/p)(w/p)
        for block in self.layers:
            out = block(x, context=context)
            x = out[1] if isinstance(out, tuple) else out
        x = self.out(x).transpose(1, 2).reshape(b, c * p * p, h // p, w // p)  # (B, c p p, h/p, w/p)
        return nn.functional.pixel_shuffle(x, p)  # (B, c, h, w)


TOY_SPEC = BlockSpec(
    hidden="x",
    context="context",
    mask="mask",
    self_attention="self_attn",
    cross_attention="cross",
    feed_forward="ffn",
    sublayer_input="tokens",
    key_value_argument=None,
)
register_block_spec(ToyBlock, TOY_SPEC)
register_block_spec(ToyTupleBlock, BlockSpec(**{**TOY_SPEC.__dict__, "hidden_output": 1, "context_output": 0}))
register_denoiser_spec(
    ToyDenoiser,
    DenoiserSpec("toy", blocks="layers", patch_size="patch", latent="latent", timestep="t"),
)


def toy(tuple_blocks: bool = False) -> tuple[ToyDenoiser, tuple[Tensor, Tensor, Tensor]]:
    torch.manual_seed(0)
    model = ToyDenoiser(tuple_blocks=tuple_blocks).eval()
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 5, 8))  # latent 16x16: an 8x8 token grid
    return model, inputs


def run(model: nn.Module, inputs: tuple) -> Tensor:
    with torch.no_grad():
        return model(inputs[0], inputs[1], context=inputs[2])


def config(placement) -> MergeConfig:
    return MergeConfig(matcher=StridedGrid(2, 2), threshold=FixedRatio(0.5), seed=0, placement=placement)


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BlockSpec(hidden="not a name"), "BlockSpec.hidden must be None or an identifier"),
        (lambda: BlockSpec(context=3), "BlockSpec.context must be None or an identifier"),
        (lambda: BlockSpec(hidden_output=True), "BlockSpec.hidden_output must be None or an int >= 0"),
        (lambda: BlockSpec(hidden_output=0, context_output=0), "BlockSpec.context_output must differ"),
        (lambda: BlockSpec(sublayer_input=None), "BlockSpec.sublayer_input must be an identifier"),
        (lambda: DenoiserSpec(""), "DenoiserSpec.kind must be a non-empty str"),
        (lambda: DenoiserSpec("x", patch_size=0), "DenoiserSpec.patch_size must be an int >= 1"),
        (lambda: DenoiserSpec("x", blocks=3), "DenoiserSpec.blocks must be an attribute name"),
        (lambda: DenoiserSpec("x", placements=(int,)), "DenoiserSpec.placements must be a non-empty tuple"),
        (lambda: register_block_spec(ToyBlock, BlockSpec()), "BlockSpec.hidden 'hidden_states' is not an argument"),
        (lambda: register_block_spec(ToyBlock(), TOY_SPEC), "block_cls must be a class"),
        (lambda: register_denoiser_spec(ToyDenoiser, TOY_SPEC), "spec must be a tokenmerge.adapters.specs.Denoiser"),
    ],
    ids=range(12),
)
def test_specs_name_the_bad_field(make, message: str) -> None:
    with pytest.raises(TokenMergeError, match=message):
        make()
    assert block_spec(ToyBlock) is TOY_SPEC  # a refused registration changes nothing


def test_lookup_follows_the_mro() -> None:
    class Derived(ToyBlock):
        pass

    class Unrelated(nn.Module):
        pass

    assert block_spec(Derived) is TOY_SPEC and block_spec(Derived()) is TOY_SPEC  # inherited
    assert block_spec(ToyTupleBlock).hidden_output == 1  # its own row wins over its parent's
    assert block_spec(Unrelated) is None
    assert block_spec(BasicTransformerBlock) == BlockSpec()
    assert denoiser_spec(ToyDenoiser).kind == "toy"
    own = register_block_spec(Derived, BlockSpec(hidden="x", context=None, mask=None, self_attention="self_attn"))
    assert block_spec(Derived) is own and block_spec(ToyBlock) is TOY_SPEC


def test_block_call_reads_and_replaces_arguments_by_position_or_name() -> None:
    call = block_call(ToyBlock())
    assert (call.hidden, call.context, call.mask, call.rotary) == (
        Argument("x", 0),
        Argument("context", 1),
        Argument("mask", 2),
        None,
    )
    assert call.context.get(("a",), {"context": "c"}) == "c" and call.context.get(("a", "b"), {}) == "b"
    assert call.mask.replace(("a",), {}, "m") == (("a",), {"mask": "m"})
    assert call.hidden.replace(("a", "b"), {}, "z") == (("z", "b"), {})
    tuple_call = block_call(ToyTupleBlock())
    image = torch.zeros(1, 2, 3)
    assert tuple_call.image_output(("text", image)) is image and tuple_call.image_output(image) is None
    assert tuple_call.with_image_output(("text", image), "new") == ("text", "new")


def test_the_toy_denoiser_is_described_by_its_rows() -> None:
    model, _ = toy()
    layout = describe_denoiser(model)
    assert layout is not None and layout.kind == "toy" and layout.patch_size == 2
    assert [site.name for site in layout.sites] == ["layers.0", "layers.1", "layers.2"]
    assert (layout.latent_name, layout.latent_index, layout.timestep_name, layout.timestep_index) == (
        "latent",
        0,
        "t",
        1,
    )
    assert layout.sites[0].sublayer("cross_attention") is model.layers[0].cross


# ---------------------------------------------------------------------------- merging through specs
def test_toy_blocks_merge_through_the_diffusers_sub_layer_path_as_through_the_generic_one() -> None:
    model, inputs = toy()
    plain = run(model, inputs)
    placement = SubLayers(attn=True, cross_attn=True, mlp=True)
    with tokenmerge.apply(model, config(placement)) as handle:
        assert handle.adapter.name == "diffusers"
        through_diffusers = run(model, inputs)
        assert handle.state.merged_tokens["layers.0"] == (64, 32)
    assert torch.equal(run(model, inputs), plain) and hooks_on(model) == 0
    generic = SubLayers(attn=True, cross_attn=True, mlp=True, grid=(8, 8))
    with tokenmerge.apply(model.layers, config(generic)) as handle:  # the ModuleList: the generic adapter
        assert handle.adapter.name == "blocks"
        through_generic = run(model, inputs)
        assert handle.state.merged_tokens["blocks.0"] == (64, 32)
    assert not torch.equal(through_diffusers, plain)
    assert torch.equal(through_diffusers, through_generic)
    assert torch.equal(run(model, inputs), plain) and hooks_on(model) == 0


@pytest.mark.parametrize("tuple_blocks", [False, True], ids=["tensor-output", "tuple-output"])
def test_toy_blocks_merge_their_residual_stream_over_a_range(tuple_blocks: bool) -> None:
    model, inputs = toy(tuple_blocks)
    plain = run(model, inputs)
    with tokenmerge.apply(model, config(ResidualRange(1, 2))) as handle:
        merged = run(model, inputs)
        assert handle.state.merged_tokens["layers.1-2"] == (64, 32)
    assert merged.shape == plain.shape and not torch.equal(merged, plain)
    assert torch.equal(run(model, inputs), plain) and hooks_on(model) == 0


def test_a_spec_without_a_key_value_argument_refuses_key_values() -> None:
    model, inputs = toy()
    plain = run(model, inputs)
    with pytest.raises(TokenMergeError, match="placement KeyValues needs a self-attention .*ToyBlock at layers.0"):
        tokenmerge.apply(model, config(KeyValues()))
    assert hooks_on(model) == 0 and torch.equal(run(model, inputs), plain)


def test_a_stack_of_spec_blocks_merges_through_the_generic_adapter() -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(ToyBlock(), ToyBlock()).eval()  # called as block(x): no context
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        plain = stack(x)
        with tokenmerge.apply(stack, config(SubLayers(attn=True, mlp=True))) as handle:
            merged = stack(x)
            assert handle.adapter.name == "blocks" and handle.state.merged_tokens["blocks.1"] == (64, 32)
        assert not torch.equal(merged, plain) and torch.equal(stack(x), plain)
