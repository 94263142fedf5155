"""Time the two forms of a size-weighted merge, `MergePlan.merge(form="index")` against
``form="matrix"``, at a model's token shapes on this machine (CPU or GPU).

The index form gathers, scatter-adds and divides (about six passes over ``x``); the
matrix form is one batched product with the ``(B, N - r, N)`` membership matrix. Which
is faster depends on N and the device; `tokenmerge.plan.MATRIX_MERGE_MAX_TOKENS` holds
the crossover ``form="auto"`` uses. Prints the best of ``--repeats`` timings of each,
interleaved, per shape.

    python benchmarks/merge_forms.py                        # ViT-B/16 (197 tokens) and DiT-XL/2 shapes
    python benchmarks/merge_forms.py --shapes 256x197x768x13 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from tokenmerge.plan import MergePlan
from tokenmerge.policies.base import Matching
from tokenmerge.tools.bench_timing import timed_once

#: ``BxNxCxR``: batch, tokens (a class token included), width, tokens removed.
DEFAULT_SHAPES = ("64x197x768x13", "16x197x768x13", "16x1025x1152x512")
FORMS = ("index", "matrix")


def plan_for(batch: int, tokens: int, r: int, device: torch.device) -> MergePlan:
    """A ToMe-like plan: alternating sources and destinations after one protected token, random pairs."""
    gen = torch.Generator().manual_seed(0)
    mergeable = tokens - 1
    src = torch.arange(0, mergeable, 2).expand(batch, -1)
    dst = torch.arange(1, mergeable, 2).expand(batch, -1)
    best = torch.randint(0, dst.shape[1], src.shape, generator=gen)
    matching = Matching(src_idx=src, dst_idx=dst, best=best, score=torch.rand(src.shape, generator=gen))
    return MergePlan.from_matching(matching, r, protected=1).to(device)


def main(argv: list[str] | None = None) -> int:
    """Print one line per shape; returns the exit status."""
    parser = argparse.ArgumentParser(prog="merge_forms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BxNxCxR shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {device}, {dtype}, {torch.get_num_threads()} threads; best of {args.repeats}")
    for shape in args.shapes:
        batch, tokens, width, r = (int(v) for v in shape.split("x"))
        plan = plan_for(batch, tokens, r, device)
        x = torch.randn(batch, tokens, width, device=device, dtype=dtype)  # (B, N, C)
        sizes = torch.rand(batch, tokens, device=device) * 3 + 1  # (B, N)
        forms = {form: functools.partial(plan.merge_with_size, x, "weighted", sizes, form=form) for form in FORMS}
        best = dict.fromkeys(forms, float("inf"))
        with torch.inference_mode():
            for fn in forms.values():
                for _ in range(3):
                    fn()
            for _ in range(args.repeats):
                for form, fn in forms.items():
                    best[form] = min(best[form], timed_once(fn, device)[1])
        ratio = best["matrix"] / best["index"]
        print(
            f"B={batch} N={tokens} C={width} r={r}: index {best['index'] * 1e3:.2f} ms, "
            f"matrix {best['matrix'] * 1e3:.2f} ms, matrix/index {ratio:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
