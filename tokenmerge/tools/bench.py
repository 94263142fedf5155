"""`tokenmerge bench`: speed and fidelity of token merging against the plain model.

One process, one run: build an architecture (built-in config with random weights, or
local weights), then for every row — the plain model, each method asked for, the
zero-overhead ideal at each method's token counts, and the tomesd library when it is
installed (UNets) — time one denoising step (one batch for a ViT) in eager mode and
compiled (`torch.compile` default and ``mode="reduce-overhead"``), with peak memory and
fidelity next to the speed. Prints a table, writes JSON, draws a speed-vs-fidelity PNG.

Figures per row and mode:

* ``ms``: median of CUDA-event-timed calls after warm-up (CPU timer without a GPU).
  Cached (stateful) policies are timed over whole timestep schedules and report the
  mean, so recompute steps and cache hits both count.
* ``speedup``: plain time / row time, both in the same mode; ``x eager``: against the
  plain model in eager mode.
* ``overhead``: ``(time - ideal) / (plain - ideal)`` in the same mode: 0 is the ideal,
  1 is no gain at all; the ideal replays the method's token counts with a slice for
  the merge and a repeat for the unmerge (`tokenmerge.tools.ideal`).
* ``rel L2``: relative L2 error of the output vs the plain model's (eager, same inputs);
  ``PSNR``: of the final latents of a short DDIM loop (same seed) vs plain, peak 1
  (`tokenmerge.tools.common.psnr`; diffusion;
  run in eager mode and shown on the compiled rows too, which ``cmp/eager`` checks);
  ``agree``: top-1 agreement with plain (ViT); ``cmp/eager``: relative L2 of the compiled
  output vs the same row in eager mode (a CUDA-graph replay check).
* ``merged``: tokens removed / tokens entering, over the merging layers. For a similarity
  threshold it depends on the inputs: random weights fed i.i.d. noise (``--inputs noise``,
  the default) have few similar tokens; ``--inputs smooth`` gives about the count trained
  weights give (`tokenmerge.tools.bench_models.smooth_noise`).
* ``ops`` (eager rows): ATen operators one call dispatches, views left out
  (`tokenmerge.tools.bench_timing.count_ops`; counted on one extra call at the schedule's
  first step, a recompute step for cached policies). On a GPU each is at least one
  kernel launch: the count that decides a launch-bound step. A count, not a timing, so
  it is the same on any device.
* ``compile s``: the first (compiling) call; ``+N``: seconds of the warm-up calls after it
  when over one (the recompiles of a cached policy's changing token counts).

Use it from Python (`run_bench`) or from the command line (`add_bench_arguments`,
`bench_main`; ``tokenmerge bench --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import torch

from ..errors import TokenMergeError
from .bench_methods import Method, mean_token_counts, merged_fraction, parse_method, tomesd_available
from .bench_models import ARCHS, INPUT_KINDS, ArchSpec, Workload, build_model, get_arch
from .bench_timing import (
    COMPILE_MODES,
    compile_model,
    compile_stats,
    count_ops,
    reset_compiler,
    resolve_dtype,
    time_calls,
    timed_once,
)
from .common import device_argument, psnr, resolve_device
from .common import progress as progress_bar

__all__ = [
    "BenchRow",
    "BenchResult",
    "BenchSession",
    "run_bench",
    "add_bench_arguments",
    "bench_main",
    "DEFAULT_METHODS",
    "row_line",
]

#: Methods benchmarked when none are named, per model family.
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {
    "unet": ("tomesd:0.5", "catome:0.7"),
    "dit": ("block:0.5",),
    "pixart": ("block:0.5",),
    "flux": ("tomesd:0.5", "block:0.5"),
    "sd3": ("tomesd:0.5", "block:0.5"),
    "wan": ("tomesd:0.5", "block:0.5"),
    "vit": ("tome:13",),
    "hf-vit": ("tome:13",),
}


@dataclass
class BenchRow:
    """One row of the table: one method in one mode. Times in ms, memory in MiB; None where not measured."""

    arch: str
    resolution: int
    batch: int
    dtype: str
    mode: str
    method: str
    kind: str
    spec: str
    status: str = "ok"
    time_ms: float | None = None
    median_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    calls: int = 0
    speedup: float | None = None
    speedup_vs_eager: float | None = None
    ideal_ms: float | None = None
    overhead: float | None = None
    merged: float | None = None
    tokens: dict[str, int] | None = None
    rel_l2: float | None = None
    psnr_db: float | None = None
    agree: float | None = None
    compiled_vs_eager: float | None = None
    peak_mb: float | None = None
    ops: int | None = None
    compile_s: float | None = None
    warmup_s: float | None = None
    graphs: int | None = None
    breaks: int | None = None
    recompiles_in_timing: int | None = None
    ideal_label: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the row was measured."""
        return self.status == "ok"


@dataclass
class BenchResult:
    """The rows of one `run_bench` call and the environment they were measured in."""

    meta: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (infinite PSNR becomes the string ``"inf"``)."""
        return {"meta": self.meta, "rows": [_json_safe(asdict(row)) for row in self.rows]}

    def table(self) -> str:
        """The text table (see `format_table`)."""
        return format_table(self.rows, self.meta)

    @property
    def errors(self) -> list[BenchRow]:
        """Rows that failed."""
        return [row for row in self.rows if row.status.startswith("error")]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------- fidelity
def rel_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float32."""
    output, reference = output.float(), reference.float()
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def top1_agreement(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the reference's."""
    return float((output.argmax(-1) == reference.argmax(-1)).float().mean())


# ---------------------------------------------------------------------- environment
def environment(device: torch.device, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Card, driver, library versions, command and date, for the record."""
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "command": " ".join(argv if argv is not None else sys.argv),
    }
    for name in ("diffusers", "timm", "tomesd", "triton", "tokenmerge"):
        meta[name] = _version(name)
    if device.type == "cuda":
        meta["card"] = torch.cuda.get_device_name(device)
        meta["driver"] = _driver_version()
    else:
        meta["card"] = platform.processor() or platform.machine()
        meta["threads"] = torch.get_num_threads()
    return meta


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        module = sys.modules.get(package)
        return getattr(module, "__version__", None)


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


# ---------------------------------------------------------------------- the run
class _Budget:
    """Skips compiled rows that would not finish before a deadline."""

    def __init__(self, seconds: float | None, compile_estimate_s: float) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.estimate = compile_estimate_s
        self.seen: list[float] = []

    def allows(self, extra_s: float) -> bool:
        if self.deadline is None:
            return True
        expected = max(self.seen) if self.seen else self.estimate
        return time.monotonic() + expected + extra_s <= self.deadline

    def allows_eager(self, extra_s: float) -> bool:
        return self.deadline is None or time.monotonic() + extra_s <= self.deadline

    def observe(self, compile_s: float) -> None:
        self.seen.append(compile_s)


class RowTimeout(Exception):
    """A row ran past ``row_timeout_s`` (raised by the watchdog alarm)."""


@contextlib.contextmanager
def _watchdog(seconds: float | None) -> Iterator[None]:
    """Raise `RowTimeout` in this thread after ``seconds`` (POSIX main thread only; else no limit)."""
    usable = (
        seconds is not None and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row ran past its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def row_line(row: BenchRow) -> str:
    """One line saying what a finished row measured (``sd15-tiny default ToMeSD(0.5): 41.2 ms, compiled in 30.1 s``)."""
    head = f"{row.arch} {row.mode} {row.method}"
    if not row.ok:
        return f"{head}: {row.status}"
    parts = [f"{row.time_ms:.1f} ms" if row.time_ms is not None else "no time"]
    if row.merged is not None:
        parts.append(f"merged {row.merged:.0%}")
    if row.compile_s is not None:
        parts.append(f"compiled in {row.compile_s:.1f} s")
    return f"{head}: {', '.join(parts)}"


class _Runner:
    """State of one `run_bench` call: the model, its inputs and the rows so far."""

    def __init__(self, work: Workload, options: dict[str, Any], result: BenchResult, bar: Any) -> None:
        self.work, self.opt, self.result, self.bar = work, options, result, bar
        self.model = work.model
        self.device = work.device
        self.eager_out: dict[str, torch.Tensor] = {}
        self.plain_out: torch.Tensor | None = None
        self.plain_latents: torch.Tensor | None = None
        self.budget: _Budget = options["budget"]

    # ------------------------------------------------------------------ helpers
    def _row(self, method: Method, mode: str) -> BenchRow:
        work = self.work
        return BenchRow(
            arch=work.spec.name,
            resolution=work.resolution,
            batch=work.batch,
            dtype=str(work.dtype).replace("torch.", ""),
            mode=mode,
            method=method.label,
            kind=method.kind,
            spec=method.spec,
        )

    def _indices(self, method: Method, count: int) -> list[int]:
        cycle = self.work.cycle
        if method.stateful:
            count = max(1, math.ceil(count / cycle)) * cycle
        return [i % cycle for i in range(count)]

    def _fidelity(self, row: BenchRow, output: torch.Tensor) -> None:
        if self.plain_out is None:
            return
        row.rel_l2 = rel_l2(output, self.plain_out)
        if not self.work.spec.diffusion:
            row.agree = top1_agreement(output, self.plain_out)

    def _finish(self, row: BenchRow) -> BenchRow:
        self.result.rows.append(row)
        self.bar.update(1)
        log = self.opt.get("log")
        if log is not None:
            log(row_line(row))
        return row

    # ------------------------------------------------------------------ eager
    def eager(self, method: Method) -> tuple[BenchRow, dict[str, int] | None]:
        """Time ``method`` in eager mode, with fidelity; returns the row and its mean token counts."""
        row = self._row(method, "eager")
        opt, work = self.opt, self.work
        if not self.budget.allows_eager(0.0):
            row.status = "skipped: time budget"
            return self._finish(row), None
        snapshots: list[dict[str, tuple[int, int]]] = []
        detach, handle = method.attach(self.model)
        try:
            output = work.step(self.model, 0).float()
            if method.kind == "plain":
                self.plain_out = output
            self.eager_out[method.label] = output
            self._fidelity(row, output)
            if opt["fidelity"] and work.spec.diffusion and method.kind != "ideal":
                latents = work.sample(self.model, opt["sample_steps"], seed=opt["seed"])
                if method.kind == "plain":
                    self.plain_latents = latents
                elif self.plain_latents is not None:
                    row.psnr_db = psnr(latents, self.plain_latents)
                method.extra["psnr_db"] = row.psnr_db

            def warm(i: int) -> None:
                work.step(self.model, i)
                if handle is not None:
                    snapshots.append(dict(handle.state.merged_tokens))

            for i in self._indices(method, opt["warmup"]):
                warm(i)
            timing = time_calls(lambda i: work.step(self.model, i), self._indices(method, opt["repeats"]), self.device)
            _record_timing(row, timing, method.stateful)
            row.ops = count_ops(lambda: work.step(self.model, 0))  # one more call, after the timed ones
        except Exception as error:  # noqa: BLE001 - one failing row must not end the run
            row.status = _error(error)
        finally:
            detach()
        counts = mean_token_counts(snapshots) if snapshots else None
        if counts is not None:
            row.tokens = counts
            row.merged = _merged_from_counts(snapshots)
            method.extra["merged"] = row.merged
        return self._finish(row), counts

    # ------------------------------------------------------------------ compiled
    def compiled(self, method: Method, mode: str) -> BenchRow:
        """Time ``method`` compiled in ``mode``, with a check against its eager output."""
        row = self._row(method, mode)
        opt = self.opt
        if method.kind == "tomesd" and not opt["tomesd_compile"]:
            row.status = "skipped: tomesd is not compiled (graph breaks on its torch.Generator; see ANCHORS)"
            return self._finish(row)
        if not self.budget.allows(0.0):
            row.status = "skipped: time budget"
            return self._finish(row)
        reset_compiler()
        detach, handle = method.attach(self.model)
        mark = mode == "reduce-overhead"
        try:
            with _watchdog(opt["row_timeout_s"]):
                self._compiled_body(method, mode, row, mark)
        except RowTimeout as error:
            row.status = f"skipped: {error}"
        except Exception as error:  # noqa: BLE001 - one failing row must not end the run
            row.status = _error(error)
        finally:
            detach()
            reset_compiler()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self._finish(row)

    def _compiled_body(self, method: Method, mode: str, row: BenchRow, mark: bool) -> None:
        opt, work = self.opt, self.work
        fullgraph = opt["fullgraph"] and method.kind in ("plain", "ideal", "tokenmerge") and not method.stateful
        fn = compile_model(self.model, mode, opt["backend"], fullgraph=fullgraph)

        def call(i: int) -> torch.Tensor:
            if mark:
                torch.compiler.cudagraph_mark_step_begin()
            return work.step(fn, i)

        _, row.compile_s = timed_once(lambda: call(0).float().clone(), self.device)
        self.budget.observe(row.compile_s)
        warm = self._indices(method, max(opt["warmup"], 2 if mark else 1))
        _, row.warmup_s = timed_once(lambda: [call(i) for i in warm], self.device)  # recompiles of cached policies
        before = compile_stats()
        timing = time_calls(call, self._indices(method, opt["repeats"]), self.device, mark_step=mark)
        after = compile_stats()
        _record_timing(row, timing, method.stateful)
        row.graphs, row.breaks = after.graphs, after.breaks
        row.recompiles_in_timing = after.graphs - before.graphs
        output = call(0).float().clone()
        self._fidelity(row, output)
        eager = self.eager_out.get(method.label)
        if eager is not None:
            row.compiled_vs_eager = rel_l2(output, eager)
        row.merged = method.extra.get("merged")  # counted in the eager run (same config)
        row.psnr_db = method.extra.get("psnr_db")  # the eager sampling loop; cmp/eager checks the rest


def _merged_from_counts(snapshots: list[dict[str, tuple[int, int]]]) -> float | None:
    fractions = [merged_fraction(s) for s in snapshots]
    values = [f for f in fractions if f is not None]
    return sum(values) / len(values) if values else None


def _record_timing(row: BenchRow, timing: Any, stateful: bool) -> None:
    row.median_ms, row.mean_ms, row.min_ms = timing.median_ms, timing.mean_ms, min(timing.times_ms)
    row.time_ms = timing.mean_ms if stateful else timing.median_ms
    row.calls = len(timing.times_ms)
    row.peak_mb = timing.peak_mb
    if stateful:
        row.note = (row.note + "; " if row.note else "") + "mean over whole schedules"


def _error(error: BaseException) -> str:
    traceback.print_exception(type(error), error, error.__traceback__, limit=6, file=sys.stderr)
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return "error: " + (text[:300] + "..." if len(text) > 300 else text)


def _derive(rows: list[BenchRow]) -> None:
    """Fill speedup, speedup vs eager plain, ideal time and overhead from the measured rows."""
    by_key = {(row.mode, row.method): row for row in rows if row.ok}
    eager_plain = by_key.get(("eager", "plain"))
    for row in rows:
        if not row.ok or row.time_ms is None:
            continue
        plain = by_key.get((row.mode, "plain"))
        if plain is not None and plain.time_ms:
            row.speedup = plain.time_ms / row.time_ms
        if eager_plain is not None and eager_plain.time_ms:
            row.speedup_vs_eager = eager_plain.time_ms / row.time_ms
        ideal = by_key.get((row.mode, row.ideal_label)) if row.ideal_label else None
        if ideal is not None and ideal.time_ms is not None:
            row.ideal_ms = ideal.time_ms
            if plain is not None and plain.time_ms is not None and abs(plain.time_ms - ideal.time_ms) > 1e-9:
                row.overhead = (row.time_ms - ideal.time_ms) / (plain.time_ms - ideal.time_ms)


class BenchSession:
    r"""One architecture at one size, built once; its rows run in any order.

    `run_bench` runs every row of one session. A caller juggling several sessions under one
    time budget (``benchmarks/gpu_table.py``) runs each session's `run_eager` first (cheap:
    it also gives the token counts the ideals replay and the fidelity figures), then the
    compiled rows it can afford, in its own order, with `run_compiled`, and `finish`\ es.

    Arguments as in `run_bench`.
    """

    def __init__(
        self,
        arch: str | ArchSpec = "sd15-tiny",
        methods: Sequence[str] | None = None,
        *,
        resolution: int | None = None,
        batch: int | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backend: str = "inductor",
        ideal: bool = True,
        tomesd: Sequence[float] | None = None,
        tomesd_compile: bool = False,
        weights: str | None = None,
        warmup: int = 3,
        repeats: int = 20,
        schedule: int = 50,
        sample_steps: int = 20,
        fidelity: bool = True,
        fullgraph: bool = False,
        seed: int = 0,
        inputs: str = "noise",
        time_budget_s: float | None = None,
        compile_estimate_s: float = 60.0,
        row_timeout_s: float | None = None,
        progress: bool = False,
        argv: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        spec = get_arch(arch)
        if inputs not in INPUT_KINDS:  # before the model is built
            raise TokenMergeError(f"inputs must be one of {INPUT_KINDS}; got {inputs!r}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        names = list(DEFAULT_METHODS[spec.family] if methods is None else methods)
        parsed = [parse_method(m, seed) for m in names]
        res, b = resolution or spec.resolution, batch or spec.batch
        if tomesd is None:
            tomesd = [float(m.split(",")[0].split(":")[1]) for m in names if _is_tomesd_spec(m)]
            tomesd = tomesd if spec.family == "unet" and tomesd_available() else []
        elif tomesd and (spec.family != "unet" or not tomesd_available()):
            raise TokenMergeError("tomesd rows need a UNet architecture and the tomesd package installed")
        self.spec, self.ideal = spec, ideal
        self.methods = [Method.plain(), *parsed, *(Method.tomesd(r) for r in tomesd)]
        meta = environment(dev, argv)
        meta.update({"arch": spec.name, "source": spec.source, "resolution": res, "batch": b, "dtype": str(dt)})
        meta.update({"backend": backend, "weights": weights or "random", "seed": seed, "inputs": inputs})
        self.result = BenchResult(meta=meta)
        options = {
            "fidelity": fidelity,
            "sample_steps": sample_steps,
            "seed": seed,
            "warmup": warmup,
            "repeats": repeats,
            "backend": backend,
            "fullgraph": fullgraph,
            "tomesd_compile": tomesd_compile,
            "row_timeout_s": row_timeout_s,
            "budget": _Budget(time_budget_s, compile_estimate_s),
            "log": log,
        }
        self.bar = progress_bar(len(self.methods), enabled=progress)
        model = build_model(spec, res, weights, seed, dev, dt)
        work = Workload(spec, model, b, res, dev, dt, seed, schedule if spec.diffusion else 1, inputs)
        self.runner = _Runner(work, options, self.result, self.bar)
        self.compile_order: list[Method] = []

    @property
    def title(self) -> str:
        """``arch resolution batch dtype``, for plots and logs."""
        meta = self.result.meta
        return f"{self.spec.name} {meta['resolution']}px batch {meta['batch']} {meta['dtype'].replace('torch.', '')}"

    def run_eager(self) -> list[Method]:
        """Every row in eager mode (ideals included); returns the rows in the order to compile them."""
        with torch.no_grad():
            self.compile_order = _eager_phase(self.runner, self.methods, self.ideal)
        return self.compile_order

    def method(self, label: str) -> Method:
        """The row kind called ``label`` (after `run_eager`, ideals included)."""
        for method in self.compile_order or self.methods:
            if method.label == label:
                return method
        raise TokenMergeError(f"method must be one of {[m.label for m in self.compile_order]}; got {label!r}")

    def run_compiled(self, method: Method | str, mode: str, row_timeout_s: float | None = None) -> BenchRow:
        """One row compiled in ``mode`` (after `run_eager`)."""
        method = self.method(method) if isinstance(method, str) else method
        self.bar.set_description(f"{self.spec.name} {mode} {method.label}")
        if row_timeout_s is not None:
            self.runner.opt["row_timeout_s"] = row_timeout_s
        with torch.no_grad():
            row = self.runner.compiled(method, mode)
        row.ideal_label = method.extra.get("ideal_label")
        return row

    def skip(self, method: Method | str, mode: str, reason: str) -> BenchRow:
        """Record ``method`` in ``mode`` as not run, with ``reason``."""
        method = self.method(method) if isinstance(method, str) else method
        row = self.runner._row(method, mode)
        row.status = f"skipped: {reason}"
        self.result.rows.append(row)
        return row

    def snapshot(self) -> BenchResult:
        """The result so far, speedups and overheads derived; the session stays usable."""
        _derive(self.result.rows)
        self.result.meta["modes"] = list(dict.fromkeys(row.mode for row in self.result.rows))
        return self.result

    def finish(self) -> BenchResult:
        """Derive speedups and overheads, release the model, and return the result."""
        self.bar.close()
        self.snapshot()
        self.runner.model = None  # type: ignore[assignment]
        self.runner.work.model = None  # type: ignore[assignment]
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.result


def run_bench(
    arch: str | ArchSpec = "sd15-tiny",
    methods: Sequence[str] | None = None,
    *,
    resolution: int | None = None,
    batch: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile_modes: Sequence[str] = COMPILE_MODES,
    backend: str = "inductor",
    ideal: bool = True,
    tomesd: Sequence[float] | None = None,
    tomesd_compile: bool = False,
    weights: str | None = None,
    warmup: int = 3,
    repeats: int = 20,
    schedule: int = 50,
    sample_steps: int = 20,
    fidelity: bool = True,
    fullgraph: bool = False,
    seed: int = 0,
    inputs: str = "noise",
    time_budget_s: float | None = None,
    compile_estimate_s: float = 60.0,
    row_timeout_s: float | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    progress: bool = True,
    print_table: bool = True,
    stream: IO[str] | None = None,
    argv: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark merging on one architecture; see the module docstring for the figures.

    Args:
        arch: a built-in architecture (`tokenmerge.tools.bench_models.ARCHS`: ``sd15``, ``sd2``,
            ``sdxl``, ``dit-xl-2``, ``pixart-alpha``, ``vit-b16``, ``vit-l16`` and ``*-tiny``),
            or an `ArchSpec` of your own.
        methods: method specs (`tokenmerge.tools.bench_methods`), e.g. ``["tomesd:0.5",
            "catome:0.7"]``; None: the family's `DEFAULT_METHODS`.
        resolution: image size in pixels (default: the architecture's).
        batch: denoiser batch (2 = one prompt with guidance) or ViT images.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: ``"auto"`` (float16 on a GPU, float32 on the CPU) or a dtype name.
        compile_modes: any of ``"eager"``, ``"default"``, ``"reduce-overhead"``; eager runs
            first in any case (token counts, fidelity).
        backend: `torch.compile` backend (``"inductor"``; tests use ``"eager"``/``"aot_eager"``).
        ideal: add the zero-overhead ideal at each method's token counts.
        tomesd: ratios for tomesd library rows; None: the ToMeSD ratios asked for, on a
            UNet when tomesd is installed; ``[]``: none.
        tomesd_compile: also compile the tomesd rows (slow: it breaks the graph).
        weights: local weights for the model (see `tokenmerge.tools.bench_models.load_weights`).
        warmup: warm-up calls (compiled rows: after the compiling call).
        repeats: timed calls (cached policies: rounded up to whole schedules).
        schedule: timesteps in the timing cycle of a denoiser.
        sample_steps: steps of the DDIM loop behind the PSNR.
        fidelity: run the sampling loop (rel L2 is always measured).
        fullgraph: compile traceable rows with ``fullgraph=True`` (a graph break errors).
        seed: seed of the weights, the inputs and the merging.
        inputs: ``"noise"`` or ``"smooth"`` latents/images (`tokenmerge.tools.bench_models.Workload`):
            smooth inputs make a similarity threshold on random weights merge about as
            much as it does on trained weights.
        time_budget_s: skip the rows that would end after this many seconds.
        compile_estimate_s: expected compile time before one was seen (for the budget).
        row_timeout_s: abandon a compiled row after this many seconds (a watchdog alarm; POSIX
            main thread only), so one slow compile cannot eat the whole budget.
        json_path, plot_path: where to write the JSON and the PNG (None: not written).
        progress: show a progress bar on stderr.
        print_table: print the table to ``stream`` at the end.
        stream: where the table goes (stdout by default).
        argv: the command line to record (default: ``sys.argv``).
        log: called with one line (`row_line`) as each row finishes; None: silent.

    Returns:
        A `BenchResult` with one `BenchRow` per method and mode.
    """
    stream = stream if stream is not None else sys.stdout
    modes = _check_modes(compile_modes)
    session = BenchSession(
        arch,
        methods,
        resolution=resolution,
        batch=batch,
        device=device,
        dtype=dtype,
        backend=backend,
        ideal=ideal,
        tomesd=tomesd,
        tomesd_compile=tomesd_compile,
        weights=weights,
        warmup=warmup,
        repeats=repeats,
        schedule=schedule,
        sample_steps=sample_steps,
        fidelity=fidelity,
        fullgraph=fullgraph,
        seed=seed,
        inputs=inputs,
        time_budget_s=time_budget_s,
        compile_estimate_s=compile_estimate_s,
        row_timeout_s=row_timeout_s,
        progress=progress,
        argv=argv,
        log=log,
    )
    try:
        order = session.run_eager()
        session.bar.total = len(session.result.rows) + len(order) * (len(modes) - 1)
        for mode in modes[1:]:
            for method in order:
                session.run_compiled(method, mode)
    finally:
        result = session.finish()
    if print_table:
        print(result.table(), file=stream, flush=True)
    if json_path:
        write_json(result, json_path)
    if plot_path:
        write_plot(result.rows, plot_path, title=session.title)
    return result


def _eager_phase(runner: _Runner, methods: list[Method], ideal: bool) -> list[Method]:
    """Eager rows first (they give token counts and fidelity); returns every row kind, ideals included."""
    ideals: dict[tuple[tuple[str, int], ...], Method] = {}
    ordered: list[Method] = []
    for method in methods:
        runner.bar.set_description(f"{runner.work.spec.name} eager {method.label}")
        row, counts = runner.eager(method)
        ordered.append(method)
        if ideal and method.kind == "tokenmerge" and counts and method.build is not None:
            key = tuple(sorted(counts.items()))
            if key not in ideals:
                ideals[key] = Method.ideal(method, counts, method.build(runner.model))
            method.extra["ideal_label"] = ideals[key].label
            row.ideal_label = ideals[key].label
    for method in methods:
        if method.kind == "tomesd":
            twin = next((m for m in methods if m.kind == "tokenmerge" and _ratio_of(m) == method.ratio), None)
            if twin is not None and "ideal_label" in twin.extra:
                method.extra["ideal_label"] = twin.extra["ideal_label"]
                for row in runner.result.rows:
                    if row.method == method.label:
                        row.ideal_label = twin.extra["ideal_label"]
    for method in ideals.values():
        runner.bar.set_description(f"{runner.work.spec.name} eager {method.label}")
        row, _ = runner.eager(method)
        row.note = "drops tokens: a speed bound, not a method"
    # Compiled order: plain, then each method followed by its ideal, then tomesd.
    scheduled: list[Method] = []
    by_label = {m.label: m for m in ideals.values()}
    for method in ordered:
        if method.kind == "tomesd":
            continue
        scheduled.append(method)
        twin = by_label.pop(method.extra.get("ideal_label", ""), None)
        if twin is not None:
            scheduled.append(twin)
    return scheduled + [m for m in ordered if m.kind == "tomesd"]


def _is_tomesd_spec(spec: str) -> bool:
    head = spec.split(",")[0]
    name, _, value = head.partition(":")
    return name.strip().lower() == "tomesd" and bool(value) and "," not in spec


def _ratio_of(method: Method) -> float | None:
    if not _is_tomesd_spec(method.spec):
        return None
    return float(method.spec.split(":")[1])


def _check_modes(modes: Sequence[str]) -> list[str]:
    modes = list(dict.fromkeys(modes))
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad or not modes:
        raise TokenMergeError(f"compile_modes must be a non-empty list of {', '.join(COMPILE_MODES)}; got {modes!r}")
    return ["eager", *[m for m in modes if m != "eager"]]


# ---------------------------------------------------------------------- output
_COLUMNS: list[tuple[str, Callable[[BenchRow], str]]] = [
    ("mode", lambda r: r.mode),
    ("method", lambda r: r.method),
    ("ms", lambda r: _num(r.time_ms, 2)),
    ("speedup", lambda r: _times(r.speedup)),
    ("x eager", lambda r: _times(r.speedup_vs_eager)),
    ("overhead", lambda r: _pct(r.overhead)),
    ("merged", lambda r: _pct(r.merged)),
    ("rel L2", lambda r: _num(r.rel_l2, 4)),
    ("PSNR dB", lambda r: _num(r.psnr_db, 1)),
    ("agree", lambda r: _pct(r.agree)),
    ("cmp/eager", lambda r: _num(r.compiled_vs_eager, 4)),
    ("peak MiB", lambda r: _num(r.peak_mb, 0)),
    ("ops", lambda r: "" if r.ops is None else str(r.ops)),
    ("compile s", lambda r: _num(r.compile_s, 1) + ("" if not r.warmup_s or r.warmup_s < 1 else f"+{r.warmup_s:.0f}")),
    ("graphs/breaks", lambda r: "" if r.graphs is None else f"{r.graphs}/{r.breaks}"),
    ("status", lambda r: "ok" if r.ok else r.status),
]


def _num(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def format_table(rows: Sequence[BenchRow], meta: dict[str, Any] | None = None) -> str:
    """A fixed-width text table of ``rows``, grouped by architecture, resolution and batch."""
    lines: list[str] = []
    groups: dict[tuple[str, int, int, str], list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.arch, row.resolution, row.batch, row.dtype), []).append(row)
    for (arch, res, batch, dtype), group in groups.items():
        where = f" on {meta.get('card')} (torch {meta.get('torch')})" if meta else ""
        lines.append(f"{arch} {res}px batch {batch} {dtype}{where}")
        cells = [[name for name, _ in _COLUMNS]] + [[show(row) for _, show in _COLUMNS] for row in group]
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
        for index, line in enumerate(cells):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        lines.append("")
    return "\n".join(lines)


def write_json(result: BenchResult | Sequence[BenchResult], path: str) -> None:
    """Write one result, or several (``{"runs": [...]}``), as JSON."""
    data = result.to_dict() if isinstance(result, BenchResult) else {"runs": [r.to_dict() for r in result]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def write_plot(rows: Sequence[BenchRow], path: str, title: str = "") -> None:
    """Speed (speedup over plain, same mode) against fidelity, one marker per row and mode, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.ok and r.speedup is not None and r.kind in ("tokenmerge", "tomesd", "plain")]
    use_psnr = any(r.psnr_db is not None and math.isfinite(r.psnr_db) for r in points)
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = {"eager": "o", "default": "s", "reduce-overhead": "^"}
    for mode in dict.fromkeys(r.mode for r in points):
        chosen = [r for r in points if r.mode == mode]
        ys = [_fidelity_value(r, use_psnr) for r in chosen]
        axis.scatter([r.speedup for r in chosen], ys, marker=markers.get(mode, "o"), label=mode)
        for r, y in zip(chosen, ys):
            axis.annotate(r.method, (r.speedup, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axvline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("speedup over plain (same mode)")
    axis.set_ylabel(
        "PSNR of final latents vs plain (dB)" if use_psnr else "relative L2 error vs plain (lower is better)"
    )
    if not use_psnr:
        axis.invert_yaxis()
    axis.set_title(title or "tokenmerge bench")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _fidelity_value(row: BenchRow, use_psnr: bool) -> float:
    if use_psnr:
        if row.psnr_db is None or not math.isfinite(row.psnr_db):
            return 60.0 if row.kind == "plain" else float("nan")  # plain: identical, drawn at the top
        return row.psnr_db
    return row.rel_l2 or 0.0


# ---------------------------------------------------------------------- command line
def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `run_bench`'s options to ``parser`` (``tokenmerge bench``)."""
    parser.add_argument("--arch", default="sd15-tiny", help=f"one of: {', '.join(ARCHS)} (default: %(default)s)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="method specs such as tomesd:0.5 catome:0.7,buckets=4 tome:13 todo:2 block:0.5 (default: per family)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the arch's)")
    parser.add_argument("--batch", type=int, default=None, help="denoiser batch, or ViT images (default: the arch's)")
    parser.add_argument(
        "--device", type=device_argument, default="auto", help="auto (GPU if present), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on the CPU), float16, ...")
    parser.add_argument(
        "--compile",
        nargs="+",
        default=list(COMPILE_MODES),
        choices=COMPILE_MODES,
        dest="compile_modes",
        help="modes to run (default: all); eager always runs",
    )
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    parser.add_argument("--no-ideal", action="store_true", help="leave out the zero-overhead ideal rows")
    parser.add_argument("--tomesd", nargs="*", type=float, default=None, help="tomesd library ratios ([] for none)")
    parser.add_argument("--tomesd-compile", action="store_true", help="also compile the tomesd rows (slow)")
    parser.add_argument("--weights", default=None, help="local weights (state dict file or diffusers folder)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (default: %(default)s)")
    parser.add_argument("--schedule", type=int, default=50, help="timesteps in the timing cycle (default: 50)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps behind the PSNR (default: 20)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the sampling loop (rel L2 stays)")
    parser.add_argument("--fullgraph", action="store_true", help="compile traceable rows with fullgraph=True")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and merging")
    parser.add_argument(
        "--inputs",
        default="noise",
        choices=INPUT_KINDS,
        help="i.i.d. noise, or noise smooth over space (a threshold then merges on random weights about "
        "as much as on trained ones); default: %(default)s",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="skip rows that would end after N seconds")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write the speed-vs-fidelity plot (PNG) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def bench_main(args: argparse.Namespace) -> int:
    """Run `run_bench` from parsed arguments; 0 when every row ran, 1 when a row failed."""
    result = run_bench(
        args.arch,
        args.methods,
        resolution=args.resolution,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        compile_modes=["eager"] if args.no_compile else args.compile_modes,
        backend=args.backend,
        ideal=not args.no_ideal,
        tomesd=args.tomesd,
        tomesd_compile=args.tomesd_compile,
        weights=args.weights,
        warmup=args.warmup,
        repeats=args.repeats,
        schedule=args.schedule,
        sample_steps=args.sample_steps,
        fidelity=not args.no_fidelity,
        fullgraph=args.fullgraph,
        seed=args.seed,
        inputs=args.inputs,
        time_budget_s=args.time_budget,
        json_path=args.json,
        plot_path=args.plot,
        progress=not args.no_progress and sys.stderr.isatty(),
        log=None if args.no_progress or sys.stderr.isatty() else _stderr_line,
    )
    return 1 if result.errors else 0


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmerge.tools.bench``."""
    parser = add_bench_arguments(argparse.ArgumentParser(prog="tokenmerge bench", description=__doc__.split("\n")[0]))
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
