"""Flux.1 (MM-DiT, double- and single-stream blocks, rotary embeddings, packed latents) under every preset.

A tiny `FluxTransformer2DModel` built in code (two double-stream and two single-stream
blocks) and a `FluxPipeline` driven with ``prompt_embeds``: merging happens (fewer FLOPs),
ratio 0 and ``remove()`` are bitwise, text tokens never merge, rotary positions follow
the merged tokens (an exactness oracle), the packed latent's grid comes from ``img_ids``,
steps are tracked on the flow-matching schedule (the model gets ``t / 1000``; Flux-dev's
guidance embedding makes one call per step) and seeds repeat across pipeline calls.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.adapters.diffusion_joint import apply_rotary
from tokenmerge.adapters.diffusion_steps import StepTracker
from tokenmerge.placements import ResidualRange
from tokenmerge.policies import FixedRatio, MergeContext, RandomGrid, RecomputeAt, StridedGrid
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

BLOCKS = 4  # two double-stream + two single-stream
TEXT = 5


def range_config(first: int, last: int, prop_attn: bool = True, ratio: float = 0.5) -> MergeConfig:
    return MergeConfig(
        matcher=RandomGrid(2, 2), threshold=FixedRatio(ratio), placement=ResidualRange(first, last, prop_attn), seed=0
    )


PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-mlp": lambda: tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "range-double-single": lambda: range_config(1, 2),
    "range-single": lambda: range_config(2, 3, prop_attn=False),
}


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return tiny.tiny_flux()


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def flops(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one call, attention included (the math SDPA kernel: matmuls the counter sees on a CPU)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(model, inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(flux, name):
    inputs = tiny.flux_inputs(batch=2, height=8, width=8, text=TEXT)
    plain, plain_flops = run(flux, inputs), flops(flux, inputs)
    params = {k: v.clone() for k, v in flux.state_dict().items()}
    handle = tokenmerge.apply(flux, PRESETS[name]())
    merged, merged_flops = run(flux, inputs), flops(flux, inputs)
    assert merged_flops < plain_flops, (merged_flops, plain_flops)
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert handle.state.merged_tokens  # every merging layer reports (tokens in, tokens out)
    for tokens_in, tokens_out in handle.state.merged_tokens.values():
        assert tokens_out < tokens_in
    handle.remove()
    assert torch.equal(run(flux, inputs), plain)
    assert all(torch.equal(v, params[k]) for k, v in flux.state_dict().items())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 3, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_the_plain_model_bitwise(flux, config):
    inputs = tiny.flux_inputs(batch=2, height=6, width=10, text=TEXT)
    plain = run(flux, inputs)
    with tokenmerge.apply(flux, config):
        assert torch.equal(run(flux, inputs), plain)


def test_the_grid_comes_from_img_ids(flux):
    """A packed 6 x 10 latent: the plan sees a 6 x 10 grid, not a square guess."""
    seen: list[tuple[int, ...]] = []

    class Recorder(RandomGrid):
        def match(self, metric: torch.Tensor, ctx: MergeContext) -> Any:
            seen.append(ctx.grid)
            return super().match(metric, ctx)

    config = tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=Recorder(2, 2))
    with tokenmerge.apply(flux, config):
        run(flux, tiny.flux_inputs(height=6, width=10, text=TEXT))
    assert seen and all(grid == (6, 10) for grid in seen)


def test_text_tokens_never_merge(flux):
    """Single-stream attention input: the text rows after the merge are the text rows before it, bitwise."""
    inputs = tiny.flux_inputs(batch=2, height=8, width=8, text=TEXT)
    attn = flux.single_transformer_blocks[0].attn
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    with tokenmerge.apply(flux, tokenmerge.ToMeSD(0.5, seed=0)):
        hooks = [
            attn.register_forward_pre_hook(
                lambda m, a, k: before.append(k["hidden_states"]), with_kwargs=True, prepend=True
            ),
            attn.register_forward_pre_hook(lambda m, a, k: after.append(k["hidden_states"]), with_kwargs=True),
        ]
        double_out: list[Any] = []
        hooks.append(flux.transformer_blocks[0].register_forward_hook(lambda m, a, o: double_out.append(o)))
        run(flux, inputs)
        for h in hooks:
            h.remove()
    assert before[0].shape[1] == TEXT + 64 and after[0].shape[1] == TEXT + 32
    assert torch.equal(after[0][:, :TEXT], before[0][:, :TEXT])
    text_out, image_out = double_out[0]
    assert text_out.shape[1] == TEXT and image_out.shape[1] == 64  # both streams whole after the block


def test_rotary_matches_diffusers_per_token():
    from diffusers.models.embeddings import apply_rotary_emb

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=gen)
    cos, sin = torch.randn(7, 8, generator=gen), torch.randn(7, 8, generator=gen)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))
    batched = apply_rotary(x, cos.expand(2, 7, 8), sin.expand(2, 7, 8))
    assert torch.equal(batched, apply_rotary_emb(x, (cos, sin), sequence_dim=1))


def duplicated_cells(batch: int = 1, grid: int = 8) -> dict[str, Any]:
    """Flux inputs whose 2x2 token cells are identical tokens at identical rotary positions.

    Every block computes the same thing for the four tokens of a cell, so merging each
    cell into one token of size 4 is exact with proportional attention: rotary tables
    must follow the merge (the merged token at its destination's position) through the
    double- and single-stream blocks.
    """
    inputs = tiny.flux_inputs(batch=batch, height=grid, width=grid, text=TEXT)
    cells = torch.randn(batch, grid // 2, grid // 2, 16, generator=torch.Generator().manual_seed(3))
    tokens = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(batch, grid * grid, 16)
    rows = (torch.arange(grid) // 2).repeat_interleave(grid)
    cols = (torch.arange(grid) // 2).repeat(grid)
    inputs["hidden_states"] = tokens
    inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], 1).float()  # a cell shares a position
    return inputs


def test_merged_tokens_keep_their_rotary_position_exactly(flux, monkeypatch):
    monkeypatch.setattr(StepTracker, "_grid_of_ids", lambda self, ids: (8, 8))  # the ids repeat per cell
    inputs = duplicated_cells(batch=2)
    plain = run(flux, inputs)
    every_cell = dict(matcher=StridedGrid(2, 2), threshold=FixedRatio(0.75), seed=0)
    with tokenmerge.apply(flux, MergeConfig(**every_cell, placement=ResidualRange(0, BLOCKS - 1))) as handle:
        merged = run(flux, inputs)
        assert handle.state.merged_tokens == {"transformer_blocks.0-3": (64, 16)}
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-4)
    without = MergeConfig(**every_cell, placement=ResidualRange(0, BLOCKS - 1, prop_attn=False))
    with tokenmerge.apply(flux, without):
        assert (run(flux, inputs) - plain).abs().max() > 1e-3  # the oracle can fail


def test_bad_configs_are_refused_at_apply_and_leave_the_model(flux):
    inputs = tiny.flux_inputs(text=TEXT)
    plain = run(flux, inputs)
    for config, message in (
        (tokenmerge.ToMeSD(0.5, merge_crossattn=True), "no cross-attention"),
        (range_config(1, BLOCKS), "ResidualRange.last must lie within"),
    ):
        with pytest.raises(TokenMergeError, match=message):
            tokenmerge.apply(flux, config)
        assert torch.equal(run(flux, inputs), plain)
    flux.transformer_blocks[0].attn.fuse_projections()
    try:
        with pytest.raises(TokenMergeError, match="fuse"):
            tokenmerge.apply(flux, tokenmerge.ToDo(2))
    finally:
        flux.transformer_blocks[0].attn.unfuse_projections()
    assert torch.equal(run(flux, inputs), plain)


class SpyRecomputeAt(RecomputeAt):
    """CA-ToMe's cache, recording the (step, call) of every plan it stores."""

    def __init__(self, steps: Any) -> None:
        super().__init__(steps)
        self.computed_at: list[tuple[int | None, int]] = []

    def store(self, key: Any, plan: Any, metric: Any, ctx: MergeContext, protected: int = 0) -> Any:
        self.computed_at.append((ctx.step, ctx.call_index))
        return super().store(key, plan, metric, ctx, protected)

    def reset(self) -> None:
        super().reset()
        self.computed_at = []


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev-guidance"])
def test_pipeline_steps_caches_and_seeds(guidance_embeds):
    pipe = tiny.tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=gen)
    pooled = torch.randn(1, tiny.FLUX_POOLED_DIM, generator=gen)

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            height=64,
            width=96,
            num_inference_steps=4,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images

    config = tokenmerge.CAToMe(threshold=0.0, recompute_at=(0, 2), seed=0).replace(cache=SpyRecomputeAt((0, 2)))
    handle = tokenmerge.apply(pipe, config)
    first = generate()
    # Plans at steps 0 and 2 only, one call per step: the timestep (t / 1000) is placed on the schedule.
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert handle.state.merged_tokens["transformer_blocks.0"][0] == 24  # 64 x 96 px -> 8 x 12 latent -> 4 x 6
    second = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS  # a new call starts afresh
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        a, b = generate(), generate()
    assert torch.equal(a, b)
