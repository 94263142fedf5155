"""Block-range merging in DiT and PixArt: merged residual stream, proportional attention, unmerge.

The exactness test: when the tokens of every 2x2 cell are identical, merging each cell
into one token of size 4 and running the blocks with ``log(size)`` added to the
attention logits computes exactly what the unmerged model computes. Without
proportional attention it does not, so the test shows the bias reaches the attention
with the right shape, for the default SDPA processor and the classic one alike.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

import tokenmerge
from tokenmerge import MergeConfig
from tokenmerge.policies import FixedRatio, StridedGrid
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

PATCH = 2


def cell_duplicated_latent(batch: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A latent ``(B, 4, grid_h * 2, grid_w * 2)``: in a checkerboard of the 2x2 token cells all four patches are equal.

    The other cells hold four different random patches, so after merging the duplicates
    token sizes are 4 and 1: not uniform, so proportional attention matters.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    cells = torch.randn(batch, 4, h // 2, w // 2, PATCH, PATCH, generator=gen)  # one patch per cell
    duplicated = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, 4, h, w, p, p)
    distinct = torch.randn(batch, 4, h, w, PATCH, PATCH, generator=gen)
    rows, cols = torch.meshgrid(torch.arange(h) // 2, torch.arange(w) // 2, indexing="ij")
    checker = ((rows + cols) % 2 == 0)[None, None, :, :, None, None]  # (1, 1, h, w, 1, 1)
    patches = torch.where(checker, duplicated, distinct)
    return patches.permute(0, 1, 2, 4, 3, 5).reshape(batch, 4, h * PATCH, w * PATCH)


# An 8x8 token grid has 16 cells, 8 of them duplicated: 8 * 3 tokens merge away.
DUPLICATES = 24


def transformer_and_call(kind: str, batch: int = 2):
    """A tiny DiT/PixArt without positional embedding (so duplicate patches give duplicate tokens) and its call."""
    model = tiny.tiny_dit() if kind == "dit" else tiny.tiny_pixart()
    model.pos_embed.pos_embed.zero_()
    latent = cell_duplicated_latent(batch, (8, 8))
    timestep = torch.tensor([500] * batch)
    if kind == "dit":
        labels = torch.arange(batch)
        return model, lambda: model(latent, timestep=timestep, class_labels=labels).sample
    caption = torch.randn(batch, 5, tiny.CAPTION_DIM, generator=torch.Generator().manual_seed(1))
    no_micro = {"resolution": None, "aspect_ratio": None}
    return (
        model,
        lambda: model(latent, encoder_hidden_states=caption, timestep=timestep, added_cond_kwargs=no_micro).sample,
    )


def cell_merge(blocks: tuple[int, int], prop_attn: bool = True) -> MergeConfig:
    """Merge the duplicated cells into one token each (the most similar sources of a strided grid)."""
    return MergeConfig(
        matcher=StridedGrid(2, 2),
        threshold=FixedRatio(DUPLICATES / 64),
        blocks=blocks,
        mode="weighted",
        prop_attn=prop_attn,
    )


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("blocks", [(0, 3), (1, 2), (2, 2)], ids=str)
@pytest.mark.parametrize("processor", ["sdpa", "classic"])
def test_proportional_attention_makes_merging_duplicates_exact(kind, blocks, processor):
    model, call = transformer_and_call(kind)
    if processor == "classic":
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
    with torch.no_grad():
        plain = call()
        with tokenmerge.apply(model, cell_merge(blocks)) as handle:
            merged = call()
            assert handle.state.merged_tokens == {f"transformer_blocks.{blocks[0]}-{blocks[1]}": (64, 64 - DUPLICATES)}
        with tokenmerge.apply(model, cell_merge(blocks, prop_attn=False)):
            unweighted = call()
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-5)
    assert (unweighted - plain).abs().max() > 1e-3


def test_block_range_under_gradient_checkpointing_passes_positional_arguments():
    model, call = transformer_and_call("dit")
    model.enable_gradient_checkpointing()
    plain = call()
    with tokenmerge.apply(model, cell_merge((1, 3))):
        merged = call()
        merged.sum().backward()  # recomputes the blocks, hooks included; gradients flow through merge and unmerge
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-5)
    assert model.transformer_blocks[0].attn1.to_q.weight.grad is not None


def test_residual_merge_outside_a_range_leaves_other_blocks_unmerged():
    model, call = transformer_and_call("dit", batch=1)
    seen: dict[int, int] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape[1]))
        for i, block in enumerate(model.transformer_blocks)
    ]
    with torch.no_grad(), tokenmerge.apply(model, cell_merge((1, 2))):
        call()
    for hook in handles:
        hook.remove()
    # Hooks registered before apply run before its merge hook: block 1 still shows 64 tokens on entry.
    assert seen == {0: 64, 1: 64, 2: 64 - DUPLICATES, 3: 64}
