"""Rotary embeddings follow merged tokens: tokenmerge's attention hooks against the model's own processor.

For one attention call of a batch of one, the oracle is the unhooked attention run on
the merged tokens with the rotary table selected by the plan (`MergePlan.select`: a
merged token at its destination's position), which the model's processor accepts as it
is for a single sample. tokenmerge's hooks take the full table out of the call, select
it per sample and apply it to the queries and keys themselves; the outputs must agree
bitwise. Flux (dual- and single-stream blocks, text before the image) and Wan (video
tokens only, tables ``(1, N, 1, D)``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmerge.adapters.diffusion_joint import JointAttention
from tokenmerge.adapters.diffusion_layout import BlockSite
from tokenmerge.hooks import HookSet
from tokenmerge.layout import TokenLayout
from tokenmerge.plan import MergePlan
from tokenmerge.policies import MergeContext, RandomGrid
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

TEXT = 5


def grid_plan(x: torch.Tensor, layout: TokenLayout) -> MergePlan:
    """Half of the image tokens of ``x`` merged on a 2x2 random grid (protected text outside ``layout``'s span)."""
    span = x[:, layout.merge_start : layout.merge_stop]
    matching = RandomGrid(2, 2).match(span, MergeContext(grid=layout.grid, seed=3))
    return MergePlan.from_matching(matching, layout.num_mergeable // 2, layout=layout)


class Enter:
    """The pre-hook the adapter would register: hand the running call to `JointAttention.prepare`."""

    def __init__(self, joint: JointAttention, plan: MergePlan, text: int, select: str) -> None:
        self.joint, self.plan, self.text, self.select = joint, plan, text, select

    def __call__(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.joint.prepare(args, kwargs, plan=self.plan, text=self.text, select=self.select)


def hooked(site: BlockSite, plan: MergePlan, text: int, select: str, call: Any) -> Any:
    hooks = HookSet()
    joint = JointAttention(site)
    joint.attach(hooks, keys_values=False)
    hooks.pre(joint.attn, Enter(joint, plan, text, select))
    try:
        with torch.no_grad():
            return call()
    finally:
        hooks.remove()


def flux_table(model: torch.nn.Module, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = tiny.flux_inputs(height=h, width=w, text=TEXT)
    with torch.no_grad():
        return model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))  # (T + N, D) each


def test_flux_double_stream_attention_selects_the_image_part():
    model = tiny.tiny_flux()
    block = model.transformer_blocks[0]
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(1, 48, 16, generator=gen), torch.randn(1, TEXT, 16, generator=gen)
    cos, sin = flux_table(model, 6, 8)
    plan = grid_plan(image, TokenLayout.image(6, 8))
    merged = plan.merge(image)  # (1, 24, C)
    selected = tuple(torch.cat([t[:TEXT], plan.select(t[TEXT:], dim=0)[0]]) for t in (cos, sin))  # (T + 24, D)
    with torch.no_grad():
        expected = block.attn(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=selected)
    site = BlockSite("transformer_blocks.0", block, 0)
    got = hooked(
        site,
        plan,
        TEXT,
        "image",
        lambda: block.attn(hidden_states=merged, encoder_hidden_states=text, image_rotary_emb=(cos, sin)),
    )
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_flux_single_stream_attention_keeps_the_text_prefix():
    model = tiny.tiny_flux()
    block = model.single_transformer_blocks[0]
    joint = torch.randn(1, TEXT + 48, 16, generator=torch.Generator().manual_seed(1))  # [text | image]
    cos, sin = flux_table(model, 6, 8)
    plan = grid_plan(joint, TokenLayout.image(6, 8, prefix=TEXT))
    merged = plan.merge(joint)  # (1, T + 24, C): the text rows first, bitwise
    assert torch.equal(merged[:, :TEXT], joint[:, :TEXT])
    selected = (plan.select(cos, dim=0)[0], plan.select(sin, dim=0)[0])
    with torch.no_grad():
        expected = block.attn(hidden_states=merged, image_rotary_emb=selected)
    site = BlockSite("single_transformer_blocks.0", block, 0)
    got = hooked(site, plan, TEXT, "joint", lambda: block.attn(hidden_states=merged, image_rotary_emb=(cos, sin)))
    assert torch.equal(got, expected)


def test_wan_self_attention_selects_video_positions():
    model = tiny.tiny_wan()
    block = model.blocks[0]
    latent = torch.zeros(1, 4, 3, 8, 6)
    with torch.no_grad():
        cos, sin = model.rope(latent)  # (1, 36, 1, D) each: frame, row, column positions
    tokens = torch.randn(1, 36, block.attn1.inner_dim, generator=torch.Generator().manual_seed(2))
    plan = grid_plan(tokens, TokenLayout.video(3, 4, 3))
    merged = plan.merge(tokens)
    with torch.no_grad():
        expected = block.attn1(merged, None, None, (plan.select(cos, dim=1), plan.select(sin, dim=1)))
    site = BlockSite("blocks.0", block, 0)
    got = hooked(site, plan, 0, "image", lambda: block.attn1(merged, None, None, (cos, sin)))
    assert torch.equal(got, expected)
    with torch.no_grad():  # the oracle can fail: the unselected positions give another output
        other = block.attn1(merged, None, None, (cos[:, : merged.shape[1]], sin[:, : merged.shape[1]]))
    assert not torch.equal(got, other)
