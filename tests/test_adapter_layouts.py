"""Every adapter describes its tokens to the runtime by a `TokenLayout` per block call.

A recording matcher stores, for every plan, the layer, ``ctx.grid``, the metric's token
count (all N, and the mergeable span the matching sees) and the protected prefix: UNet
levels get their ``(h, w)`` on a non-square latent, DiT/PixArt ``(H/p, W/p)``, a ViT's
first merging block its patch grid ``(h, w)`` with the prefix protected and later blocks
a sequence ``(n,)``; generic stacks ``SubLayers.grid`` (or a square) after
``SubLayers.protected``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.adapters.blocks import stack_layout
from tokenmerge.adapters.diffusion_layout import describe_denoiser
from tokenmerge.adapters.vit import merge_record
from tokenmerge.layout import TokenLayout
from tokenmerge.placements import ResidualRange, SubLayers, TokenStream
from tokenmerge.policies import AlternatingBipartite, FixedCount, FixedRatio, Matcher, RandomGrid, StridedGrid
from tokenmerge.policies.base import Matching, MergeContext, ThresholdPolicy
from tokenmerge.state import MergeState, legacy_layout
from tokenmerge.tools import tiny


@dataclass(frozen=True)
class Seen:
    """One plan the recording matcher built."""

    layer: str
    grid: tuple[int, ...] | None
    num_tokens: int  # N of the metric, protected tokens included
    num_mergeable: int  # the span the matching compares (ctx.num_tokens)
    prefix: int


class Recorder(Matcher):
    """A user matcher that records what every plan was asked for, then matches like ``inner``."""

    def __init__(self, inner: Matcher | None = None) -> None:
        self.inner = inner or AlternatingBipartite()
        self.max_ratio = self.inner.max_ratio
        self.seen: list[Seen] = []

    def build_plan(self, metric: Tensor, ctx: MergeContext, threshold: ThresholdPolicy, protected: Any = 0) -> Any:
        prefix = protected.prefix if isinstance(protected, TokenLayout) else protected
        self.seen.append(Seen(ctx.layer, ctx.grid, metric.shape[1], ctx.num_tokens, prefix))
        return super().build_plan(metric, ctx, threshold, protected)

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        assert metric.shape[1] == ctx.num_tokens  # the span only
        return self.inner.match(metric, ctx)


def _recorded(handle: tokenmerge.MergeHandle) -> dict[str, list[Seen]]:
    by_layer: dict[str, list[Seen]] = {}
    for seen in handle.state.config.matcher.seen:
        by_layer.setdefault(seen.layer, []).append(seen)
    return by_layer


# ---------------------------------------------------------------------------- diffusers
def test_unet_levels_get_their_own_grid_on_a_non_square_latent() -> None:
    unet = tiny.tiny_sd_unet()
    config = MergeConfig(matcher=Recorder(), threshold=FixedRatio(0.5), placement=SubLayers(max_downsample=4), seed=0)
    sample = torch.randn(1, 4, 16, 24)
    text = tiny.tiny_prompt_embeds(1)
    with torch.no_grad(), tokenmerge.apply(unet, config) as handle:
        unet(sample, torch.tensor(500), encoder_hidden_states=text)
        seen = _recorded(handle)
    levels = {site.name: site.level for site in describe_denoiser(unet).sites}
    assert set(seen) == set(levels)  # every transformer block planned, by its module path
    grids = set()
    for name, calls in seen.items():
        scale = 2 ** levels[name]
        expected = (16 // scale, 24 // scale)
        assert [(s.grid, s.num_tokens, s.num_mergeable, s.prefix) for s in calls] == [
            (expected, expected[0] * expected[1], expected[0] * expected[1], 0)
        ]
        grids.add(expected)
    assert grids == {(16, 24), (8, 12), (4, 6)}  # three levels, none of them square


@pytest.mark.parametrize("placement", [SubLayers(), ResidualRange(1, 2)], ids=["sub-layers", "residual-range"])
def test_pixart_blocks_get_the_patch_grid_of_a_non_square_latent(placement: Any) -> None:
    model = tiny.tiny_pixart()
    config = MergeConfig(matcher=Recorder(), threshold=FixedRatio(0.5), placement=placement, seed=0)
    caption = torch.randn(1, 5, tiny.CAPTION_DIM)
    with torch.no_grad(), tokenmerge.apply(model, config) as handle:
        model(
            torch.randn(1, 4, 16, 24),
            encoder_hidden_states=caption,
            timestep=torch.tensor([500]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
        seen = [s for calls in _recorded(handle).values() for s in calls]
    assert seen and all((s.grid, s.num_tokens, s.prefix) == ((8, 12), 96, 0) for s in seen)  # (H/p, W/p), p = 2
    assert len(seen) == (1 if isinstance(placement, ResidualRange) else len(model.transformer_blocks))


def test_dit_blocks_get_the_patch_grid() -> None:
    model = tiny.tiny_dit(sample_size=24)
    config = MergeConfig(matcher=Recorder(), threshold=FixedRatio(0.5), placement=ResidualRange(0, 3), seed=0)
    with torch.no_grad(), tokenmerge.apply(model, config) as handle:
        model(torch.randn(2, 4, 24, 24), timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
        seen = _recorded(handle)
    assert seen == {"transformer_blocks.0-3": [Seen("transformer_blocks.0-3", (12, 12), 144, 144, 0)]}


# ---------------------------------------------------------------------------- timm ViTs
def _vit(timm_tiny_vit: Callable[..., nn.Module]) -> nn.Module:
    # A class token and two register tokens; 32 x 48 px in 4 px patches: an 8 x 12 grid.
    return timm_tiny_vit(img_size=(32, 48), reg_tokens=2)


def test_vit_first_block_gets_the_patch_grid_and_later_blocks_a_sequence(
    timm_tiny_vit: Callable[..., nn.Module],
) -> None:
    model = _vit(timm_tiny_vit)
    assert model.num_prefix_tokens == 3
    config = MergeConfig(matcher=Recorder(), threshold=FixedCount(5), mode="weighted", placement=TokenStream())
    with torch.no_grad(), tokenmerge.apply(model, config) as handle:
        model(torch.randn(2, 3, 32, 48))
        seen = _recorded(handle)
    expected = [Seen("blocks.0", (8, 12), 3 + 96, 96, 3)]
    expected += [Seen(f"blocks.{i}", (96 - 5 * i,), 3 + 96 - 5 * i, 96 - 5 * i, 3) for i in range(1, 4)]
    assert [calls for calls in seen.values()] == [[s] for s in expected]


def test_vit_prefix_tokens_are_bitwise_unchanged_by_every_merge(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = _vit(timm_tiny_vit)
    before: list[Tensor] = []
    after: list[Tensor] = []
    # Registered before apply, a norm2 pre-hook sees the stream as it enters the merge; after, the merged stream.
    user = [block.norm2.register_forward_pre_hook(lambda _, args: before.append(args[0])) for block in model.blocks]
    config = tokenmerge.ToMe(r=8, trace_source=True)
    with torch.no_grad(), tokenmerge.apply(model, config):
        user += [block.norm2.register_forward_pre_hook(lambda _, args: after.append(args[0])) for block in model.blocks]
        model(torch.randn(2, 3, 32, 48))
        record = merge_record(model)
    for handle in user:
        handle.remove()
    assert len(before) == len(after) == len(model.blocks)
    for entering, merged in zip(before, after, strict=True):
        assert merged.shape[1] == entering.shape[1] - 8  # every block merged
        assert torch.equal(merged[:, :3], entering[:, :3])  # class + registers: bitwise, in place
    assert record is not None and record.num_tokens == 3 + 96 - 8 * len(model.blocks)
    assert torch.equal(record.token_map[:, :3], torch.arange(3).expand(2, 3))  # the prefix stays first


@pytest.mark.parametrize("blocks", [None, (0, 1), (1, 3)])
@pytest.mark.parametrize("matcher", [RandomGrid(2, 2), StridedGrid(2, 2)], ids=["RandomGrid", "StridedGrid"])
def test_vit_refuses_grid_matchers_over_several_blocks_at_apply(
    timm_tiny_vit: Callable[..., nn.Module], matcher: Matcher, blocks: tuple[int, int] | None
) -> None:
    model = timm_tiny_vit()
    config = MergeConfig(matcher=matcher, threshold=FixedRatio(0.5), placement=TokenStream(blocks=blocks), seed=0)
    name = type(matcher).__name__
    with pytest.raises(TokenMergeError, match=rf"{name} is a grid matcher.*TokenStream\(blocks=\(i, i\)\)"):
        tokenmerge.apply(model, config)
    assert tokenmerge.get_handle(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_vit_refused_grid_matcher_keeps_the_earlier_config(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=4))
    with torch.no_grad():
        expected = model(x)
    refused = MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), placement=TokenStream(), seed=0)
    with pytest.raises(TokenMergeError, match="RandomGrid is a grid matcher"):
        tokenmerge.apply(model, refused)  # refused in check(), before anything is touched
    assert tokenmerge.get_handle(model) is handle and handle.active
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    handle.remove()


@pytest.mark.parametrize("block", [0, 2])
def test_vit_grid_matcher_in_one_block_merges_cells_of_the_non_square_patch_grid(
    timm_tiny_vit: Callable[..., nn.Module], block: int
) -> None:
    model = _vit(timm_tiny_vit)
    # StridedGrid merging every source is 2 x 2 pooling: each group must be one cell of the 8 x 12 grid.
    config = MergeConfig(
        matcher=StridedGrid(2, 2),
        threshold=FixedRatio(0.75),
        mode="mean",
        placement=TokenStream(blocks=(block, block), trace_source=True),
        seed=0,
    )
    with torch.no_grad(), tokenmerge.apply(model, config):
        out = model(torch.randn(2, 3, 32, 48))
        record = merge_record(model)
    assert bool(out.isfinite().all())
    assert record is not None and record.grid == (8, 12) and record.num_tokens == 3 + 24
    groups = record.patch_groups(batch=2).reshape(2, 8, 12)  # (B, h, w) the merged token of every patch
    cells = groups.reshape(2, 4, 2, 6, 2).permute(0, 1, 3, 2, 4).reshape(2, 24, 4)  # (B, cell, 4 patches)
    assert bool((cells == cells[..., :1]).all())  # one group per 2 x 2 cell
    assert all(len(set(cells[b, :, 0].tolist())) == 24 for b in range(2))


# ---------------------------------------------------------------------------- generic block stacks
def _stack_run(stack: nn.Module, placement: SubLayers, tokens: int, matcher: Matcher | None = None) -> list[Seen]:
    recorder = Recorder(matcher)
    config = MergeConfig(matcher=recorder, threshold=FixedRatio(0.5), placement=placement, seed=0)
    with torch.no_grad(), tokenmerge.apply(stack, config) as handle:
        stack(torch.randn(2, tokens, 16))
        return [s for calls in _recorded(handle).values() for s in calls]


@pytest.mark.parametrize(
    ("placement", "tokens", "grid", "prefix"),
    [
        (SubLayers(protected=1, grid=(4, 6)), 25, (4, 6), 1),
        (SubLayers(protected=2), 18, (4, 4), 2),  # no grid: a square span is a square grid
        (SubLayers(), 15, (15,), 0),  # no grid, not a square: a sequence
    ],
    ids=["grid", "square", "sequence"],
)
def test_block_stack_layout_is_protected_prefix_then_grid(
    block_stack: nn.Module, placement: SubLayers, tokens: int, grid: tuple[int, ...], prefix: int
) -> None:
    seen = _stack_run(block_stack, placement, tokens)
    assert [s.layer for s in seen] == ["blocks.0", "blocks.1", "blocks.2"]
    expected = (grid, tokens, tokens - prefix, prefix)
    assert all((s.grid, s.num_tokens, s.num_mergeable, s.prefix) == expected for s in seen)


def test_block_stack_grid_that_does_not_fit_names_the_field(block_stack: nn.Module) -> None:
    with pytest.raises(TokenMergeError, match=r"SubLayers.grid must cover the 24 tokens after the 1 protected"):
        _stack_run(block_stack, SubLayers(protected=1, grid=(4, 4)), 25)
    config = MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), placement=SubLayers(), seed=0)
    with tokenmerge.apply(block_stack, config), pytest.raises(TokenMergeError, match=r"SubLayers.grid must be given"):
        block_stack(torch.randn(1, 15, 16))  # a grid matcher on 15 tokens: no square, no grid


def test_stack_layout() -> None:
    assert stack_layout(37, 1) == TokenLayout.image(6, 6, prefix=1)
    assert stack_layout(37, 1, (4, 9)) == TokenLayout.image(4, 9, prefix=1)
    assert stack_layout(10) == TokenLayout.sequence(10)
    with pytest.raises(TokenMergeError, match="SubLayers.protected must be less than the block's"):
        stack_layout(3, 3)


# ---------------------------------------------------------------------------- the state's one path
def test_legacy_keywords_become_a_layout_and_plan_like_it() -> None:
    assert legacy_layout(37, (6, 6), 1) == TokenLayout.image(6, 6, prefix=1)
    assert legacy_layout(37, None, 1) == TokenLayout.sequence(36, prefix=1)
    with pytest.raises(TokenMergeError, match=r"grid \(4, 4\) covers 16 tokens but the metric has 36"):
        legacy_layout(37, (4, 4), 1)
    with pytest.raises(TokenMergeError, match=r"protected must be an int in \[0, 37\)"):
        legacy_layout(37, None, 37)
    metric = torch.randn(2, 37, 8)
    plans = []
    for kwargs in ({"grid": (6, 6), "protected": 1}, {"layout": TokenLayout.image(6, 6, prefix=1)}):
        state = MergeState(MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), seed=3))
        plans.append(state.plan("layer", metric, **kwargs))
    assert torch.equal(plans[0].slot, plans[1].slot)


def test_grid_matchers_guess_no_square_when_a_layout_is_given() -> None:
    recorder = Recorder(RandomGrid(2, 2))
    state = MergeState(MergeConfig(matcher=recorder, threshold=FixedRatio(0.5), seed=3))
    metric = torch.randn(1, 64, 8)
    assert state.plan("a", metric, layout=TokenLayout.sequence(64)).r == 0  # a row of 64: no 2 x 2 cell
    assert state.plan("b", metric).r == 32  # the legacy path without a grid: the square guess (8, 8)
    assert [s.grid for s in recorder.seen] == [(64,), None]
