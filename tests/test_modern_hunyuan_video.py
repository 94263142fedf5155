"""HunyuanVideo ([video | text], double- then single-stream blocks, padded-text key masks) under every preset.

A tiny `HunyuanVideoTransformer3DModel` built in code and a `HunyuanVideoPipeline` driven
with ``prompt_embeds`` (no VAE: latents out; guidance distilled: one call per step). Its
attention masks padded text keys over ``[video | text]``: the mask's video part follows
the merged keys, so the padded text stays masked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modern_cases import GridRecorder, check_merges_and_removes, check_ratio_zero, range_config, run, spy_catome

import tokenmerge
from tokenmerge.adapters.diffusion_joint import JointAttention
from tokenmerge.adapters.diffusion_layout import BlockSite
from tokenmerge.hooks import HookSet
from tokenmerge.layout import TokenLayout
from tokenmerge.plan import MergePlan
from tokenmerge.policies import MergeContext, RandomGrid
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

TEXT = 5
BLOCKS = 4

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-mlp": lambda: tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "todo-st2": lambda: tokenmerge.ToDo(2, st=2),
    "range-double-single": lambda: range_config(1, 2),
}


@pytest.fixture(scope="module")
def hunyuan() -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_hunyuan_video()
    inputs = tiny.hunyuan_video_inputs(batch=2, text=TEXT)
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(hunyuan, name):
    check_merges_and_removes(*hunyuan, PRESETS[name]())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 3, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_bitwise(hunyuan, config):
    check_ratio_zero(*hunyuan, config)


def test_video_grid(hunyuan):
    model, call = hunyuan
    recorder = GridRecorder(2, 2, st=2)
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=recorder)):
        run(call)
    assert recorder.seen and all(grid == (3, 4, 3) for grid in recorder.seen)


class Enter:
    def __init__(self, joint: JointAttention, plan: MergePlan) -> None:
        self.joint, self.plan = joint, plan

    def __call__(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.joint.prepare(args, kwargs, plan=self.plan, text=TEXT, select="image")


@pytest.mark.parametrize("stream", ["transformer_blocks", "single_transformer_blocks"])
def test_rotary_and_the_text_mask_follow_the_merged_video_tokens(stream):
    """Oracle: the unhooked attention on the merged tokens, the selected tables and the merged key mask (batch 1)."""
    model = tiny.tiny_hunyuan_video()
    block = getattr(model, stream)[0]
    with torch.no_grad():
        cos, sin = model.rope(torch.zeros(1, 4, 3, 8, 6))  # (36, D) each
    gen = torch.Generator().manual_seed(0)
    video, text = torch.randn(1, 36, 32, generator=gen), torch.randn(1, TEXT, 32, generator=gen)
    mask = torch.ones(1, 1, 1, 36 + TEXT, dtype=torch.bool)
    mask[..., -1] = False  # the last text token is padding
    matching = RandomGrid(2, 2).match(video, MergeContext(grid=(3, 4, 3), seed=3))
    plan = MergePlan.from_matching(matching, 18, layout=TokenLayout.video(3, 4, 3))
    merged = plan.merge(video)
    merged_mask = torch.cat([mask[..., :18], mask[..., 36:]], dim=-1)  # video keys all unmasked
    with torch.no_grad():
        selected = (plan.select(cos, dim=0)[0], plan.select(sin, dim=0)[0])
        expected = block.attn(
            hidden_states=merged, encoder_hidden_states=text, attention_mask=merged_mask, image_rotary_emb=selected
        )
    hooks = HookSet()
    joint = JointAttention(BlockSite(f"{stream}.0", block, 0))
    joint.attach(hooks, keys_values=False)
    hooks.pre(block.attn, Enter(joint, plan))
    with torch.no_grad():
        got = block.attn(
            hidden_states=merged, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=(cos, sin)
        )
    hooks.remove()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_pipeline_guidance_distilled_steps_and_seeds():
    pipe = tiny.tiny_hunyuan_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=gen)
    pooled = torch.randn(1, tiny.FLUX_POOLED_DIM, generator=gen)
    mask = torch.ones(1, TEXT, dtype=torch.long)

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            prompt_attention_mask=mask,
            num_frames=9,
            height=64,
            width=48,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).frames

    handle = tokenmerge.apply(pipe, spy_catome((0, 2)))
    first = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert handle.state.merged_tokens["transformer_blocks.0"][0] == 3 * 4 * 3
    second = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        assert torch.equal(generate(), generate())


def test_bad_configs_are_refused_at_apply_and_leave_the_model(hunyuan):
    model, call = hunyuan
    plain = run(call)
    with pytest.raises(tokenmerge.TokenMergeError, match="no cross-attention"):
        tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, merge_crossattn=True))
    with pytest.raises(tokenmerge.TokenMergeError, match="ResidualRange.last must lie within"):
        tokenmerge.apply(model, range_config(0, BLOCKS))
    assert torch.equal(run(call), plain)
    # A grid cell larger than the video grid: refused at the first call, naming the grid.
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, sx=8, sy=8)):
        with pytest.raises(tokenmerge.TokenMergeError, match="does not fit the 3 x 4 x 3 token grid"):
            run(call)
