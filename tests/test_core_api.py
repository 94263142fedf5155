"""apply / remove on the generic block-stack adapter, custom policies, laziness."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.policies import (
    AlternatingBipartite,
    CacheEntry,
    FixedRatio,
    Matcher,
    Matching,
    MergeContext,
    PairCache,
    RandomGrid,
    ThresholdPolicy,
)


def run(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def tokens() -> Tensor:
    return torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))


def test_import_does_not_import_diffusers_timm_or_transformers() -> None:
    code = (
        "import sys, tokenmerge, tokenmerge.policies, tokenmerge.adapters, tokenmerge.adapters.stream; "
        "print(sorted(m for m in ('diffusers', 'timm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "config",
    [
        tokenmerge.ToMeSD(ratio=0.5, seed=0, merge_mlp=True),
        tokenmerge.CAToMe(threshold=0.2, seed=0),
        tokenmerge.ToMe(r=8).replace(mode="mean"),
        MergeConfig(matcher=AlternatingBipartite(), threshold=FixedRatio(0.3), mode="weighted"),
    ],
    ids=["tomesd", "catome", "tome", "custom"],
)
def test_apply_changes_output_and_remove_restores_it_bitwise(block_stack, tokens: Tensor, config: MergeConfig) -> None:
    before = run(block_stack, tokens)
    state = copy.deepcopy(block_stack.state_dict())
    handle = tokenmerge.apply(block_stack, config)
    merged = run(block_stack, tokens)
    assert merged.shape == before.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, before)
    assert handle.state.plans_computed > 0
    handle.remove()
    assert torch.equal(run(block_stack, tokens), before)
    assert hooks_of(block_stack) == 0
    assert all(torch.equal(v, state[k]) for k, v in block_stack.state_dict().items())
    assert tokenmerge.get_handle(block_stack) is None


def test_ratio_zero_and_threshold_one_are_bitwise_identity(block_stack, tokens: Tensor) -> None:
    before = run(block_stack, tokens)
    for config in (tokenmerge.ToMeSD(ratio=0.0), tokenmerge.CAToMe(threshold=1.0), tokenmerge.ToMe(r=0)):
        with tokenmerge.apply(block_stack, config):
            assert torch.equal(run(block_stack, tokens), before)


def test_apply_twice_replaces_and_remove_by_target(block_stack, tokens: Tensor) -> None:
    before = run(block_stack, tokens)
    tokenmerge.apply(block_stack, tokenmerge.ToMeSD(ratio=0.5, seed=0))
    hooks_once = hooks_of(block_stack)
    handle = tokenmerge.apply(block_stack, tokenmerge.ToMeSD(ratio=0.25, seed=0, merge_mlp=True))
    assert hooks_of(block_stack) > hooks_once  # the old hooks went, the new set has more
    assert tokenmerge.get_handle(block_stack) is handle
    assert tokenmerge.remove(block_stack) is True
    assert tokenmerge.remove(block_stack) is False
    assert torch.equal(run(block_stack, tokens), before)


def test_failed_apply_leaves_the_model_untouched(block_stack, tokens: Tensor) -> None:
    handle = tokenmerge.apply(block_stack, tokenmerge.ToMeSD(ratio=0.5, seed=0))
    merged = run(block_stack, tokens)
    hooks = hooks_of(block_stack)
    with pytest.raises(TokenMergeError, match="merge_crossattn must be False"):
        tokenmerge.apply(block_stack, tokenmerge.ToMeSD(ratio=0.5, merge_crossattn=True))
    assert hooks_of(block_stack) == hooks and tokenmerge.get_handle(block_stack) is handle
    handle.reset()
    assert torch.equal(run(block_stack, tokens), merged)  # same seed after reset: same output
    handle.remove()


def test_unsupported_target_names_what_is_supported() -> None:
    with pytest.raises(TokenMergeError, match="target must be one of: .*UNet2DConditionModel.*VisionTransformer"):
        tokenmerge.apply(nn.Linear(3, 3), tokenmerge.ToMeSD())
    with pytest.raises(TokenMergeError, match="config must be a tokenmerge.MergeConfig"):
        tokenmerge.apply(nn.Linear(3, 3), {"ratio": 0.5})  # type: ignore[arg-type]


class CosineToFirst(Matcher):
    """A user matcher: the first quarter of the tokens are destinations."""

    max_ratio = 0.75

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        n = metric.shape[1]
        dst = torch.arange(n // 4, device=metric.device)
        src = torch.arange(n // 4, n, device=metric.device)
        return Matching.by_similarity(metric, src, dst)


class HalfOfSources(ThresholdPolicy):
    """A user threshold policy: merge half of whatever the matcher offers."""

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        return matching.max_merge // 2


class OnlyFirstCall(PairCache):
    """A user cache: compute once, reuse forever (until reset)."""

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        return False


def test_user_written_policies_plug_in_without_library_edits(block_stack, tokens: Tensor) -> None:
    config = MergeConfig(matcher=CosineToFirst(), threshold=HalfOfSources(), cache=OnlyFirstCall())
    handle = tokenmerge.apply(block_stack, config)
    first = run(block_stack, tokens)
    second = run(block_stack, tokens)
    assert torch.equal(first, second)
    assert handle.state.plans_computed == 3 and handle.state.plans_reused == 3
    assert handle.state.merged_tokens["blocks.0"] == (64, 64 - 24)
    handle.remove()


def test_seeded_random_grid_is_reproducible_and_differs_across_seeds(block_stack, tokens: Tensor) -> None:
    outputs = []
    for seed in (3, 3, 4):
        with tokenmerge.apply(block_stack, tokenmerge.ToMeSD(ratio=0.5, seed=seed)):
            outputs.append(run(block_stack, tokens))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_protected_prefix_option_keeps_the_prefix(block_stack) -> None:
    x = torch.randn(1, 1 + 64, 16)
    config = MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), seed=0, options={"protected": 1})
    handle = tokenmerge.apply(block_stack, config)
    run(block_stack, x)
    assert handle.state.merged_tokens["blocks.0"] == (65, 65 - 32)
    handle.remove()
