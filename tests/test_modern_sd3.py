"""SD3 / SD3.5 (MM-DiT with the text after the image tokens; SD3.5's image-only attn2) under every preset.

Tiny `SD3Transformer2DModel`s built in code, with and without SD3.5's dual attention,
and a `StableDiffusion3Pipeline` driven with ``prompt_embeds`` whose classifier-free
guidance runs both branches in one batched call per step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modern_cases import (
    GridRecorder,
    check_merges_and_removes,
    check_ratio_zero,
    range_config,
    run,
    spy_catome,
)

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

TEXT = 5
BLOCKS = 3

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-mlp": lambda: tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "range": lambda: range_config(0, 2, prop_attn=False),
}


@pytest.fixture(scope="module", params=[True, False], ids=["sd35-dual", "sd3"])
def sd3(request) -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_sd3(dual=request.param)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, 12, generator=gen),  # an 8 x 6 token grid
        encoder_hidden_states=torch.randn(2, TEXT, tiny.JOINT_TEXT_DIM, generator=gen),
        pooled_projections=torch.randn(2, tiny.SD3_POOLED_DIM, generator=gen),
        timestep=torch.tensor([500.0, 500.0]),
    )
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(sd3, name):
    model, call = sd3
    check_merges_and_removes(model, call, PRESETS[name]())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 2, False, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_bitwise(sd3, config):
    check_ratio_zero(*sd3, config)


def test_grid_from_the_latent_and_text_after_the_image(sd3):
    model, call = sd3
    recorder = GridRecorder(2, 2)
    attn = model.transformer_blocks[0].attn
    seen: list[dict[str, torch.Tensor]] = []
    outputs: list[Any] = []
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=recorder)):
        hooks = [
            attn.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True),
            attn.register_forward_hook(lambda m, a, o: outputs.append(o)),
        ]
        run(call)
        for h in hooks:
            h.remove()
    assert recorder.seen and all(grid == (8, 6) for grid in recorder.seen)
    assert seen[0]["hidden_states"].shape[1] == 24  # image tokens merged
    assert seen[0]["encoder_hidden_states"].shape[1] == TEXT  # text untouched
    image, text = outputs[0]
    assert image.shape[1] == 48 and text.shape[1] == TEXT  # the image part unmerged right after


def test_proportional_attention_is_refused_on_sd3_and_the_model_kept(sd3):
    model, call = sd3
    plain = run(call)
    with pytest.raises(TokenMergeError, match="prop_attn"):
        tokenmerge.apply(model, range_config(0, 2, prop_attn=True))
    assert torch.equal(run(call), plain)


def test_pipeline_batched_cfg_steps_and_seeds():
    pipe = tiny.tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=gen)
    pooled = torch.randn(1, tiny.SD3_POOLED_DIM, generator=gen)
    calls: list[int] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True
    )

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=torch.zeros_like(embeds),
            negative_pooled_prompt_embeds=torch.zeros_like(pooled),
            height=64,
            width=48,
            num_inference_steps=4,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images

    handle = tokenmerge.apply(pipe, spy_catome((0, 2)))
    first = generate()
    assert calls == [2] * 4  # both CFG branches in one call per step
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert handle.state.merged_tokens["transformer_blocks.0"][0] == 12  # 64 x 48 px -> 8 x 6 latent -> 4 x 3
    second = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        assert torch.equal(generate(), generate())
