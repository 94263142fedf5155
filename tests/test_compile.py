"""Merging under torch.compile: no graph break and no recompile for fixed-ratio policies on a
generic block stack, a UNet, a DiT and a ViT; bounded recompiles for cached policies; plans that
survive CUDA-graph-style output reuse; the counter-based RNG; the fused best-match operator.

CPU only: dynamo's ``eager``/``aot_eager`` backends, tiny models, ``error_on_recompile``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo

import tokenmerge
from tokenmerge import MergeConfig
from tokenmerge.placements import ResidualRange
from tokenmerge.policies import (
    MergeContext,
    RandomGrid,
    RecomputeAt,
    SimilarityThreshold,
)
from tokenmerge.policies.best_match import best_match, best_match_reference
from tokenmerge.policies.rng import hash_randint, timestep_key
from tokenmerge.state import MergeState
from tokenmerge.tools.bench_models import Workload, build_model, get_arch


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch and leaves no compiled state or config behind."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return gm


class StaticOutputBackend(CountingBackend):
    """Mimics CUDA graphs on the CPU: every call writes its outputs into the same static buffers.

    A plan cached from one call's outputs would be overwritten by the next call, as a CUDA
    graph replay overwrites its static outputs; results then differ from eager mode.
    """

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        buffers: dict[int, torch.Tensor] = {}

        def run(*args: Any) -> Any:
            outputs = gm(*args)
            flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            static = []
            for i, out in enumerate(flat):
                if isinstance(out, torch.Tensor) and not out._is_view():
                    buf = buffers.get(i)
                    if buf is None or buf.shape != out.shape or buf.dtype != out.dtype:
                        buf = buffers[i] = torch.empty_like(out)
                    buf.copy_(out)
                    static.append(buf)
                else:
                    static.append(out)
            return type(outputs)(static) if isinstance(outputs, (list, tuple)) else static[0]

        return run


# ---------------------------------------------------------------------- models
_SMALL_UNET = {  # two levels keep dynamo's tracing short; the top level merges
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def _tiny(name: str, resolution: int) -> Workload:
    spec = get_arch(name)
    if name == "sd15-tiny":
        spec = dataclasses.replace(spec, config={**spec.config, **_SMALL_UNET})
    model = build_model(spec, resolution)
    return Workload(spec, model, 2, resolution, torch.device("cpu"), torch.float32, schedule=4)


def _dit_block_config() -> MergeConfig:
    return MergeConfig(
        matcher=RandomGrid(2, 2),
        threshold=tokenmerge.policies.FixedRatio(0.5),
        seed=0,
        placement=ResidualRange(0, 3, prop_attn=True),
    )


FIXED_CASES = {
    "unet-tomesd": ("sd15-tiny", 64, lambda: tokenmerge.ToMeSD(0.5, seed=0)),
    "dit-block-range": ("dit-xl-2-tiny", 64, _dit_block_config),
    "pixart-tomesd": ("pixart-alpha-tiny", 64, lambda: tokenmerge.ToMeSD(0.5, seed=0)),
    "vit-tome": ("vit-tiny", 64, lambda: tokenmerge.ToMe(4)),
}


@pytest.mark.parametrize("case", list(FIXED_CASES))
def test_fixed_ratio_compiles_fullgraph_without_recompiles(case: str) -> None:
    name, resolution, make_config = FIXED_CASES[case]
    work = _tiny(name, resolution)
    handle = tokenmerge.apply(work.model, make_config())
    assert handle.state.traceable
    with torch.no_grad():
        expected = [work.step(work.model, i) for i in range(3)]
        backend = CountingBackend()
        compiled = torch.compile(work.model, backend=backend, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [work.step(compiled, i) for i in (0, 1, 2, 0, 1)]
    assert backend.graphs == 1  # one graph, no break (fullgraph), no recompile over timesteps
    for out, ref in zip(got, expected + expected[:2]):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert sum(a - b for a, b in handle.state.merged_tokens.values()) > 0  # it did merge
    handle.remove()


def test_generic_block_stack_compiles_fullgraph(block_stack: torch.nn.Module) -> None:
    handle = tokenmerge.apply(block_stack, MergeConfig(matcher=RandomGrid(2, 2), threshold=_ratio(0.5), seed=3))
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        expected = block_stack(x)
        compiled = torch.compile(block_stack, backend="aot_eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    handle.remove()


def _ratio(value: float) -> tokenmerge.policies.FixedRatio:
    return tokenmerge.policies.FixedRatio(value)


def test_cached_policy_compiles_with_bounded_recompiles_and_survives_output_reuse() -> None:
    """CAToMe under compile: graph breaks at planning only, no new graph after one schedule, and
    results equal eager even when every compiled call overwrites its outputs (as a CUDA graph
    replay does), so the plans it caches across steps are never a graph's output."""
    work = _tiny("sd15-tiny", 64)
    handle = tokenmerge.apply(work.model, tokenmerge.CAToMe(0.3, recompute_at=[0, 2], buckets=4, seed=0))
    assert not handle.state.traceable
    with torch.no_grad():
        expected = [work.step(work.model, i).clone() for i in range(3)]
        backend = StaticOutputBackend()
        compiled = torch.compile(work.model, backend=backend)
        first = [work.step(compiled, i).clone() for i in range(3)]  # one whole schedule: every recompile
        graphs = backend.graphs
        second = [work.step(compiled, i).clone() for i in range(3)]
    assert backend.graphs == graphs  # the next schedule compiles nothing new
    assert handle.state.plans_reused > 0  # cache hits under compile (counted per generation)
    for out, ref in zip(first + second, expected + expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    handle.remove()


def test_removing_the_hooks_after_compiling_gives_the_plain_model_back(block_stack: torch.nn.Module) -> None:
    x = torch.randn(2, 64, 16)
    config = MergeConfig(matcher=RandomGrid(2, 2), threshold=SimilarityThreshold(-1.0), cache=RecomputeAt([0]))
    with torch.no_grad():
        plain = block_stack(x)
        handle = tokenmerge.apply(block_stack, config)
        compiled = torch.compile(block_stack, backend="eager")
        merged = compiled(x)
        handle.remove()
        after = compiled(x)  # guards on hooks: the merging code is not reused
    assert not torch.allclose(merged, plain)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-6)


def test_presets_say_whether_they_trace() -> None:
    assert MergeState(tokenmerge.ToMeSD(0.5)).traceable
    assert MergeState(tokenmerge.ToMe(8)).traceable
    assert MergeState(tokenmerge.ToDo(2)).traceable
    assert not MergeState(tokenmerge.CAToMe(0.7)).traceable
    assert not MergeState(tokenmerge.ToMeSD(0.5).replace(cache=RecomputeAt([0]))).traceable


def test_traceable_state_reads_no_timestep_on_the_host() -> None:
    state = MergeState(tokenmerge.ToMeSD(0.5, seed=0))
    timestep = torch.tensor(981.0)
    state.observe_timestep(timestep)
    assert state.timestep is timestep and state.step is None  # kept as given; no step bookkeeping


# ---------------------------------------------------------------------- random partitions
def test_hash_rng_is_keyed_deterministic_and_leaves_the_global_rng() -> None:
    before = torch.random.get_rng_state()
    a = hash_randint(4, (8, 8), timestep_key(torch.tensor(981.0)) + 7)
    b = hash_randint(4, (8, 8), timestep_key(torch.tensor(981.0)) + 7)
    c = hash_randint(4, (8, 8), timestep_key(torch.tensor(961.0)) + 7)
    d = hash_randint(4, (8, 8), timestep_key(981.0) + 7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 4 and len(a.unique()) == 4  # all four offsets occur
    counts = torch.bincount(hash_randint(4, (64, 64), 12345).flatten(), minlength=4).float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.03  # close to uniform


def test_hash_rng_is_bit_identical_under_compile() -> None:
    def draw(t: torch.Tensor) -> torch.Tensor:
        return hash_randint(4, (16, 16), timestep_key(t) + 99)

    t = torch.tensor([499.0, 499.0])
    torch.testing.assert_close(torch.compile(draw, backend="aot_eager", fullgraph=True)(t), draw(t), rtol=0, atol=0)


def test_random_grid_draw_follows_seed_layer_and_timestep() -> None:
    matcher = RandomGrid(2, 2)
    metric = torch.randn(1, 64, 4)

    def dst(seed: int, layer: int, t: float) -> torch.Tensor:
        ctx = MergeContext(grid=(8, 8), seed=seed, layer_index=layer, timestep=torch.tensor(t))
        return matcher.match(metric, ctx).dst_idx

    assert torch.equal(dst(0, 0, 999.0), dst(0, 0, 999.0))
    assert not torch.equal(dst(0, 0, 999.0), dst(0, 0, 979.0))
    assert not torch.equal(dst(0, 0, 999.0), dst(0, 1, 999.0))
    assert not torch.equal(dst(0, 0, 999.0), dst(1, 0, 999.0))


# ---------------------------------------------------------------------- similarity buckets
def test_similarity_buckets_bound_the_token_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    plain, bucketed = SimilarityThreshold(0.9), SimilarityThreshold(0.9, buckets=4)
    matcher, ctx = RandomGrid(2, 2, use_rand=False), MergeContext(grid=(8, 8))
    base = matcher.match(torch.randn(1, 64, 32, generator=gen), ctx)
    src, dst = base.src_idx[0], base.dst_idx[0]
    seen = set()
    for duplicates in range(0, 49, 3):
        metric = torch.randn(2, 64, 32, generator=gen)  # unrelated tokens: cosines far below 0.9
        copied = dst[torch.arange(duplicates) % len(dst)]
        metric[:, src[:duplicates]] = metric[:, copied]  # these sources copy a destination
        matching = matcher.match(metric, ctx)
        r, rb = plain.num_merged(matching, ctx), bucketed.num_merged(matching, ctx)
        assert r == duplicates  # exactly the pairs at or above the threshold
        assert rb <= r and rb % 12 == 0  # rounded down to a multiple of 48 / 4: never a pair below T
        seen.add(rb)
    assert seen == {0, 12, 24, 36, 48}  # buckets + 1 token counts, so at most that many compiles


# ---------------------------------------------------------------------- fused best match
def test_best_match_operator_traces_as_one_node() -> None:
    src, dst = torch.randn(2, 12, 8), torch.randn(2, 5, 8)

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.tokenmerge.best_match(a, b)

    score, best = torch.compile(f, backend="aot_eager", fullgraph=True)(src, dst)
    ref_score, ref_best = best_match_reference(src, dst)
    torch.testing.assert_close(score, ref_score)
    assert torch.equal(best, ref_best)
    assert torch.equal(best_match(src, dst)[1], ref_best)
    torch.library.opcheck(torch.ops.tokenmerge.best_match.default, (src, dst))


def test_the_fused_kernel_dispatch_traces_without_a_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path a GPU takes (mode, device and size checks, then the custom op) is traceable; on the
    CPU the operator's implementation is the PyTorch form."""
    from tokenmerge.policies import best_match as module

    monkeypatch.setattr(module, "KERNEL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(module, "_TRITON", True)
    module.set_triton_mode("1")
    try:
        metric = torch.randn(2, 64, 8).to(torch.bfloat16)
        ctx = MergeContext(grid=(8, 8), seed=0, timestep=torch.tensor(5.0))
        assert module.triton_enabled(metric[:, :4], metric[:, 4:])

        def match(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            matching = RandomGrid(2, 2).match(m, ctx)
            return matching.score, matching.best

        score, best = torch.compile(match, backend="aot_eager", fullgraph=True)(metric)
        ref_score, ref_best = match(metric)
    finally:
        module.set_triton_mode("auto")
    torch.testing.assert_close(score, ref_score)
    assert torch.equal(best, ref_best)


def test_triton_kernel_matches_reference_in_the_interpreter() -> None:
    # Triton's CPU interpreter runs the fused kernel's own code (tl.dot, running argmax, masks).
    script = textwrap.dedent(
        """
        import torch
        from tokenmerge.policies.best_match import best_match_reference, launch_kernel
        for batch, num_src, num_dst, channels in [(2, 70, 37, 40), (1, 5, 1, 3)]:
            gen = torch.Generator().manual_seed(num_src)
            src = torch.randn(batch, num_src, channels, generator=gen)
            dst = torch.randn(batch, num_dst, channels, generator=gen)
            score, best = launch_kernel(src, dst)
            ref_score, ref_best = best_match_reference(src, dst)
            torch.testing.assert_close(score, ref_score, rtol=1e-4, atol=1e-4)
            assert torch.equal(best, ref_best), (best, ref_best)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------------- CA-ToMe compiled
@pytest.mark.parametrize("automatic_dynamic", [True, False], ids=["dynamic-shapes", "static-shapes"])
def test_catome_compiles_once_and_cache_hits_skip_the_matching(
    monkeypatch: pytest.MonkeyPatch, automatic_dynamic: bool
) -> None:
    """CA-ToMe (threshold 0.7, counts in 4 buckets) on a UNet: planning stays out of the graph, merge
    and unmerge inside it; the first generation compiles every graph, a second one compiles nothing
    (``error_on_recompile``); a step that reuses the cached plans never calls the matcher; the
    results are the eager run's of the same config. Both with dynamo's automatic dynamic shapes and
    without (every token count its own graph, as CUDA graphs record one per shape): the bucketed
    counts take at most ``buckets + 1`` values per layer."""
    work = _tiny("sd15-tiny", 64)
    buckets = 4
    handle = tokenmerge.apply(work.model, tokenmerge.CAToMe(0.7, recompute_at=[0, 2, 3], buckets=buckets, seed=0))
    matches: list[int] = []
    original = RandomGrid.match

    def counting_match(self: RandomGrid, metric: torch.Tensor, ctx: MergeContext) -> Any:
        matches.append(ctx.step)
        return original(self, metric, ctx)

    monkeypatch.setattr(RandomGrid, "match", counting_match)
    steps = range(4)
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=automatic_dynamic):
        expected = [work.step(work.model, i).clone() for i in steps]
        layers = len(handle.state.merged_tokens)
        assert layers == 3 and sorted(set(matches)) == [0, 2, 3]  # eager: matched at the recompute steps only
        backend = CountingBackend()
        compiled = torch.compile(work.model, backend=backend)
        first = [work.step(compiled, i).clone() for i in steps]
        graphs = backend.graphs
        matches.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = [work.step(compiled, i).clone() for i in steps]
    assert backend.graphs == graphs  # nothing new compiled in the second generation
    assert matches == [0] * layers + [2] * layers + [3] * layers  # the hit at step 1 matched nothing
    assert handle.state.plans_reused == layers
    counts = {n_out for _, n_out in handle.state.merged_tokens.values()}
    assert all((64 - n) % (48 // buckets) == 0 for n in counts)  # multiples of max_merge / buckets (48 sources)
    for out, ref in zip(first + second, expected + expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    handle.remove()
