"""CogVideoX (video MM-DiT: [text | video] projected together, rotary tables over the video only) under every preset.

Tiny `CogVideoXTransformer3DModel`s built in code (5B-style rotary, 2B-style sin-cos
positions) and a `CogVideoXPipeline` driven with ``prompt_embeds`` (no VAE: latents
out), whose classifier-free guidance batches both branches. The latent is ``(B, F, C,
H, W)``; the feed-forward runs on the joint sequence, so its image span is merged.
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
BLOCKS = 2

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "tomesd-mlp-st2": lambda: tokenmerge.ToMeSD(0.6, merge_mlp=True, st=2, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "todo": lambda: tokenmerge.ToDo(2),
    "todo-st2": lambda: tokenmerge.ToDo(2, st=2),
    "range": lambda: range_config(0, 1),
}


@pytest.fixture(scope="module", params=[True, False], ids=["rotary", "sincos"])
def cog(request) -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_cogvideox(rotary=request.param)
    inputs = tiny.cogvideox_inputs(batch=2, text=TEXT, rotary=request.param)
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(cog, name):
    check_merges_and_removes(*cog, PRESETS[name]())


@pytest.mark.parametrize(
    "config",
    [tokenmerge.ToMeSD(0.0, merge_mlp=True), range_config(0, 1, ratio=0.0), tokenmerge.ToDo(2, ratio=0.0)],
    ids=["tomesd", "range", "todo"],
)
def test_ratio_zero_is_bitwise(cog, config):
    check_ratio_zero(*cog, config)


def test_video_grid_and_the_text_rows_of_the_joint_feed_forward(cog):
    model, call = cog
    recorder = GridRecorder(2, 2)
    ff = model.transformer_blocks[0].ff
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    config = tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0).replace(matcher=recorder)
    with tokenmerge.apply(model, config):
        hooks = [
            ff.register_forward_pre_hook(lambda m, a: before.append(a[0]), prepend=True),
            ff.register_forward_pre_hook(lambda m, a: after.append(a[0])),
        ]
        run(call)
        for h in hooks:
            h.remove()
    assert recorder.seen and all(grid == (3, 4, 3) for grid in recorder.seen)  # (frames, rows, columns)
    assert before[0].shape[1] == TEXT + 36 and after[0].shape[1] == TEXT + 18
    assert torch.equal(after[0][:, :TEXT], before[0][:, :TEXT])  # text rows untouched


class Enter:
    def __init__(self, joint: JointAttention, plan: MergePlan) -> None:
        self.joint, self.plan = joint, plan

    def __call__(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.joint.prepare(args, kwargs, plan=self.plan, text=TEXT, select="image")


def test_rotary_follows_the_merged_video_tokens():
    """Oracle: the unhooked attention on the merged tokens with the plan's selected tables (batch 1)."""
    model = tiny.tiny_cogvideox()
    block = model.transformer_blocks[0]
    cos, sin = tiny.cogvideox_inputs(text=TEXT)["image_rotary_emb"]  # (36, D) each
    gen = torch.Generator().manual_seed(0)
    video, text = torch.randn(1, 36, 32, generator=gen), torch.randn(1, TEXT, 32, generator=gen)
    matching = RandomGrid(2, 2).match(video, MergeContext(grid=(3, 4, 3), seed=3))
    plan = MergePlan.from_matching(matching, 18, layout=TokenLayout.video(3, 4, 3))
    merged = plan.merge(video)
    with torch.no_grad():
        selected = (plan.select(cos, dim=0)[0], plan.select(sin, dim=0)[0])
        expected = block.attn1(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=selected)
    hooks = HookSet()
    joint = JointAttention(BlockSite("transformer_blocks.0", block, 0))
    joint.attach(hooks, keys_values=False)
    hooks.pre(block.attn1, Enter(joint, plan))
    with torch.no_grad():
        got = block.attn1(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=(cos, sin))
    hooks.remove()
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_pipeline_batched_cfg_steps_and_seeds():
    pipe = tiny.tiny_cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, TEXT, tiny.JOINT_TEXT_DIM, generator=torch.Generator().manual_seed(0))

    def generate(seed: int = 0) -> torch.Tensor:
        return pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=torch.zeros_like(embeds),
            num_frames=9,
            height=64,
            width=48,
            num_inference_steps=4,
            guidance_scale=6.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).frames

    handle = tokenmerge.apply(pipe, spy_catome((0, 2)))
    first = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert handle.state.merged_tokens["transformer_blocks.0"][0] == 3 * 4 * 3  # 9 frames -> 3 latent frames
    second = generate()
    assert handle.state.cache.computed_at == [(0, 0)] * BLOCKS + [(2, 0)] * BLOCKS
    assert torch.equal(first, second)
    handle.remove()
    with tokenmerge.apply(pipe, tokenmerge.ToMeSD(0.5, seed=1)):
        assert torch.equal(generate(), generate())


def test_bad_configs_are_refused_at_apply_and_leave_the_model(cog):
    model, call = cog
    plain = run(call)
    with pytest.raises(tokenmerge.TokenMergeError, match="no cross-attention"):
        tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, merge_crossattn=True))
    with pytest.raises(tokenmerge.TokenMergeError, match="ResidualRange.last must lie within"):
        tokenmerge.apply(model, range_config(1, BLOCKS))
    assert torch.equal(run(call), plain)
