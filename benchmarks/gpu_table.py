"""The issue-5 table in one run on one GPU (called by benchmarks/gpu.sh; see benchmarks/README.md).

Sections run in priority order, each under its own time budget (rows that would not
finish in it are skipped and say so), after two quick checks: the fused Triton matching
kernel against its PyTorch form (a mismatch switches it off for the run) and host-device
synchronisations in an eager step (merging must add none). The table is printed last;
JSON goes to ``--out`` (default: ``$OUT`` if set, else ``./out``).

``--dry-run`` runs every section with the tiny CPU configs, the same code paths
(compile backend ``aot_eager`` unless ``--backend`` says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenmerge.bench import BenchResult, format_table, run_bench, write_plot  # noqa: E402

# name, arch, resolution, batch, dtype, methods, compiled modes, budget (s), timed calls
GPU_SECTIONS: list[dict[str, Any]] = [
    {
        "name": "sd15-1024",
        "arch": "sd15",
        "resolution": 1024,
        "batch": 2,
        "methods": ["tomesd:0.5", "catome:0.7"],
        "modes": ["eager", "reduce-overhead"],
        "budget_s": 200,
        "row_timeout_s": 100,
    },
    {
        "name": "sd15-512",
        "arch": "sd15",
        "resolution": 512,
        "batch": 2,
        "methods": ["tomesd:0.5", "catome:0.7"],
        "modes": ["eager", "reduce-overhead"],
        "budget_s": 100,
        "row_timeout_s": 60,
    },
    {
        "name": "dit-xl-2-512",
        "arch": "dit-xl-2",
        "resolution": 512,
        "batch": 8,
        "methods": ["block:0.5"],
        "modes": ["eager", "default"],
        "budget_s": 75,
        "row_timeout_s": 60,
    },
    {
        "name": "vit-b16",
        "arch": "vit-b16",
        "resolution": 224,
        "batch": 256,
        "methods": ["tome:13"],
        "modes": ["eager", "default"],
        "budget_s": 45,
        "row_timeout_s": 40,
    },
]

DRY_ARCH = {"sd15": "sd15-tiny", "dit-xl-2": "dit-xl-2-tiny", "vit-b16": "vit-tiny"}


def dry_sections() -> list[dict[str, Any]]:
    """The GPU sections with tiny CPU models, small inputs and a short schedule."""
    sections = []
    for section in GPU_SECTIONS:
        arch = DRY_ARCH[section["arch"]]
        sections.append({**section, "arch": arch, "resolution": 64, "batch": 2, "budget_s": 900})
    return sections


# ---------------------------------------------------------------------- checks
def check_triton(device: torch.device) -> dict[str, Any]:
    """The fused best-match kernel against the PyTorch form at SD 1.5's 1024 px and 512 px sizes."""
    from tokenmerge.policies.best_match import best_match, best_match_reference, triton_enabled

    report: dict[str, Any] = {"device": str(device)}
    sizes = [(2, 12288, 4096, 320), (2, 3072, 1024, 320)] if device.type == "cuda" else [(2, 96, 32, 16)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for batch, num_src, num_dst, channels in sizes:
        gen = torch.Generator(device=device).manual_seed(0)
        src = torch.randn(batch, num_src, channels, device=device, dtype=dtype, generator=gen)
        dst = torch.randn(batch, num_dst, channels, device=device, dtype=dtype, generator=gen)
        src, dst = src / src.norm(dim=-1, keepdim=True), dst / dst.norm(dim=-1, keepdim=True)
        key = f"{num_src}x{num_dst}x{channels}"
        used = triton_enabled(src, dst)
        try:
            fast_score, fast_best = best_match(src, dst)
        except Exception as error:  # noqa: BLE001 - report, switch the kernel off, go on
            os.environ["TOKENMERGE_TRITON"] = "0"
            report[key] = {"error": f"{type(error).__name__}: {error}"}
            report["disabled"] = "fused kernel off for this run: it raised"
            continue
        ref_score, ref_best = best_match_reference(src, dst)
        # Ties and fp16 rounding may pick another destination; its score must then be as good.
        picked = torch.einsum(
            "bnc,bnc->bn", src.float(), dst.float().gather(1, fast_best[..., None].expand(-1, -1, channels))
        )
        gap = float((ref_score.float() - picked).max())
        entry = {"triton": used, "same_index": float((fast_best == ref_best).float().mean()), "score_gap": gap}
        entry.update(_time_pair(best_match, best_match_reference, (src, dst), device))
        report[key] = entry
        if used and gap > 2e-2:
            os.environ["TOKENMERGE_TRITON"] = "0"
            report["disabled"] = f"fused kernel off for this run: score gap {gap:.3g} at {key}"
    return report


def _time_pair(fast: Any, slow: Any, args: tuple[Any, ...], device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    out = {}
    for name, fn in (("fused_ms", fast), ("torch_ms", slow)):
        for _ in range(3):
            fn(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        out[name] = start.elapsed_time(end) / 20
    return out


def check_syncs(device: torch.device, arch: str, resolution: int) -> dict[str, Any]:
    """Host-device synchronisations in one eager denoising step, plain vs each fixed-ratio method."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device: synchronisations are a GPU notion"}
    import tokenmerge
    from tokenmerge.bench_models import Workload, build_model, get_arch

    spec = get_arch(arch)
    model = build_model(spec, resolution, device=device, dtype=torch.float16)
    work = Workload(spec, model, 2, resolution, device, torch.float16, schedule=4)
    counts: dict[str, Any] = {}
    for label, config in (("plain", None), ("ToMeSD(0.5)", tokenmerge.ToMeSD(0.5, seed=0))):
        handle = tokenmerge.apply(model, config) if config is not None else None
        try:
            with torch.no_grad():
                work.step(model, 0)  # warm-up outside the count
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(1)
                    try:
                        work.step(model, 1)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                counts[label] = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            if handle is not None:
                handle.remove()
    del model
    torch.cuda.empty_cache()
    counts["added_by_merging"] = counts["ToMeSD(0.5)"] - counts["plain"]
    return counts


# ---------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    """Run the checks and the sections; print the table last; write JSON (and plots) to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU configs, every code path")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; dry run: aot_eager)")
    parser.add_argument("--sections", nargs="+", default=None, help="run only these sections (names)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for JSON and plots")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20; dry run 3)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("no CUDA device: running the dry run instead (tiny CPU configs)", flush=True)
        args.dry_run = True
    backend = args.backend or ("aot_eager" if args.dry_run else "inductor")
    sections = dry_sections() if args.dry_run else GPU_SECTIONS
    if args.sections:
        sections = [s for s in sections if s["name"] in args.sections]
    repeats = args.repeats or (3 if args.dry_run else 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    checks = {"triton": check_triton(device)}
    print("triton check:", json.dumps(checks["triton"]), flush=True)
    sync_arch = "sd15-tiny" if args.dry_run else "sd15"
    checks["syncs"] = check_syncs(device, sync_arch, 128 if args.dry_run else 512)
    print("sync check:", json.dumps(checks["syncs"]), flush=True)

    results: list[BenchResult] = []
    for section in sections:
        print(
            f"\n=== {section['name']}: {section['arch']} {section['resolution']}px batch {section['batch']}", flush=True
        )
        begin = time.monotonic()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            result = run_bench(
                section["arch"],
                section["methods"],
                resolution=section["resolution"],
                batch=section["batch"],
                device=device,
                compile_modes=section["modes"],
                backend=backend,
                warmup=2 if args.dry_run else 3,
                repeats=repeats,
                schedule=4 if args.dry_run else 50,
                sample_steps=3 if args.dry_run else 20,
                time_budget_s=section["budget_s"],
                compile_estimate_s=5.0 if args.dry_run else 60.0,
                row_timeout_s=None if args.dry_run else section["row_timeout_s"],
                plot_path=str(out / f"{section['name']}.png"),
                progress=sys.stderr.isatty(),
                print_table=True,
            )
        print(log.getvalue(), flush=True)
        result.meta["section"] = section["name"]
        result.meta["section_s"] = round(time.monotonic() - begin, 1)
        results.append(result)
        _write(out / "results.json", results, checks, started, backend)

    rows = [row for result in results for row in result.rows]
    write_plot(rows, str(out / "all.png"), title="speed vs fidelity, all sections")
    _write(out / "results.json", results, checks, started, backend)
    meta = results[0].meta if results else {}
    print("\n" + "=" * 100)
    print(
        f"tokenmerge bench, {meta.get('card')} driver {meta.get('driver')}, torch {meta.get('torch')}, "
        f"diffusers {meta.get('diffusers')}, timm {meta.get('timm')}, tomesd {meta.get('tomesd')}, "
        f"triton {meta.get('triton')}; total {time.monotonic() - started:.0f} s"
    )
    print(f"checks: {json.dumps(checks)}")
    print(format_table(rows, meta))
    errors = [row for row in rows if row.status.startswith("error")]
    return 1 if errors else 0


def _write(path: Path, results: list[BenchResult], checks: dict[str, Any], started: float, backend: str) -> None:
    data = {
        "checks": checks,
        "backend": backend,
        "elapsed_s": round(time.monotonic() - started, 1),
        "runs": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
