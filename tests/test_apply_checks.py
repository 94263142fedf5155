"""Model-dependent checks at `tokenmerge.apply` (issue 13), on tiny diffusers and timm models.

The model-free half of issue 13 (every constructor's arguments, a refused re-apply, a
block stack's grid and protected count) is in tests/test_bad_input.py; these need a
UNet, a DiT or timm blocks and so live apart, keeping that file fast.
"""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.policies import FixedCount, RandomGrid, Scheduled


def _hooks_of(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return [
        (name, tuple(m._forward_pre_hooks), tuple(m._forward_hooks))
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    ]


def test_a_per_layer_r_of_the_wrong_length_is_refused_at_apply_on_a_unet_and_a_dit() -> None:
    from tokenmerge.placements import ResidualRange, SubLayers
    from tokenmerge.tools import tiny

    unet, dit = tiny.tiny_sd_unet(), tiny.tiny_dit()
    wrong = tokenmerge.ToMe(r=[1, 2])
    cases = [
        (unet, wrong.replace(placement=SubLayers()), "UNet2DConditionModel merges in 3 transformer blocks"),
        (dit, wrong.replace(placement=SubLayers()), "DiTTransformer2DModel merges in 4 transformer blocks"),
        (dit, wrong.replace(placement=ResidualRange(1, 2)), "ResidualRange plans once per call"),
        (unet, MergeConfig(matcher=RandomGrid(), threshold=Scheduled([(0.0, FixedCount([1]))])), "merges in 3"),
    ]
    for model, config, message in cases:
        with pytest.raises(TokenMergeError, match=f"r as a list must have one entry per layer.*{message}"):
            tokenmerge.apply(model, config)
        assert tokenmerge.get_handle(model) is None and not _hooks_of(model)
    tokenmerge.apply(unet, tokenmerge.ToMe(r=[1, 2, 3]).replace(placement=SubLayers())).remove()  # the right length


def test_todo_on_a_unet_built_with_only_cross_attention_is_refused() -> None:
    # Before: attn1 receives the encoder states, the key/value merge was skipped, the output unchanged.
    from tokenmerge.tools import tiny

    unet = tiny.tiny_sd_unet(only_cross_attention=True)
    with pytest.raises(TokenMergeError, match="KeyValues .* BasicTransformerBlock at .* has no self-attention"):
        tokenmerge.apply(unet, tokenmerge.ToDo())
    assert not _hooks_of(unet)
    latent, text = torch.randn(1, 4, 16, 16), tiny.tiny_prompt_embeds()
    with torch.no_grad():
        plain = unet(latent, 10, encoder_hidden_states=text).sample
        with tokenmerge.apply(unet, tokenmerge.ToMeSD(seed=0)):  # merging around attn1 still works
            merged = unet(latent, 10, encoder_hidden_states=text).sample
    assert not torch.equal(plain, merged)


@pytest.mark.parametrize(
    ("arch", "block"),
    [("eva02_tiny_patch14_224", "EvaBlock"), ("beit_base_patch16_224", "Block")],
)
def test_the_generic_adapter_refuses_rotary_and_relative_position_blocks(arch, block) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    refused = f"cannot merge around the attention of timm.models.*[.]{block} \\(blocks.0\\)"
    with pytest.raises(TokenMergeError, match=refused):
        tokenmerge.apply(model.blocks, tokenmerge.ToMeSD(seed=0))
    assert not _hooks_of(model)
    # Merging around the feed-forward layer only leaves attention's positions alone: accepted.
    mlp_only = tokenmerge.ToMeSD(seed=0).replace(placement=tokenmerge.placements.SubLayers(attn=False, mlp=True))
    tokenmerge.apply(model.blocks, mlp_only).remove()


@pytest.mark.parametrize("family", ["unet", "dit-sublayers", "dit-range"])
def test_a_cell_larger_than_the_finest_token_grid_raises_instead_of_merging_nothing(family: str) -> None:
    # Before: every token of the 16 x 16 (UNet) or 8 x 8 (DiT) grid was a source without a
    # destination, nothing merged, and the model ran as if unmerged.
    from tokenmerge.placements import ResidualRange, SubLayers
    from tokenmerge.policies import FixedRatio
    from tokenmerge.tools import tiny

    latent = torch.randn(1, 4, 16, 16)
    if family == "unet":
        model, kwargs = tiny.tiny_sd_unet(), {"encoder_hidden_states": tiny.tiny_prompt_embeds()}
    else:
        model, kwargs = tiny.tiny_dit(), {"class_labels": torch.tensor([1])}
    placement = ResidualRange(0, 1) if family == "dit-range" else SubLayers()
    cell = 32 if family == "unet" else 16
    config = MergeConfig(matcher=RandomGrid(cell, cell), threshold=FixedRatio(0.5), seed=0, placement=placement)
    with torch.no_grad(), tokenmerge.apply(model, config):
        with pytest.raises(TokenMergeError, match=rf"RandomGrid\(sx={cell}, sy={cell}, st=1\) does not fit the"):
            model(latent, torch.tensor([10]), **kwargs)
        # A cell that fits the finest grid merges there (coarser levels may stay unmerged, as in tomesd).
    fitting = config.replace(matcher=RandomGrid(2, 2))
    with torch.no_grad(), tokenmerge.apply(model, fitting) as handle:
        model(latent, torch.tensor([10]), **kwargs)
        assert any(n_out < n_in for n_in, n_out in handle.state.merged_tokens.values())
