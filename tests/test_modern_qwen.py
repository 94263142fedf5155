"""Qwen-Image (MM-DiT, text before the image, complex rotary tables per stream, packed latents) under every preset.

A tiny `QwenImageTransformer2DModel` built in code and a `QwenImagePipeline` driven with
``prompt_embeds`` (no VAE: packed latents out), whose true classifier-free guidance runs
the two branches as separate calls. The token grid comes from the call's ``img_shapes``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modern_cases import GridRecorder, check_merges_and_removes, check_ratio_zero, range_config, run, spy_catome

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.adapters.diffusion_joint import JointAttention
from tokenmerge.adapters.diffusion_layout import BlockSite
from tokenmerge.hooks import HookSet
from tokenmerge.layout import TokenLayout
from tokenmerge.plan import MergePlan
from tokenmerge.policies import MergeContext, RandomGrid
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

TEXT = 5
BLOCKS = 2

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-mlp": lambda: tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "range": lambda: range_config(0, 1, prop_attn=False),
}


@pytest.fixture(scope="module")
def qwen() -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_qwen_image()
    inputs = tiny.qwen_image_inputs(batch=2, height=6, width=8, text=TEXT)
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(qwen, name):
    check_merges_and_removes(*qwen, PRESETS[name]())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 1, False, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_bitwise(qwen, config):
    check_ratio_zero(*qwen, config)


def test_grid_from_img_shapes_and_prop_attn_refused(qwen):
    model, call = qwen
    recorder = GridRecorder(2, 2)
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=recorder)):
        run(call)
    assert recorder.seen and all(grid == (6, 8) for grid in recorder.seen)
    plain = run(call)
    with pytest.raises(TokenMergeError, match="prop_attn"):
        tokenmerge.apply(model, range_config(0, 1, prop_attn=True))
    assert torch.equal(run(call), plain)


def test_todo_with_a_padded_text_mask_runs_that_call_unmerged(qwen):
    model, _ = qwen
    inputs = tiny.qwen_image_inputs(batch=2, height=6, width=8, text=TEXT)
    inputs["encoder_hidden_states_mask"][:, -1] = 0  # padding: the processor's joint mask would not fit
    plain = run(lambda: model(**inputs))
    with tokenmerge.apply(model, tokenmerge.ToDo(2)):
        assert torch.equal(run(lambda: model(**inputs)), plain)


class Enter:
    def __init__(self, joint: JointAttention, plan: MergePlan) -> None:
        self.joint, self.plan = joint, plan

    def __call__(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.joint.prepare(args, kwargs, plan=self.plan, text=TEXT, select="image")


def test_rotary_follows_the_merged_image_tokens():
    """Oracle: the unhooked attention on the merged tokens with the image freqs selected by the plan (batch 1)."""
    model = tiny.tiny_qwen_image()
    block = model.transformer_blocks[0]
    inputs = tiny.qwen_image_inputs(height=6, width=8, text=TEXT)
    with torch.no_grad():
        image_freqs, text_freqs = model.pos_embed(inputs["img_shapes"], max_txt_seq_len=TEXT, device="cpu")
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(1, 48, 16, generator=gen), torch.randn(1, TEXT, 16, generator=gen)
    matching = RandomGrid(2, 2).match(image, MergeContext(grid=(6, 8), seed=3))
    plan = MergePlan.from_matching(matching, 24, layout=TokenLayout.image(6, 8))
    merged = plan.merge(image)
    with torch.no_grad():
        selected = (plan.select(image_freqs, dim=0)[0], text_freqs)
        expected = block.attn(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=selected)
    hooks = HookSet()
    joint = JointAttention(BlockSite("transformer_blocks.0", block, 0))
    joint.attach(hooks, keys_values=False)
    hooks.pre(block.attn, Enter(joint, plan))
    with torch.no_grad():
        got = block.attn(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=(image_freqs, text_freqs))
    hooks.remove()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_pipeline_separate_cfg_calls_steps_and_seeds():
    pipe = tiny.tiny_qwen_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, TEXT, dtype=torch.long)

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=torch.zeros_like(embeds),
            negative_prompt_embeds_mask=mask,
            true_cfg_scale=4.0,
            height=64,
            width=48,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images

    handle = tokenmerge.apply(pipe, spy_catome((0, 2)))
    first = generate()
    expected = ([(0, 0)] * BLOCKS + [(0, 1)] * BLOCKS) + ([(2, 0)] * BLOCKS + [(2, 1)] * BLOCKS)
    assert handle.state.cache.computed_at == expected  # t / 1000 placed on the schedule, two calls a step
    assert handle.state.merged_tokens["transformer_blocks.0"][0] == 12  # 64 x 48 px -> 4 x 3 tokens
    second = generate()
    assert handle.state.cache.computed_at == expected
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        assert torch.equal(generate(), generate())
