"""Wan 2.1 (video DiT: (frames, rows, columns) token grid, rotary tables, cross-attention) under every preset.

A tiny `WanTransformer3DModel` built in code and a `WanPipeline` driven with
``prompt_embeds`` (no VAE: latents out), whose classifier-free guidance runs the two
branches as separate calls. Grid matchers' cells can span frames (``st``), ToDo pools
keys and values over frames too, and the rotary tables follow the merged tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modern_cases import GridRecorder, check_merges_and_removes, check_ratio_zero, range_config, run, spy_catome

import tokenmerge
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

TEXT = 5
BLOCKS = 2
GRID = (3, 4, 3)  # latent (B, 4, 3, 8, 6) with 1x2x2 patches

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-all": lambda: tokenmerge.ToMeSD(0.5, merge_crossattn=True, merge_mlp=True, seed=0),
    "tomesd-st2": lambda: tokenmerge.ToMeSD(0.6, st=2, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "todo-st2": lambda: tokenmerge.ToDo(2, st=2),
    "range": lambda: range_config(0, 1),
    "range-st2": lambda: range_config(1, 1, prop_attn=False, st=2, ratio=0.7),
}


@pytest.fixture(scope="module")
def wan() -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_wan()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 8, 6, generator=gen),  # (B, C, F, H, W)
        encoder_hidden_states=torch.randn(2, TEXT, tiny.JOINT_TEXT_DIM, generator=gen),
        timestep=torch.tensor([500.0, 500.0]),
    )
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(wan, name):
    check_merges_and_removes(*wan, PRESETS[name]())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 1, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_bitwise(wan, config):
    check_ratio_zero(*wan, config)


def test_the_token_grid_is_frames_rows_columns(wan):
    model, call = wan
    recorder = GridRecorder(2, 2, st=2)
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=recorder)):
        run(call)
    assert recorder.seen and all(grid == GRID for grid in recorder.seen)


def test_todo_pools_keys_and_values_over_frames(wan):
    model, call = wan
    counts = {}
    for st in (1, 2):
        with tokenmerge.apply(model, tokenmerge.ToDo(2, st=st)) as handle:
            run(call)
            counts[st] = handle.state.merged_tokens["blocks.0"]
    # 36 tokens: 1 - 1/4 of them pooled within frames, 1 - 1/8 with cells of two frames (as far as
    # the grid's full cells allow).
    assert counts[1] == (36, 9)
    assert counts[2][0] == 36 and counts[2][1] < counts[1][1]


def test_pipeline_separate_cfg_calls_steps_and_seeds():
    pipe = tiny.tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=torch.Generator().manual_seed(0))

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=torch.zeros_like(embeds),
            num_frames=5,
            height=64,
            width=48,
            num_inference_steps=4,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).frames

    handle = tokenmerge.apply(pipe, spy_catome((0, 2)))
    first = generate()
    # Two calls per step (conditional, then unconditional): both plan at steps 0 and 2.
    expected = ([(0, 0)] * BLOCKS + [(0, 1)] * BLOCKS) + ([(2, 0)] * BLOCKS + [(2, 1)] * BLOCKS)
    assert handle.state.cache.computed_at == expected
    assert handle.state.merged_tokens["blocks.0"][0] == 2 * 4 * 3  # 5 frames -> 2 latent frames of 8 x 6 -> 2 x 4 x 3
    second = generate()
    assert handle.state.cache.computed_at == expected
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        assert torch.equal(generate(), generate())


def test_bad_configs_are_refused_at_apply_and_leave_the_model(wan):
    model, call = wan
    plain = run(call)
    with pytest.raises(tokenmerge.TokenMergeError, match="ResidualRange.last must lie within"):
        tokenmerge.apply(model, range_config(0, BLOCKS))
    model.blocks[0].attn1.fuse_projections()
    try:
        with pytest.raises(tokenmerge.TokenMergeError, match="fuse"):
            tokenmerge.apply(model, tokenmerge.ToDo(2))
    finally:
        model.blocks[0].attn1.unfuse_projections()
    assert torch.equal(run(call), plain)


def test_a_deep_copy_is_merged_and_independent():
    import copy

    model = tiny.tiny_wan()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 6, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=gen),
        timestep=torch.tensor([500.0]),
    )
    plain = run(lambda: model(**inputs))
    handle = tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0))
    merged = run(lambda: model(**inputs))
    twin = copy.deepcopy(model)
    assert torch.equal(run(lambda: twin(**inputs)), merged)
    tokenmerge.remove(twin)
    assert torch.equal(run(lambda: twin(**inputs)), plain)
    assert torch.equal(run(lambda: model(**inputs)), merged)  # the original keeps its config
    handle.remove()
