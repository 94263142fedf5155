"""How many kernels inductor generates for a compiled UNet step: plain, a method, its ideal.

With CUDA graphs (``mode="reduce-overhead"``) launches cost nothing, but each kernel still
takes its few microseconds on the GPU, so the kernels a merge adds to the compiled graph
are its fixed cost. This compiles SD 1.5's top two levels (the level that merges and the
one below, full width) at a small size on the CPU with inductor and prints
``torch._inductor.metrics.generated_kernel_count`` per row (loops inside one fused kernel
count too; library calls such as ``bmm`` and ``sort`` do not). A few minutes on 2 cores.

    python benchmarks/compiled_kernels.py
    python benchmarks/compiled_kernels.py --methods tomesd:0.5 todo:2 --resolution 128
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from torch._inductor import metrics

from tokenmerge.tools.bench_methods import Method, parse_method
from tokenmerge.tools.bench_models import ArchSpec, Workload, build_model, get_arch


def top_levels_spec() -> ArchSpec:
    """SD 1.5's first two levels (320 and 640 channels): the top level merges, as in the full UNet."""
    base = get_arch("sd15")
    config = {
        **base.config,
        "block_out_channels": (320, 640),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }
    return dataclasses.replace(base, name="sd15-top2", config=config)


def main(argv: list[str] | None = None) -> int:
    """Print one line per row; returns the exit status."""
    parser = argparse.ArgumentParser(prog="compiled_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["tomesd:0.5"], help="method specs (as tokenmerge bench)")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args(argv)
    spec = top_levels_spec()
    cpu = torch.device("cpu")
    model = build_model(spec, args.resolution, device=cpu, dtype=torch.float32)
    work = Workload(spec, model, 2, args.resolution, cpu, torch.float32, schedule=2)
    rows = [Method.plain()]
    for method in (parse_method(m) for m in args.methods):
        rows.append(method)
        with torch.no_grad():  # the eager call records the token counts the ideal replays
            detach, handle = method.attach(model)
            try:
                work.step(model, 0)
                removed = {k: n_in - n_out for k, (n_in, n_out) in handle.state.merged_tokens.items()}
                rows.append(Method.ideal(method, removed, handle.config))
            finally:
                detach()
    print(f"torch {torch.__version__}, inductor on the CPU, {spec.name} at {args.resolution} px, batch 2")
    for row in rows:
        torch._dynamo.reset()
        metrics.reset()
        detach, _ = row.attach(model)
        try:
            compiled = torch.compile(model)
            started = time.perf_counter()
            with torch.no_grad():
                work.step(compiled, 0)
            print(
                f"  {row.label:<22} {metrics.generated_kernel_count:>5} generated kernels "
                f"(compiled in {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        finally:
            detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
