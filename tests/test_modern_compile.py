"""MM-DiT and video families under torch.compile(fullgraph=True): fixed-ratio presets, no recompiles.

SD3 (joint attention, text after the image; ToMeSD, ToDo, a residual range) and Wan
(video grid, rotary tables selected per sample) compile to one graph that serves every
denoising step. CPU, dynamo's ``aot_eager`` backend, ``error_on_recompile``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from modern_cases import range_config

import tokenmerge
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them through aot_eager."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)


def sd3_step() -> tuple[torch.nn.Module, Callable[[torch.nn.Module, float], torch.Tensor]]:
    model = tiny.tiny_sd3()
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 16, 12, generator=gen)
    text = torch.randn(2, 5, tiny.JOINT_TEXT_DIM, generator=gen)
    pooled = torch.randn(2, tiny.SD3_POOLED_DIM, generator=gen)

    def step(m: torch.nn.Module, t: float) -> torch.Tensor:
        timestep = torch.full((2,), t)
        return m(hidden_states=latent, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)[0]

    return model, step


def wan_step() -> tuple[torch.nn.Module, Callable[[torch.nn.Module, float], torch.Tensor]]:
    model = tiny.tiny_wan()
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 3, 8, 6, generator=gen)
    text = torch.randn(2, 5, tiny.JOINT_TEXT_DIM, generator=gen)

    def step(m: torch.nn.Module, t: float) -> torch.Tensor:
        return m(hidden_states=latent, encoder_hidden_states=text, timestep=torch.full((2,), t))[0]

    return model, step


CASES = {
    "sd3-tomesd": (sd3_step, lambda: tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0)),
    "sd3-todo": (sd3_step, lambda: tokenmerge.ToDo(2)),
    "wan-tomesd": (wan_step, lambda: tokenmerge.ToMeSD(0.5, st=2, seed=0)),
    "wan-range": (wan_step, lambda: range_config(0, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fixed_ratio_compiles_fullgraph_without_recompiles(case: str) -> None:
    build, make_config = CASES[case]
    model, step = build()
    handle = tokenmerge.apply(model, make_config())
    assert handle.state.traceable
    timesteps = (900.0, 600.0, 300.0)
    with torch.no_grad():
        expected = [step(model, t) for t in timesteps]
        backend = CountingBackend()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [step(compiled, t) for t in timesteps + timesteps[:2]]
    assert backend.graphs == 1  # one graph, no break (fullgraph), no recompile over timesteps
    for out, ref in zip(got, expected + expected[:2], strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert sum(a - b for a, b in handle.state.merged_tokens.values()) > 0  # it did merge
    handle.remove()


def test_flux_compiles_per_block_without_recompiles_and_reads_its_ids_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flux's token grid comes from its position ids, read on the host outside the compiled blocks.

    The way diffusers compiles Flux, `compile_repeated_blocks(fullgraph=True)`, compiles each
    double- and single-stream block with its merge hooks; the grid is read once per ids
    tensor (the pipeline passes the same one at every step), not once per step.
    """
    from tokenmerge.adapters.diffusion_layout import DenoiserLayout

    reads = []
    original = DenoiserLayout.grid_of_ids

    def counting(self: DenoiserLayout, ids: object) -> Any:
        reads.append(1)
        return original(self, ids)

    monkeypatch.setattr(DenoiserLayout, "grid_of_ids", counting)
    model = tiny.tiny_flux()
    inputs = tiny.flux_inputs(batch=1, height=8, width=6)
    handle = tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, merge_mlp=True, seed=0))
    assert handle.state.traceable
    timesteps = (0.9, 0.6, 0.3)

    def step(m: torch.nn.Module, t: float) -> torch.Tensor:
        return m(**{**inputs, "timestep": torch.full((1,), t)})[0]

    with torch.no_grad():
        expected = [step(model, t) for t in timesteps]
        assert len(reads) == 1  # three calls, one host read of the same img_ids
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        step(model, timesteps[0])  # compiles each block class once
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [step(model, t) for t in timesteps]
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert sum(a - b for a, b in handle.state.merged_tokens.values()) > 0  # it did merge
    fresh = inputs["img_ids"].clone()
    with torch.no_grad():
        model(**{**inputs, "img_ids": fresh, "timestep": torch.full((1,), 0.5)})
    assert len(reads) == 2  # a new ids tensor is read again


def test_flux_ids_made_under_inference_mode_are_read() -> None:
    """Inference tensors have no version counter: the grid is still read, and read once per ids tensor."""
    model = tiny.tiny_flux()
    with torch.inference_mode():
        inputs = tiny.flux_inputs(batch=1, height=8, width=6)
        plain = model(**inputs)[0]
        with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0)) as handle:
            merged = [model(**inputs)[0] for _ in range(2)]
            assert sum(a - b for a, b in handle.state.merged_tokens.values()) > 0
    assert torch.equal(merged[0], merged[1]) and not torch.equal(merged[0], plain)
