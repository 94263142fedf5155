"""Timing, memory and compilation for `tokenmerge.tools.bench`.

Each call is timed on the device's own timeline: a pair of CUDA events around it, read
after one synchronisation at the end of the loop (a CPU timer when there is no GPU).
Compiled models are built fresh for every row after `torch._dynamo.reset`, so one row's
compiled code, guards and CUDA graphs never serve another.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import TokenMergeError
from .common import synchronize

__all__ = [
    "COMPILE_MODES",
    "resolve_dtype",
    "compile_model",
    "reset_compiler",
    "time_calls",
    "Timing",
    "CompileStats",
    "compile_stats",
    "count_ops",
    "OperatorCounter",
]

#: The modes a row can run in: eager, `torch.compile` default and CUDA-graph replay.
COMPILE_MODES: tuple[str, ...] = ("eager", "default", "reduce-overhead")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on a GPU, float32 on the CPU; else ``float16``/``bfloat16``/``float32``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    names.update({"float32": torch.float32, "fp32": torch.float32})
    if dtype not in names:
        raise TokenMergeError(f"dtype must be auto, float16, bfloat16 or float32; got {dtype!r}")
    return names[dtype]


def reset_compiler() -> None:
    """Forget every compiled graph, guard and CUDA graph, and the compile counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
        except ImportError:  # an older torch resets them in _dynamo.reset
            pass


def compile_model(
    model: nn.Module, mode: str, backend: str = "inductor", fullgraph: bool = False
) -> Callable[..., Any]:
    """``model`` itself for ``"eager"``; else `torch.compile` of it in ``mode``.

    ``mode`` is passed to inductor only (``default`` or ``reduce-overhead``); another
    ``backend`` (``eager``, ``aot_eager`` in tests) compiles with dynamo alone. Shapes are
    PyTorch's default: static until a size changes, then one recompile with that size
    symbolic (a cached policy's varying token counts), so recompiles stay bounded.
    """
    if mode == "eager":
        return model
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph}
    if backend == "inductor":
        options["mode"] = mode
    return torch.compile(model, **options)


@dataclass
class CompileStats:
    """What dynamo did: distinct graphs compiled and graph breaks met."""

    graphs: int
    breaks: int


def compile_stats() -> CompileStats:
    """The counters since the last `reset_compiler`."""
    counters = torch._dynamo.utils.counters
    return CompileStats(
        graphs=int(counters["stats"]["unique_graphs"]), breaks=int(sum(counters["graph_break"].values()))
    )


@dataclass
class Timing:
    """Per-call times of a timed loop, in milliseconds, and the loop's peak memory."""

    times_ms: list[float]
    peak_mb: float | None

    @property
    def median_ms(self) -> float:
        """Median over the calls."""
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        """Mean over the calls (the figure for cached policies: whole schedules, hits and misses)."""
        return statistics.fmean(self.times_ms)


def time_calls(
    run: Callable[[int], Any], indices: Sequence[int], device: torch.device, mark_step: bool = False
) -> Timing:
    """Time ``run(i)`` for each ``i`` of ``indices``, back to back.

    Args:
        run: one call (its result is dropped at once).
        indices: the argument of each timed call (the timestep index).
        device: CUDA events on a GPU, `time.perf_counter` otherwise.
        mark_step: call `torch.compiler.cudagraph_mark_step_begin` before each call
            (CUDA-graph replay: each call is a new step, its outputs may be overwritten).
    """
    mark = torch.compiler.cudagraph_mark_step_begin if mark_step else None
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in indices]
        for (start, end), i in zip(events, indices):
            if mark is not None:
                mark()
            start.record()
            run(i)
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        return Timing(times, torch.cuda.max_memory_allocated(device) / 2**20)
    times = []
    for i in indices:
        if mark is not None:
            mark()
        begin = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - begin) * 1e3)
    return Timing(times, None)


def timed_once(run: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run once (a first, compiling call) and return its result and wall time in seconds."""
    synchronize(device)
    begin = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - begin


class OperatorCounter(TorchDispatchMode):
    """Counts, by name, the ATen operators that compute (views left out) dispatched inside it.

    In eager mode on a GPU each one is at least one kernel launch. A custom operator (the
    fused best-match kernel) counts once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(call: Callable[[], Any]) -> int:
    """How many ATen operators that compute (views left out) one ``call`` dispatches.

    In eager mode on a GPU each one is at least one kernel launch, so this is the
    launch count that bounds a small step's time (on any device; it is not a timing).
    """
    with torch.inference_mode(), OperatorCounter() as counter:
        call()
    return sum(counter.counts.values())
