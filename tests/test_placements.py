"""Typed placements: validation, the deprecated fields' translation, acceptance and refusal per adapter."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.placements import KeyValues, Placement, ResidualRange, SubLayers, TokenStream
from tokenmerge.policies import AlternatingBipartite, FixedCount, FixedRatio, RandomGrid, StridedGrid


def hooks_on(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_always_called) for m in model.modules()
    )


def grid_config(**fields) -> MergeConfig:
    return MergeConfig(matcher=StridedGrid(2, 2), threshold=FixedRatio(0.5), seed=0, **fields)


# ---------------------------------------------------------------------------- validation
BAD_PLACEMENTS = [
    (lambda: SubLayers(attn=1), "SubLayers.attn must be a bool"),
    (lambda: SubLayers(cross_attn="yes"), "SubLayers.cross_attn must be a bool"),
    (lambda: SubLayers(mlp=0), "SubLayers.mlp must be a bool"),
    (lambda: SubLayers(attn=False), "SubLayers needs attn, cross_attn or mlp"),
    (lambda: SubLayers(max_downsample=3), "SubLayers.max_downsample must be 1, 2, 4 or 8; got 3"),
    (lambda: SubLayers(max_downsample=True), "SubLayers.max_downsample must be 1, 2, 4 or 8; got True"),
    (lambda: SubLayers(protected=-1), "SubLayers.protected must be an int >= 0 and <= 16777216; got -1"),
    (lambda: SubLayers(protected=True), "SubLayers.protected must be an int >= 0 and <= 16777216; got True"),
    (lambda: SubLayers(grid=(0, 4)), "SubLayers.grid must be None or a tuple"),
    (lambda: SubLayers(grid=[4, 4]), "SubLayers.grid must be None or a tuple"),
    (lambda: KeyValues(max_downsample=16), "KeyValues.max_downsample must be 1, 2, 4 or 8; got 16"),
    (lambda: KeyValues(max_downsample=2.0), "KeyValues.max_downsample"),
    (lambda: ResidualRange(-1, 2), "ResidualRange.first must be an int >= 0; got -1"),
    (lambda: ResidualRange(True, 2), "ResidualRange.first must be an int >= 0; got True"),
    (lambda: ResidualRange(3, 1), "ResidualRange.last must be an int >= first \\(3\\); got 1"),
    (lambda: ResidualRange(0, 1, prop_attn=1), "ResidualRange.prop_attn must be a bool"),
    (lambda: TokenStream(blocks=(2, 1)), "TokenStream.blocks must be None or a tuple"),
    (lambda: TokenStream(blocks=(0, True)), "TokenStream.blocks"),
    (lambda: TokenStream(prop_attn=1), "TokenStream.prop_attn must be a bool"),
    (lambda: TokenStream(trace_source=None), "TokenStream.trace_source must be a bool"),
    (lambda: TokenStream(dense=0), "TokenStream.dense must be a bool"),
]


@pytest.mark.parametrize(("make", "message"), BAD_PLACEMENTS, ids=[m for _, m in BAD_PLACEMENTS])
def test_each_placement_names_the_bad_field(make, message: str) -> None:
    with pytest.raises(TokenMergeError, match=message):
        make()


def test_placements_are_frozen_and_describe_their_non_default_fields() -> None:
    placement = SubLayers(mlp=True, max_downsample=2)
    with pytest.raises(AttributeError):
        placement.mlp = False  # type: ignore[misc]
    assert placement.describe() == "SubLayers(mlp=True, max_downsample=2)"
    assert ResidualRange(1, 3).describe() == "ResidualRange(first=1, last=3)"
    assert ResidualRange(1, 3).blocks == (1, 3)
    assert all(issubclass(cls, Placement) for cls in (SubLayers, KeyValues, ResidualRange, TokenStream))


def test_config_placement_must_be_a_placement_and_not_mixed_with_old_fields() -> None:
    with pytest.raises(TokenMergeError, match="placement must be None or a tokenmerge.placements.Placement"):
        grid_config(placement="sub-layers")
    with pytest.raises(TokenMergeError, match="cannot be combined with the deprecated fields merge_mlp=True"):
        grid_config(placement=SubLayers(), merge_mlp=True)
    with pytest.raises(TokenMergeError, match="cannot be combined"):
        grid_config().replace(placement=KeyValues(), kv_only=True)
    with pytest.raises(TokenMergeError, match="no field 'nonsense'"):
        grid_config().replace(nonsense=1)


# ---------------------------------------------------------------------------- deprecation
def test_presets_build_placements_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenmerge.ToMeSD(merge_mlp=True, max_downsample=2).placement == SubLayers(mlp=True, max_downsample=2)
        assert tokenmerge.CAToMe(merge_crossattn=True).placement == SubLayers(cross_attn=True)
        assert tokenmerge.ToMe(8, prop_attn=False, trace_source=True).placement == TokenStream(
            prop_attn=False, trace_source=True
        )
        assert tokenmerge.ToDo(max_downsample=4).placement == KeyValues(max_downsample=4)
        grid_config(placement=ResidualRange(0, 1)).replace(seed=3)
    for value in (1, 0, 2, "no"):  # bools only: tomesd's 0/1 too (a truthy "no" would turn it on)
        with pytest.raises(TokenMergeError, match=f"merge_mlp must be True or False; got {value!r}"):
            tokenmerge.ToMeSD(merge_mlp=value)


@pytest.mark.parametrize(
    "fields",
    [
        {"merge_mlp": True},
        {"merge_attn": False, "merge_crossattn": True},
        {"max_downsample": 2},
        {"blocks": (0, 1)},
        {"prop_attn": False},
        {"trace_source": True},
        {"kv_only": True},
        {"options": {"protected": 1}},
    ],
    ids=lambda fields: ",".join(fields),
)
def test_old_fields_warn_when_set_and_read_back(fields) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated: pass placement="):
        config = grid_config(**fields)
    assert config.placement is None
    assert all(getattr(config, name) == value for name, value in fields.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid_config(merge_attn=True, kv_only=False, options={})  # the old defaults: no warning
        config.replace(seed=4)  # the old fields carried over: no new warning


def test_old_fields_read_back_what_a_placement_amounts_to() -> None:
    config = grid_config(placement=SubLayers(cross_attn=True, mlp=True, max_downsample=4, protected=1))
    assert (config.merge_attn, config.merge_crossattn, config.merge_mlp, config.max_downsample) == (True, True, True, 4)
    assert config.options == {"protected": 1} and config.blocks is None and not config.kv_only
    assert tokenmerge.ToDo().kv_only and tokenmerge.ToDo().max_downsample == 1
    assert grid_config(placement=ResidualRange(2, 5, prop_attn=False)).blocks == (2, 5)
    stream = grid_config(placement=TokenStream(blocks=(1, 2), dense=False, trace_source=True))
    assert stream.blocks == (1, 2) and stream.options == {"dense": False} and stream.trace_source


TRANSLATIONS = [
    ({}, SubLayers, SubLayers()),
    ({"merge_mlp": True, "max_downsample": 2}, SubLayers, SubLayers(mlp=True, max_downsample=2)),
    ({"options": {"protected": 1, "grid": (4, 4)}}, SubLayers, SubLayers(protected=1, grid=(4, 4))),
    ({"kv_only": True, "max_downsample": 4}, SubLayers, KeyValues(max_downsample=4)),
    ({"blocks": (1, 2), "prop_attn": False}, SubLayers, ResidualRange(1, 2, prop_attn=False)),
    ({}, TokenStream, TokenStream()),
    ({"blocks": (1, 2), "trace_source": True}, TokenStream, TokenStream(blocks=(1, 2), trace_source=True)),
    ({"options": {"dense": False}, "merge_mlp": True}, TokenStream, TokenStream(dense=False)),
]


@pytest.mark.parametrize(("fields", "default", "expected"), TRANSLATIONS, ids=[str(e) for _, _, e in TRANSLATIONS])
def test_old_fields_translate_to_the_family_placement(fields, default, expected) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = grid_config(**fields)
    assert config.placement_for(default) == expected


# ---------------------------------------------------------------------------- same behaviour
def _legacy(**fields) -> dict:
    return fields


def _with_warnings_ignored(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return make()


def test_block_stack_old_fields_and_placement_give_bitwise_equal_outputs(block_stack) -> None:
    x = torch.randn(2, 1 + 64, 16)  # (B, 1 + 8*8, C): one protected prefix token
    base = dict(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), seed=0)
    old = _with_warnings_ignored(lambda: MergeConfig(**base, merge_mlp=True, options={"protected": 1, "grid": (8, 8)}))
    new = MergeConfig(**base, placement=SubLayers(mlp=True, protected=1, grid=(8, 8)))
    outputs = []
    for config in (old, new):
        with torch.no_grad(), tokenmerge.apply(block_stack, config) as handle:
            outputs.append(block_stack(x))
            assert handle.state.merged_tokens["blocks.0"] == (65, 65 - 32)
    assert torch.equal(outputs[0], outputs[1])


DIFFUSERS_PAIRS = [
    ("sd_unet", _legacy(merge_crossattn=True, merge_mlp=True, max_downsample=2), SubLayers(True, True, True, 2)),
    ("sd_unet", _legacy(kv_only=True), KeyValues()),
    ("dit_pipeline", _legacy(blocks=(1, 2), mode="weighted"), ResidualRange(1, 2)),
    ("pixart_pipeline", _legacy(blocks=(0, 3), prop_attn=False), ResidualRange(0, 3, prop_attn=False)),
]


@pytest.mark.parametrize(
    ("model", "old", "placement"), DIFFUSERS_PAIRS, ids=[f"{m}-{p!r}" for m, _, p in DIFFUSERS_PAIRS]
)
@pytest.mark.usefixtures("diffusers_one_thread")
def test_diffusers_old_fields_and_placement_give_bitwise_equal_outputs(diffusers_tiny, model, old, placement) -> None:
    case = diffusers_tiny(model)
    plain = case.run()
    mode = old.pop("mode", "mean")
    legacy = _with_warnings_ignored(lambda: grid_config(mode=mode, **old))
    typed = grid_config(mode=mode, placement=placement)
    outputs = []
    for config in (legacy, typed):
        with tokenmerge.apply(case.target, config):
            outputs.append(case.run())
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], plain)
    assert torch.equal(case.run(), plain)


def test_timm_vit_old_fields_and_placement_give_bitwise_equal_outputs(timm_tiny_vit) -> None:
    model = timm_tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    base = dict(matcher=AlternatingBipartite(), threshold=FixedCount(4), mode="weighted")
    old = _with_warnings_ignored(
        lambda: MergeConfig(**base, blocks=(1, 3), prop_attn=False, trace_source=True, options={"dense": False})
    )
    new = MergeConfig(**base, placement=TokenStream(blocks=(1, 3), prop_attn=False, trace_source=True, dense=False))
    outputs = []
    for config in (old, new):
        with torch.no_grad(), tokenmerge.apply(model, config):
            outputs.append((model(images), model.forward_features(images)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert outputs[0][1].shape[1] < 1 + 64  # dense=False: the merged tokens


# ---------------------------------------------------------------------------- refusal
@pytest.mark.parametrize(
    ("model", "placement", "accepts"),
    [
        ("sd_unet", ResidualRange(0, 1), "SubLayers, KeyValues"),
        ("sdxl_unet", TokenStream(), "SubLayers, KeyValues"),
        ("dit_pipeline", TokenStream(), "SubLayers, KeyValues, ResidualRange"),
    ],
    ids=["unet-range", "sdxl-stream", "dit-stream"],
)
@pytest.mark.usefixtures("diffusers_one_thread")
def test_diffusers_refuse_placements_they_cannot_honour(diffusers_tiny, model, placement, accepts) -> None:
    case = diffusers_tiny(model)
    plain = case.run()
    with pytest.raises(TokenMergeError, match=f"placement {type(placement).__name__}.*it accepts {accepts}$"):
        tokenmerge.apply(case.target, grid_config(placement=placement))
    assert hooks_on(case.denoiser) == 0 and tokenmerge.get_handle(case.target) is None
    assert torch.equal(case.run(), plain)


@pytest.mark.usefixtures("diffusers_one_thread")
def test_diffusers_refuse_what_their_blocks_lack(diffusers_tiny) -> None:
    case = diffusers_tiny("dit_pipeline")
    plain = case.run()
    for placement, message in (
        (SubLayers(cross_attn=True), "merge_crossattn must be False for DiTTransformer2DModel"),
        (SubLayers(protected=1), "SubLayers.protected and SubLayers.grid are for generic block stacks"),
        (ResidualRange(1, 4), "ResidualRange.last must lie within the model's 4 transformer blocks"),
    ):
        with pytest.raises(TokenMergeError, match=message):
            tokenmerge.apply(case.target, grid_config(placement=placement))
    assert hooks_on(case.denoiser) == 0 and torch.equal(case.run(), plain)


@pytest.mark.parametrize("placement", [SubLayers(), KeyValues(), ResidualRange(0, 1)], ids=repr)
def test_timm_vit_refuses_every_placement_but_the_token_stream(timm_tiny_vit, placement) -> None:
    model = timm_tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
    config = MergeConfig(matcher=AlternatingBipartite(), threshold=FixedCount(2), placement=placement)
    with pytest.raises(TokenMergeError, match="is not supported by a ViT .*it accepts TokenStream$"):
        tokenmerge.apply(model, config)
    assert hooks_on(model) == 0
    with torch.no_grad():
        assert torch.equal(model(images), plain)
    with pytest.raises(TokenMergeError, match="TokenStream.blocks must lie within the model's 4 blocks"):
        tokenmerge.apply(model, config.replace(placement=TokenStream(blocks=(0, 4))))


@pytest.mark.parametrize("placement", [KeyValues(), ResidualRange(0, 1)], ids=repr)
def test_block_stack_refuses_key_values_and_ranges(block_stack, placement) -> None:
    x = torch.randn(1, 64, 16)
    with torch.no_grad():
        plain = block_stack(x)
    with pytest.raises(TokenMergeError, match="is not supported by a block stack; it accepts SubLayers, TokenStream"):
        tokenmerge.apply(block_stack, grid_config(placement=placement))
    with pytest.raises(TokenMergeError, match="merge_crossattn must be False \\(SubLayers.cross_attn\\)"):
        tokenmerge.apply(block_stack, grid_config(placement=SubLayers(cross_attn=True)))
    assert hooks_on(block_stack) == 0
    with torch.no_grad():
        assert torch.equal(block_stack(x), plain)


def test_block_stack_runs_a_token_stream_as_self_attention_merging(block_stack) -> None:
    x = torch.randn(2, 64, 16)
    outputs = []
    base = dict(matcher=AlternatingBipartite(), threshold=FixedCount(8), mode="weighted")
    with pytest.warns(DeprecationWarning, match="TokenStream on a generic block stack runs as SubLayers"):
        handle = tokenmerge.apply(block_stack, MergeConfig(**base, placement=TokenStream()))
    with torch.no_grad(), handle:
        outputs.append(block_stack(x))
    with torch.no_grad(), tokenmerge.apply(block_stack, MergeConfig(**base, placement=SubLayers(attn=True))):
        outputs.append(block_stack(x))
    assert torch.equal(outputs[0], outputs[1])
