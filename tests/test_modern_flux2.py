"""Flux.2 (double-stream blocks, then parallel single-stream blocks on the joint [text | image] sequence).

A tiny `Flux2Transformer2DModel` built in code. Its single-stream blocks take the joint
sequence as one argument (the model concatenates the streams), so the text is the
protected prefix of their plan; their attention fuses the key/value projections with
the MLP, which rules out ToDo and a separate feed-forward merge (refused at apply).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from modern_cases import GridRecorder, check_merges_and_removes, check_ratio_zero, range_config, run

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

PRESETS = {
    "tomesd": lambda: tokenmerge.ToMeSD(0.5, seed=0),
    "catome": lambda: tokenmerge.CAToMe(threshold=0.0, seed=0),
    "range-double-single": lambda: range_config(1, 2),
    "range-single": lambda: range_config(2, 3, prop_attn=False),
}


@pytest.fixture(scope="module")
def flux2() -> tuple[torch.nn.Module, Any]:
    model = tiny.tiny_flux2()
    inputs = tiny.flux2_inputs(batch=2, height=6, width=8, text=TEXT)
    return model, lambda: model(**inputs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_merges_fewer_flops_and_removes_bitwise(flux2, name):
    check_merges_and_removes(*flux2, PRESETS[name]())


@pytest.mark.parametrize("config", [tokenmerge.ToMeSD(0.0), range_config(0, 3, ratio=0.0)], ids=["tomesd", "range"])
def test_ratio_zero_is_bitwise(flux2, config):
    check_ratio_zero(*flux2, config)


def test_grid_from_four_column_ids_and_the_text_prefix(flux2):
    model, call = flux2
    recorder = GridRecorder(2, 2)
    attn = model.single_transformer_blocks[0].attn
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0).replace(matcher=recorder)):
        hooks = [
            attn.register_forward_pre_hook(
                lambda m, a, k: before.append(k["hidden_states"]), with_kwargs=True, prepend=True
            ),
            attn.register_forward_pre_hook(lambda m, a, k: after.append(k["hidden_states"]), with_kwargs=True),
        ]
        run(call)
        for h in hooks:
            h.remove()
    assert recorder.seen and all(grid == (6, 8) for grid in recorder.seen)
    assert before[0].shape[1] == TEXT + 48 and after[0].shape[1] == TEXT + 24
    assert torch.equal(after[0][:, :TEXT], before[0][:, :TEXT])


def test_todo_and_a_feed_forward_merge_are_refused(flux2):
    model, call = flux2
    plain = run(call)
    with pytest.raises(TokenMergeError, match="to_k, to_v"):
        tokenmerge.apply(model, tokenmerge.ToDo(2))
    with pytest.raises(TokenMergeError, match="merge_mlp must be False"):
        tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, merge_mlp=True))
    assert torch.equal(run(call), plain)


class Enter:
    def __init__(self, joint: JointAttention, plan: MergePlan) -> None:
        self.joint, self.plan = joint, plan

    def __call__(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.joint.prepare(args, kwargs, plan=self.plan, text=TEXT, select="joint")


def test_single_stream_rotary_follows_the_merged_tokens():
    """Oracle: the unhooked parallel attention on the merged joint sequence with the selected tables (batch 1)."""
    model = tiny.tiny_flux2()
    block = model.single_transformer_blocks[0]
    inputs = tiny.flux2_inputs(height=6, width=8, text=TEXT)
    with torch.no_grad():
        text_table, image_table = model.pos_embed(inputs["txt_ids"][0]), model.pos_embed(inputs["img_ids"][0])
    cos, sin = (torch.cat([t, i]) for t, i in zip(text_table, image_table, strict=True))  # (T + N, D)
    joint = torch.randn(1, TEXT + 48, 16, generator=torch.Generator().manual_seed(0))
    layout = TokenLayout.image(6, 8, prefix=TEXT)
    matching = RandomGrid(2, 2).match(joint[:, TEXT:], MergeContext(grid=(6, 8), seed=3))
    plan = MergePlan.from_matching(matching, 24, layout=layout)
    merged = plan.merge(joint)
    with torch.no_grad():
        expected = block.attn(hidden_states=merged, image_rotary_emb=(plan.select(cos, 0)[0], plan.select(sin, 0)[0]))
    hooks = HookSet()
    attention = JointAttention(BlockSite("single_transformer_blocks.0", block, 0))
    attention.attach(hooks, keys_values=False)
    hooks.pre(block.attn, Enter(attention, plan))
    with torch.no_grad():
        got = block.attn(hidden_states=merged, image_rotary_emb=(cos, sin))
    hooks.remove()
    assert torch.equal(got, expected)
