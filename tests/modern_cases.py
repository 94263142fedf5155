"""Shared helpers of the tests of the MM-DiT and video families (tests/test_modern_*.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge
from tokenmerge import MergeConfig
from tokenmerge.placements import ResidualRange
from tokenmerge.policies import FixedRatio, MergeContext, RandomGrid, RecomputeAt


def range_config(first: int, last: int, prop_attn: bool = True, ratio: float = 0.5, **grid: int) -> MergeConfig:
    """A `ResidualRange` config over blocks ``first..last`` with a 2x2 random grid."""
    return MergeConfig(
        matcher=RandomGrid(grid.get("sx", 2), grid.get("sy", 2), st=grid.get("st", 1)),
        threshold=FixedRatio(ratio),
        placement=ResidualRange(first, last, prop_attn),
        seed=0,
    )


def run(call: Callable[[], Any]) -> torch.Tensor:
    """The model output of ``call()`` without gradients (``.sample`` or the first element)."""
    with torch.no_grad():
        out = call()
    return out.sample if hasattr(out, "sample") else out[0]


def flops(call: Callable[[], Any]) -> int:
    """FLOPs of ``call()``, attention included (the math SDPA kernel: matmuls the counter sees on a CPU)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(call)
    return counter.get_total_flops()


def check_merges_and_removes(model: torch.nn.Module, call: Callable[[], Any], config: MergeConfig) -> None:
    """``config`` merges (fewer FLOPs, a different output, every merging layer fewer tokens); remove() is bitwise."""
    plain, plain_flops = run(call), flops(call)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    handle = tokenmerge.apply(model, config)
    merged, merged_flops = run(call), flops(call)
    assert merged_flops < plain_flops, (merged_flops, plain_flops)
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert handle.state.merged_tokens
    for tokens_in, tokens_out in handle.state.merged_tokens.values():
        assert tokens_out < tokens_in
    handle.remove()
    assert torch.equal(run(call), plain)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def check_ratio_zero(model: torch.nn.Module, call: Callable[[], Any], config: MergeConfig) -> None:
    """A config that merges nothing leaves the output bitwise."""
    plain = run(call)
    with tokenmerge.apply(model, config):
        assert torch.equal(run(call), plain)


class SpyRecomputeAt(RecomputeAt):
    """CA-ToMe's cache, recording the (step, call) of every plan it stores."""

    def __init__(self, steps: Any) -> None:
        super().__init__(steps)
        self.computed_at: list[tuple[int | None, int]] = []

    def store(self, key: Any, plan: Any, metric: Any, ctx: MergeContext, protected: int = 0) -> Any:
        self.computed_at.append((ctx.step, ctx.call_index))
        return super().store(key, plan, metric, ctx, protected)

    def reset(self) -> None:
        super().reset()
        self.computed_at = []


def spy_catome(steps: tuple[int, ...]) -> MergeConfig:
    """CA-ToMe (threshold 0: merges) recomputing at ``steps``, with a `SpyRecomputeAt` cache."""
    return tokenmerge.CAToMe(threshold=0.0, recompute_at=steps, seed=0).replace(cache=SpyRecomputeAt(steps))


class GridRecorder(RandomGrid):
    """A random-grid matcher that records the grid of every call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, ...] | None] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> GridRecorder:
        return self  # apply copies the config: the copy records into the same list

    def match(self, metric: torch.Tensor, ctx: MergeContext) -> Any:
        self.seen.append(ctx.grid)
        return super().match(metric, ctx)
