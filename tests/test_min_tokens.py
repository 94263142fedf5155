"""``min_tokens``: a block merges only when it has at least that many mergeable tokens.

Below the minimum the block runs unmerged (bit for bit the plain model's block), at or
above it merges as before; ``None`` takes the device's default (`DEFAULT_MIN_TOKENS`).
CPU only, a tiny SD-style UNet whose levels have 256, 64 and 16 tokens (16 x 16 latent).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge import placements as placements_module
from tokenmerge.placements import DEFAULT_MIN_TOKENS, KeyValues, SubLayers, min_tokens_for
from tokenmerge.policies import FixedRatio, RandomGrid
from tokenmerge.tools.tiny import tiny_prompt_embeds, tiny_sd_unet

TOP, SECOND = 256, 64  # tokens at the top level and the next one with attention


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_sd_unet(seed=0, sample_size=16).eval()


def _run(unet: torch.nn.Module, config: MergeConfig | None) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    text = tiny_prompt_embeds(batch=2)
    handle = tokenmerge.apply(unet, config) if config is not None else None
    try:
        with torch.no_grad():
            out = unet(sample, torch.tensor(500.0), encoder_hidden_states=text).sample
        merged = dict(handle.state.merged_tokens) if handle is not None else {}
    finally:
        if handle is not None:
            handle.remove()
    return out, merged


def test_blocks_below_the_minimum_run_unmerged_bit_for_bit(unet: torch.nn.Module) -> None:
    plain, _ = _run(unet, None)
    out, merged = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=4, min_tokens=TOP + 1, seed=0))
    assert merged == {}  # no block reached the minimum: nothing planned
    assert torch.equal(out, plain)


def test_blocks_at_the_minimum_merge_and_the_others_do_not(unet: torch.nn.Module) -> None:
    # use_rand=False: the partition does not depend on the layer's index, so merging only the
    # top level through min_tokens must be exactly merging only the top level by max_downsample.
    top_only, merged_top = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=1, use_rand=False, min_tokens=0))
    out, merged = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=4, use_rand=False, min_tokens=TOP))
    assert set(merged) == set(merged_top) and merged
    assert all(n_in == TOP and n_out < TOP for n_in, n_out in merged.values())
    assert torch.equal(out, top_only)
    _, both = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=4, use_rand=False, min_tokens=SECOND))
    assert {n_in for n_in, _ in both.values()} == {TOP, SECOND}  # the 16-token mid block stays unmerged


def test_keys_values_follow_the_minimum(unet: torch.nn.Module) -> None:
    plain, _ = _run(unet, None)
    out, merged = _run(unet, tokenmerge.ToDo(2, max_downsample=2, min_tokens=TOP + 1))
    assert merged == {} and torch.equal(out, plain)
    out, merged = _run(unet, tokenmerge.ToDo(2, max_downsample=2, min_tokens=TOP))
    assert {n_in for n_in, _ in merged.values()} == {TOP} and not torch.equal(out, plain)


def test_none_takes_the_device_default(unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    assert min_tokens_for(None, "cuda", "unet") == DEFAULT_MIN_TOKENS[("cuda", "unet")] == 16384
    assert min_tokens_for(None, "cuda", "flux") == min_tokens_for(None, "cuda", "dit") == 0  # not measured slower
    assert min_tokens_for(None, "cpu", "unet") == 0 and min_tokens_for(5, "cuda", "unet") == 5
    everywhere, _ = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=2, seed=0, min_tokens=0))
    default, merged = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=2, seed=0))
    assert torch.equal(default, everywhere) and {n for n, _ in merged.values()} == {TOP, SECOND}  # CPU: as before
    monkeypatch.setitem(placements_module.DEFAULT_MIN_TOKENS, ("cpu", "unet"), TOP)
    _, merged = _run(unet, tokenmerge.ToMeSD(0.5, max_downsample=2, seed=0))
    assert {n for n, _ in merged.values()} == {TOP}


@pytest.mark.parametrize("bad", [-1, True, 1.5, "4096", 2**40])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: tokenmerge.ToMeSD(min_tokens=v),
        lambda v: tokenmerge.CAToMe(min_tokens=v),
        lambda v: tokenmerge.ToDo(min_tokens=v),
        lambda v: MergeConfig(matcher=RandomGrid(), threshold=FixedRatio(0.5), placement=SubLayers(min_tokens=v)),
        lambda v: MergeConfig(matcher=RandomGrid(), threshold=FixedRatio(0.5), placement=KeyValues(min_tokens=v)),
    ],
)
def test_a_bad_minimum_is_refused_naming_it(make: Callable[[object], MergeConfig], bad: object) -> None:
    with pytest.raises(TokenMergeError, match="min_tokens must be None"):
        make(bad)
