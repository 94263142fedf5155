"""Operators and FLOPs per call of the benchmark's full-size models: a profile without a GPU.

In eager mode on a GPU every ATen operator that computes is at least one kernel launch,
and a small step (SD 1.5 at 512 px, batch 2, on an H100) is bound by those launches,
not by arithmetic. This script counts them for the plain model, each method, its
zero-overhead ideal and the tomesd library, on the real configs (SD 1.5, DiT-XL/2,
ViT-B/16), with the models built on PyTorch's ``meta`` device: shapes only, no memory
and no arithmetic, so a 2-core CPU does it in seconds. Counts are exact on any device;
they are not timings.

Each row also counts floating-point operations (`torch.utils.flop_counter`: matrix
products and attention) and prints the *FLOP ratio*: plain FLOPs over the row's FLOPs,
the speed-up the row would reach if every FLOP took the same time (no launches, no
memory traffic). It is a guide, not a hard bound: where the removed work runs below the
model's average FLOP rate (attention over many tokens) the time ratio can exceed it.

Methods whose planning reads values on the host (CAToMe's adaptive threshold) cannot
run on ``meta``; their rows say so. Each method is counted on its second call, so
one-off work (building the partition tables) is left out.

    python benchmarks/op_counts.py                      # the default table
    python benchmarks/op_counts.py --arch sd15 --resolution 1024 --methods tomesd:0.5 todo:2
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenmerge.plan import MATRIX_MERGE_MAX_TOKENS
from tokenmerge.tools.bench_methods import Method, parse_method, tomesd_available
from tokenmerge.tools.bench_models import Workload, build_model, get_arch
from tokenmerge.tools.bench_timing import OperatorCounter

#: (arch, resolution, batch, methods) of the default table: the issue's target rows.
DEFAULT_ROWS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("sd15", 512, 2, ("tomesd:0.5", "todo:2", "catome:0.7")),
    ("sd15", 1024, 2, ("tomesd:0.5",)),
    ("dit-xl-2", 512, 8, ("block:0.5",)),
    ("vit-b16", 224, 256, ("tome:13",)),
)


# The meta device stands in for a GPU here: let `MergePlan.merge` pick its forms as on CUDA.
MATRIX_MERGE_MAX_TOKENS.setdefault("meta", MATRIX_MERGE_MAX_TOKENS["cuda"])


def count(work: Workload, model: torch.nn.Module) -> tuple[Counter[str], int]:
    """Operators and FLOPs of one call of ``work`` (after one uncounted call)."""
    with torch.inference_mode():
        work.step(model, 0)
        with OperatorCounter() as counter:
            work.step(model, 0)
        with FlopCounterMode(display=False) as flops:
            work.step(model, 0)
    return counter.counts, flops.get_total_flops()


def profile(arch: str, resolution: int, batch: int, specs: tuple[str, ...], top: int) -> list[str]:
    """The table lines of one architecture."""
    meta = torch.device("meta")
    spec = get_arch(arch)
    model = build_model(spec, resolution, device=meta, dtype=torch.float16)
    work = Workload(spec, model, batch, resolution, meta, torch.float16)
    plain, plain_flops = count(work, model)
    total = sum(plain.values())
    lines = [f"{arch} {resolution}px batch {batch}: plain {total} operators, {plain_flops / 1e9:,.0f} GFLOP per call"]
    methods = [parse_method(s) for s in specs]
    if spec.diffusion and spec.family == "unet" and tomesd_available():
        methods.append(Method.tomesd(0.5))
    for method in methods:
        detach, handle = method.attach(model)
        try:
            counts, flops = count(work, model)
            merged = dict(handle.state.merged_tokens) if handle is not None else {}
        except RuntimeError as error:  # a host read of a meta tensor (CAToMe's threshold)
            lines.append(f"  {method.label:<24} n/a on meta: {str(error).splitlines()[0][:70]}")
            continue
        finally:
            detach()
        rows = [(method.label, counts, flops, merged)]
        if merged and handle is not None:
            removed = {layer: n_in - n_out for layer, (n_in, n_out) in merged.items()}
            ideal = Method.ideal(method, removed, handle.config)
            detach, _ = ideal.attach(model)
            try:
                rows.append((ideal.label, *count(work, model), merged))
            finally:
                detach()
        for label, ops, flops, layers in rows:
            extra = sum(ops.values()) - total
            per_layer = f", {extra / len(layers):+.0f} per merging layer ({len(layers)})" if layers else ""
            added = sorted((ops - plain).items(), key=lambda kv: -kv[1])[:top]
            shown = ", ".join(f"{name} {n}" for name, n in added)
            bound = f"{flops / 1e9:,.0f} GFLOP, FLOP ratio {plain_flops / flops:.2f}x"
            lines.append(f"  {label:<24} {sum(ops.values()):>6} ({extra:+d}{per_layer}); {bound}; added: {shown}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="op_counts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="one architecture instead of the default table (see tokenmerge bench)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="method specs, as tokenmerge bench takes them")
    parser.add_argument("--top", type=int, default=6, help="operators shown per row (the most added)")
    args = parser.parse_args(argv)
    if args.arch:
        spec = get_arch(args.arch)
        rows: Any = [
            (args.arch, args.resolution or spec.resolution, args.batch or spec.batch, tuple(args.methods or ()))
        ]
    else:
        rows = DEFAULT_ROWS
    print(f"operators and FLOPs per call (torch {torch.__version__}, built on the meta device)")
    for arch, resolution, batch, specs in rows:
        print("\n".join(profile(arch, resolution, batch, specs, args.top)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
