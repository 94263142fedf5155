"""The issue-5 table in one run on one GPU (called by benchmarks/gpu.sh; see benchmarks/README.md).

1. Two quick checks: the fused Triton matching kernel against its PyTorch form (a mismatch
   or an error switches it off for the run), and host-device synchronisations in one
   eager denoising step (merging must add none).
2. Every section's eager rows (plain, methods, ideals, tomesd; fidelity): cheap.
3. Compiled rows from one priority list, each only if the time budget (``--budget``,
   counted from the start) still holds its expected cost (the compile time seen so far in
   its section, a stateful row 2.5 times that); a watchdog ends a row that overruns.
   Rows that do not fit are listed as skipped.

The table is printed last; JSON and plots go to ``--out`` (default ``$OUT`` if set, else
``./out``). ``--dry-run`` runs the same code with tiny CPU models (compile backend
``aot_eager`` unless ``--backend`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenmerge.tools.bench import BenchResult, BenchSession, format_table, write_plot  # noqa: E402
from tokenmerge.tools.bench_timing import time_calls  # noqa: E402


@dataclass
class Section:
    """One architecture at one size, its methods and the mode its rows compile in."""

    name: str
    arch: str
    resolution: int
    batch: int
    methods: list[str]
    mode: str
    estimate_s: float  # expected compile time of the plain model before one was seen in this section
    merge_factor: float = 1.0  # compile time of a merging row over the plain one's
    dtype: str = "auto"  # float16 on the GPU unless the section names another
    seen: list[float] = field(default_factory=list)

    def factor(self, stateful: bool, merges: bool) -> float:
        """How many plain compiles a row costs: a stateful row 2.5, a merging row ``merge_factor``."""
        return (2.5 if stateful else 1.0) * (self.merge_factor if merges else 1.0)

    def expected_s(self, stateful: bool, merges: bool = True) -> float:
        base = max(self.seen) if self.seen else self.estimate_s
        return base * self.factor(stateful, merges) + 10.0  # + warm-up and timed calls


#: Every section feeds smooth latents/images (`tokenmerge.tools.bench_models.smooth_noise`): fixed
#: ratios take the same time on any input, and the similarity threshold of CAToMe then merges
#: on random weights about as much as on trained ones (73-75 %) instead of nothing.
INPUTS = "smooth"

GPU_SECTIONS = [
    Section("sd15-1024", "sd15", 1024, 2, ["tomesd:0.5", "catome:0.7"], "reduce-overhead", 60),
    Section("sd15-512", "sd15", 512, 2, ["tomesd:0.5", "catome:0.7"], "reduce-overhead", 55),
    # A merged ViT compiles every block apart (each has its own token count): 2.6x the plain
    # model's compile on the CPU (92 s vs 35 s), over 3.3x on the H100 (over 45 s vs 13.6 s),
    # hence 4.5x. The rows without
    # proportional attention show what its mask costs (it takes SDPA off the flash kernel).
    Section("vit-b16", "vit-b16", 224, 256, ["tome:13", "tome:13,prop_attn=0"], "default", 15, merge_factor=4.5),
    Section("dit-xl-2-512", "dit-xl-2", 512, 8, ["block:0.5"], "default", 45),
]

#: The newer families at their published sizes, bf16 (their checkpoints' dtype), compiled with
#: inductor's default mode: Flux.1-dev at 1024 px (batch 1: guidance distilled), SD3.5 Medium at
#: 1024 px (batch 2), Wan 2.1 1.3B at 480x832 px and 81 frames (batch 1: one of the pipeline's two
#: calls per step). Not in the default run: ``--set modern`` or ``--sections NAME...``.
MODERN_SECTIONS = [
    Section("flux-dev-1024", "flux-dev", 1024, 1, ["tomesd:0.5", "block:0.5"], "default", 90, dtype="bfloat16"),
    Section("sd35-medium-1024", "sd35-medium", 1024, 2, ["tomesd:0.5", "block:0.5"], "default", 60, dtype="bfloat16"),
    Section("wan-1.3b-480p", "wan-1.3b", 480, 1, ["tomesd:0.5", "block:0.5"], "default", 60, dtype="bfloat16"),
]

#: The section lists ``--set`` picks (``--sections`` picks by name from all of them).
SECTION_SETS = {"classic": GPU_SECTIONS, "modern": MODERN_SECTIONS, "all": GPU_SECTIONS + MODERN_SECTIONS}

#: Compiled rows, most wanted first: the rows of the targets still open or missed (the cheap
#: and certain ones before CAToMe's slow, stateful compile), then the met targets' rows
#: again, then their ideals (overheads), then the rest.
PRIORITY = [
    ("sd15-512", "plain"),
    ("sd15-512", "ToMeSD(0.5)"),
    ("vit-b16", "plain"),
    ("vit-b16", "ToMe(13)"),
    ("sd15-1024", "plain"),
    ("sd15-1024", "CAToMe(0.7)"),
    ("sd15-1024", "ToMeSD(0.5)"),
    ("sd15-512", "ideal@ToMeSD(0.5)"),
    ("vit-b16", "ideal@ToMe(13)"),
    ("sd15-1024", "ideal@CAToMe(0.7)"),
    ("sd15-1024", "ideal@ToMeSD(0.5)"),
    ("dit-xl-2-512", "plain"),
    ("dit-xl-2-512", "block r=0.5"),
    ("dit-xl-2-512", "ideal@block r=0.5"),
    ("vit-b16", "ToMe(13, prop_attn=0)"),
    ("sd15-512", "CAToMe(0.7)"),
    ("sd15-512", "ideal@CAToMe(0.7)"),
    # the newer families (``--set modern``): plain and the best-placed preset first, then the rest
    ("flux-dev-1024", "plain"),
    ("flux-dev-1024", "block r=0.5"),
    ("wan-1.3b-480p", "plain"),
    ("wan-1.3b-480p", "block r=0.5"),
    ("flux-dev-1024", "ToMeSD(0.5)"),
    ("wan-1.3b-480p", "ToMeSD(0.5)"),
    ("sd35-medium-1024", "plain"),
    ("sd35-medium-1024", "block r=0.5"),
    ("sd35-medium-1024", "ToMeSD(0.5)"),
]

DRY_ARCH = {
    "sd15": "sd15-tiny",
    "dit-xl-2": "dit-xl-2-tiny",
    "vit-b16": "vit-tiny",
    "flux-dev": "flux-dev-tiny",
    "sd35-medium": "sd35-medium-tiny",
    "wan-1.3b": "wan-1.3b-tiny",
}


def dry_sections(sections: list[Section] | None = None) -> list[Section]:
    """``sections`` (default: the classic GPU sections) with tiny CPU models at 64 px, batch 2."""
    return [
        Section(s.name, DRY_ARCH[s.arch], 64, 2, list(s.methods), s.mode, 5.0, s.merge_factor, s.dtype)
        for s in (GPU_SECTIONS if sections is None else sections)
    ]


# ---------------------------------------------------------------------- checks
def check_triton(device: torch.device) -> dict[str, Any]:
    """The fused best-match kernel against the PyTorch form at SD 1.5's 1024 px and 512 px sizes."""
    from tokenmerge.policies import best_match as module
    from tokenmerge.policies.best_match import best_match, best_match_reference, set_triton_mode, triton_enabled

    def kernel_failed() -> bool:
        return bool(module._KERNEL_FAILED)

    report: dict[str, Any] = {"device": str(device)}
    # SD 1.5's top level at 1024, 512 and 2048 px (batch 2): the default uses the kernel at 2048 px only.
    cuda_sizes = [(2, 12288, 4096, 320), (2, 3072, 1024, 320), (2, 49152, 16384, 320)]
    sizes = cuda_sizes if device.type == "cuda" else [(2, 96, 32, 16)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for batch, num_src, num_dst, channels in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        src = torch.randn(batch, num_src, channels, device=device, dtype=dtype, generator=gen)
        dst = torch.randn(batch, num_dst, channels, device=device, dtype=dtype, generator=gen)
        src, dst = src / src.norm(dim=-1, keepdim=True), dst / dst.norm(dim=-1, keepdim=True)
        key = f"{num_src}x{num_dst}x{channels}"
        set_triton_mode("1")  # the kernel at every size for this check
        used = triton_enabled(src, dst)
        try:
            fast_score, fast_best = best_match(src, dst)
            entry_time = _time_pair(best_match, best_match_reference, (src, dst), device)
        except Exception as error:  # noqa: BLE001 - report, switch the kernel off, go on
            set_triton_mode("0")
            report[key] = {"error": f"{type(error).__name__}: {error}"}
            report["disabled"] = "fused kernel off for this run: it raised"
            break
        set_triton_mode("auto")
        if kernel_failed():  # the operator fell back to the PyTorch form (and warned)
            report[key] = {"error": "the fused kernel raised; see the warning above"}
            report["disabled"] = "fused kernel off for this run: it raised"
            break
        ref_score, ref_best = best_match_reference(src, dst)
        # Ties and fp16 rounding may pick another destination; its score must then be as good.
        chosen = dst.float().gather(1, fast_best[..., None].expand(-1, -1, channels))  # (B, Ns, C)
        picked = (src.float() * chosen).sum(-1)  # (B, Ns) similarity of the chosen pair
        gap = float((ref_score.float() - picked).max())
        entry = {"triton": used, "same_index": float((fast_best == ref_best).float().mean()), "score_gap": gap}
        report[key] = {**entry, **entry_time}
        if used and gap > 2e-2:
            set_triton_mode("0")
            report["disabled"] = f"fused kernel off for this run: score gap {gap:.3g} at {key}"
            break
    return report


def _time_pair(fast: Any, slow: Any, args: tuple[Any, ...], device: torch.device) -> dict[str, float | str]:
    """Milliseconds per call of each, eager (launches included) and replayed from a CUDA graph."""
    if device.type != "cuda":
        return {}
    out: dict[str, float | str] = {}
    for name, fn in (("fused", fast), ("torch", slow)):
        out[f"{name}_ms"] = _time_call(lambda fn=fn: fn(*args), device)
        try:
            out[f"{name}_graph_ms"] = _time_graph(lambda fn=fn: fn(*args))
        except Exception as error:  # noqa: BLE001 - report and go on
            out[f"{name}_graph_ms"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return out


def _time_graph(call: Any, calls: int = 20) -> float:
    """Milliseconds per call, ``calls`` calls captured in one CUDA graph and replayed (no launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / calls, 4)


def check_attention(device: torch.device) -> dict[str, Any]:
    """What proportional attention's mask costs SDPA at ViT-B/16's shapes (batch 256, 12 heads of 64).

    Times `scaled_dot_product_attention` on 197 tokens (the plain model) and on 184 (after
    one ToMe(13) merge) without a mask, with the ``(B, 1, 1, N)`` log-size mask the ViT
    adapter passes (the backend PyTorch picks), and with each backend forced (an error
    means the backend refused those inputs); and on 192 tokens, a multiple of 16, where
    the memory-efficient kernel takes the mask without SDPA padding it into a full
    ``(B, H, N, N + pad)`` copy first. Milliseconds per call.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device.type == "cuda"
    batch, heads, width = (256, 12, 64) if cuda else (2, 2, 8)
    dtype = torch.float16 if cuda else torch.float32
    report: dict[str, Any] = {"shape": f"batch {batch}, {heads} heads of {width}", "ms": {}}
    gen = torch.Generator(device=device).manual_seed(0)
    for tokens in (197, 184, 192):
        q, k, v = (
            torch.randn(batch, heads, tokens, width, device=device, dtype=dtype, generator=gen) for _ in range(3)
        )
        sizes = torch.rand(batch, tokens, device=device, generator=gen) * 3 + 1
        mask = sizes.log().to(dtype)[:, None, None, :]  # (B, 1, 1, N)
        cases: list[tuple[str, Any, Any]] = [(f"N={tokens} no mask", None, None)]
        if tokens != 197:  # 192 = 12 x 16: the mask needs no padding (below, SDPA pads and copies it)
            cases.append((f"N={tokens} mask", mask, None))
        if tokens == 184:
            for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
                if hasattr(SDPBackend, backend):
                    cases.append((f"N={tokens} mask, {backend.lower()} only", mask, getattr(SDPBackend, backend)))
        for name, attn_mask, backend in cases:

            def call(attn_mask: Any = attn_mask, qkv: tuple[Any, ...] = (q, k, v)) -> Any:
                return torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=attn_mask)

            try:
                if backend is None:
                    report["ms"][name] = _time_call(call, device)
                else:
                    with sdpa_kernel([backend]):
                        report["ms"][name] = _time_call(call, device)
            except Exception as error:  # noqa: BLE001 - a refused backend is a finding, not a failure
                report["ms"][name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return report


def _time_call(call: Any, device: torch.device) -> float:
    """Mean milliseconds per call after three warm-up calls (`time_calls`: CUDA events on a GPU)."""
    for _ in range(3):
        call()
    calls = 20 if device.type == "cuda" else 5
    return round(time_calls(lambda _: call(), range(calls), device).mean_ms, 4)


def check_syncs(session: BenchSession) -> dict[str, Any]:
    """Host-device synchronisations in one eager denoising step, plain vs ToMeSD(0.5)."""
    work = session.runner.work
    if work.device.type != "cuda":
        return {"skipped": "no CUDA device: synchronisations are a GPU notion"}
    import tokenmerge

    counts: dict[str, Any] = {}
    for label, config in (("plain", None), ("ToMeSD(0.5)", tokenmerge.ToMeSD(0.5, seed=0))):
        handle = tokenmerge.apply(work.model, config) if config is not None else None
        try:
            with torch.no_grad():
                work.step(work.model, 0)  # warm-up (cached partitions) outside the count
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(1)
                    try:
                        work.step(work.model, 1)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                counts[label] = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            if handle is not None:
                handle.remove()
    counts["added_by_merging"] = counts["ToMeSD(0.5)"] - counts["plain"]
    return counts


# ---------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    """Checks, eager rows, compiled rows by priority within the budget; table last; JSON and plots to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU configs, every code path")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; dry run: aot_eager)")
    parser.add_argument("--set", choices=sorted(SECTION_SETS), default="classic", help="which sections")
    parser.add_argument("--sections", nargs="+", default=None, help="run only these sections (names, from any set)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 420; dry 3600)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for JSON and plots")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20; dry run 3)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: running the dry run instead (tiny CPU configs)", flush=True)
        args.dry_run = True
    device = torch.device("cpu" if args.dry_run else "cuda")
    backend = args.backend or ("aot_eager" if args.dry_run else "inductor")
    budget = args.budget or (3600.0 if args.dry_run else 420.0)
    chosen = SECTION_SETS["all" if args.sections else args.set]
    if args.sections:
        unknown = sorted(set(args.sections) - {s.name for s in chosen})
        if unknown:
            parser.error(f"--sections must name sections of {[s.name for s in chosen]}; got {unknown}")
        chosen = [s for s in chosen if s.name in args.sections]
    sections = dry_sections(chosen) if args.dry_run else chosen
    repeats = args.repeats or (3 if args.dry_run else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def remaining() -> float:
        return budget - (time.monotonic() - started)

    checks: dict[str, Any] = {"triton": check_triton(device)}
    print("triton check:", json.dumps(checks["triton"]), flush=True)
    if any(s.arch.startswith("vit") for s in sections):
        checks["attention"] = check_attention(device)
        print("attention check:", json.dumps(checks["attention"]), flush=True)

    # Eager rows of every section first: cheap, and they give the ideals' token counts.
    sessions: dict[str, BenchSession] = {}
    for section in sections:
        print(f"=== {section.name}: {section.arch} {section.resolution}px batch {section.batch} (eager)", flush=True)
        try:
            session = BenchSession(
                section.arch,
                section.methods,
                resolution=section.resolution,
                batch=section.batch,
                device=device,
                dtype=section.dtype,
                backend=backend,
                warmup=2 if args.dry_run else 3,
                repeats=repeats,
                schedule=4 if args.dry_run else 50,
                sample_steps=3 if args.dry_run else 20,
                inputs=INPUTS,
                progress=sys.stderr.isatty(),
            )
            if "syncs" not in checks and section.arch in ("sd15", "sd15-tiny"):
                checks["syncs"] = check_syncs(session)
                print("sync check:", json.dumps(checks["syncs"]), flush=True)
            session.run_eager()
            session.result.meta["section"] = section.name
            sessions[section.name] = session
        except Exception:  # noqa: BLE001 - a section that cannot even build must not end the run
            traceback.print_exc()
            checks.setdefault("failed_sections", []).append(section.name)
        print(f"    done at {time.monotonic() - started:.0f} s", flush=True)

    # The eager tables now, and the JSON after every compiled row: a run cut short keeps them.
    for session in sessions.values():
        print(format_table(session.snapshot().rows, session.result.meta), flush=True)
    partial = out / "results.json"
    _write(partial, [s.snapshot() for s in sessions.values()], checks, started, backend, budget)

    # Compiled rows by priority, while the budget holds them.
    by_name = {s.name: s for s in sections}
    done: set[tuple[str, str]] = set()
    plan = [(name, label) for name, label in PRIORITY if name in sessions]
    plan += [(name, m.label) for name, s in sessions.items() for m in s.compile_order if (name, m.label) not in plan]
    for name, label in plan:
        session, section = sessions[name], by_name[name]
        labels = {m.label for m in session.compile_order}
        if label not in labels or (name, label) in done:
            continue
        done.add((name, label))
        method = session.method(label)
        if method.kind == "tomesd":
            session.run_compiled(method, section.mode)  # recorded as skipped (tomesd is not compiled)
            continue
        merges = method.kind != "plain"
        need = section.expected_s(method.stateful, merges)
        if need > remaining():
            session.skip(method, section.mode, f"time budget (expected {need:.0f} s, {max(remaining(), 0):.0f} s left)")
            continue
        print(f"--- {name} {section.mode} {label} ({remaining():.0f} s left)", flush=True)
        row = session.run_compiled(method, section.mode, row_timeout_s=None if args.dry_run else remaining() + 10)
        if row.compile_s is not None:
            spent = row.compile_s + (row.warmup_s or 0.0)
            section.seen.append(spent / section.factor(method.stateful, merges))
        print(f"    {row.status}: {row.time_ms} ms, compile {row.compile_s} s", flush=True)
        _write(partial, [s.snapshot() for s in sessions.values()], checks, started, backend, budget)

    results: list[BenchResult] = []
    for name, session in sessions.items():
        result = session.finish()
        result.meta["elapsed_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        write_plot(result.rows, str(out / f"{name}.png"), title=session.title)
    rows = [row for result in results for row in result.rows]
    if rows:
        write_plot(rows, str(out / "all.png"), title="speed vs fidelity, all sections")
    _write(out / "results.json", results, checks, started, backend, budget)
    meta = results[0].meta if results else {}
    print("\n" + "=" * 100)
    print(
        f"tokenmerge bench: {meta.get('card')}, driver {meta.get('driver')}, torch {meta.get('torch')}, "
        f"CUDA {meta.get('cuda')}, diffusers {meta.get('diffusers')}, timm {meta.get('timm')}, "
        f"tomesd {meta.get('tomesd')}, triton {meta.get('triton')}; backend {backend}; "
        f"total {time.monotonic() - started:.0f} s of a {budget:.0f} s budget"
    )
    print(f"checks: {json.dumps(checks)}")
    print(format_table(rows, meta))
    failed = [row for row in rows if row.status.startswith("error")] or checks.get("failed_sections")
    return 1 if failed else 0


def _write(
    path: Path, results: list[BenchResult], checks: dict[str, Any], started: float, backend: str, budget: float
) -> None:
    data = {
        "checks": checks,
        "backend": backend,
        "budget_s": budget,
        "elapsed_s": round(time.monotonic() - started, 1),
        "runs": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
