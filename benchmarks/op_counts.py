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
run on ``meta``; their rows say so, as do methods the model refuses. Each method is
counted on its second call, so one-off work (building the partition tables) is left out.

For the patch transformers of the newer families (Flux, SD3, Wan) the table also has a
*token floor* row per ``--fewer`` fraction: the plain model on that fraction fewer image
tokens (text untouched; `Workload.fewer_tokens`), the zero-overhead ideal of a merge
that spans every block, and so the largest FLOP ratio any merge of that many image
tokens can reach.

    python benchmarks/op_counts.py                      # the default table
    python benchmarks/op_counts.py --set modern --markdown   # Flux, SD3.5, Wan as a Markdown table
    python benchmarks/op_counts.py --arch sd15 --resolution 1024 --methods tomesd:0.5 todo:2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenmerge.errors import TokenMergeError
from tokenmerge.plan import MATRIX_MERGE_MAX_TOKENS
from tokenmerge.tools.bench_methods import Method, parse_method, tomesd_available
from tokenmerge.tools.bench_models import Workload, build_model, get_arch
from tokenmerge.tools.bench_timing import OperatorCounter

Rows = tuple[tuple[str, int, int, tuple[str, ...]], ...]

#: (arch, resolution, batch, methods) of the classic table: SD 1.5, DiT-XL/2, ViT-B/16.
CLASSIC_ROWS: Rows = (
    ("sd15", 512, 2, ("tomesd:0.5", "todo:2", "catome:0.7")),
    ("sd15", 1024, 2, ("tomesd:0.5",)),
    ("dit-xl-2", 512, 8, ("block:0.5",)),
    ("vit-b16", 224, 256, ("tome:13",)),
)

#: The newer families at their published sizes: Flux.1-dev and SD3.5 Medium at 1024 px,
#: Wan 2.1 1.3B at 480x832 px and 81 frames; one denoiser call each (Flux: batch 1, guidance
#: distilled; SD3.5: batch 2, classifier-free guidance in one call; Wan: batch 1, its pipeline
#: makes the conditional and unconditional calls apart).
MODERN_METHODS = ("tomesd:0.5", "tomesd:0.5,merge_mlp=1", "todo:2", "block:0.5", "block:0.75", "catome:0.7")
MODERN_ROWS: Rows = (
    ("flux-dev", 1024, 1, MODERN_METHODS),
    ("sd35-medium", 1024, 2, MODERN_METHODS),
    ("wan-1.3b", 480, 1, (*MODERN_METHODS, "tomesd:0.5,st=2", "block:0.5,st=2")),  # st=2: cells span 2 frames
)

#: The tables ``--set`` picks.
ROW_SETS: dict[str, Rows] = {"classic": CLASSIC_ROWS, "modern": MODERN_ROWS, "all": CLASSIC_ROWS + MODERN_ROWS}
DEFAULT_ROWS: Rows = ROW_SETS["all"]

#: Families with a token-floor row (`Workload.fewer_tokens`).
FLOOR_FAMILIES = ("flux", "sd3", "wan")


# The meta device stands in for a GPU here: let `MergePlan.merge` pick its forms as on CUDA.
MATRIX_MERGE_MAX_TOKENS.setdefault("meta", MATRIX_MERGE_MAX_TOKENS["cuda"])


@contextlib.contextmanager
def readable_ids(work: Workload) -> Iterator[None]:
    """Let the adapter read ``work``'s position ids on the host although they are on ``meta``.

    A packed latent (Flux) carries its token grid in its position ids, which the adapter
    reads on the host once per call; a ``meta`` tensor has no values to read. Inside
    this block that read is made from a CPU copy of the same ids (the workload's inputs
    built on the CPU), so the same operators run and are counted; nothing else changes.
    """
    from tokenmerge.adapters.diffusion_layout import DenoiserLayout

    cpu = Workload(work.spec, work.model, work.batch, work.resolution, torch.device("cpu"), work.dtype)
    by_shape = {tuple(v.shape): v for k, v in cpu.inputs.items() if k.endswith("_ids")}
    original = DenoiserLayout.grid_of_ids

    def grid_of_ids(self: DenoiserLayout, ids: object) -> tuple[int, ...] | None:
        if isinstance(ids, torch.Tensor) and ids.is_meta and tuple(ids.shape) in by_shape:
            ids = by_shape[tuple(ids.shape)]
        return original(self, ids)

    DenoiserLayout.grid_of_ids = grid_of_ids  # type: ignore[method-assign]
    try:
        yield
    finally:
        DenoiserLayout.grid_of_ids = original  # type: ignore[method-assign]


def count(work: Workload, model: torch.nn.Module) -> tuple[Counter[str], int]:
    """Operators and FLOPs of one call of ``work`` (after one uncounted call)."""
    with torch.inference_mode(), readable_ids(work):
        work.step(model, 0)
        with OperatorCounter() as counter:
            work.step(model, 0)
        with FlopCounterMode(display=False) as flops:
            work.step(model, 0)
    return counter.counts, flops.get_total_flops()


@dataclass
class Row:
    """One counted row: a method (or plain, an ideal, a token floor) on one architecture."""

    label: str
    ops: Counter[str] | None = None
    flops: int = 0
    layers: int = 0
    ideal_of: str | None = None
    note: str = ""

    @property
    def total(self) -> int:
        """Operators per call."""
        return sum(self.ops.values()) if self.ops is not None else 0


def profile_rows(
    arch: str, resolution: int, batch: int, specs: tuple[str, ...], fewer: tuple[float, ...] = (0.5,)
) -> tuple[str, list[Row]]:
    """The title and the counted rows of one architecture: plain first, each method then its ideal."""
    meta = torch.device("meta")
    spec = get_arch(arch)
    dtype = torch.bfloat16 if spec.family in FLOOR_FAMILIES else torch.float16
    model = build_model(spec, resolution, device=meta, dtype=dtype)
    work = Workload(spec, model, batch, resolution, meta, dtype)
    rows = [Row("plain", *count(work, model))]
    title = f"{arch} {resolution}px batch {batch} {str(dtype).replace('torch.', '')}"
    if spec.family in FLOOR_FAMILIES:
        for fraction in fewer:
            floor = work.fewer_tokens(fraction)
            kept = floor.inputs["latents"].numel() / work.inputs["latents"].numel()
            rows.append(Row(f"token floor {1 - kept:.0%}", *count(floor, model), note="plain on fewer image tokens"))
    methods = [parse_method(s) for s in specs]
    if spec.diffusion and spec.family == "unet" and tomesd_available():
        methods.append(Method.tomesd(0.5))
    for method in methods:
        try:
            detach, handle = method.attach(model)
        except TokenMergeError as error:  # the model refuses the method (or no adapter takes the model)
            rows.append(Row(method.label, note=f"refused: {str(error).splitlines()[0][:110]}"))
            continue
        try:
            counts, flops = count(work, model)
            merged = dict(handle.state.merged_tokens) if handle is not None else {}
        except (RuntimeError, NotImplementedError, TokenMergeError) as error:  # a host read of a meta tensor
            rows.append(Row(method.label, note=f"n/a on meta: {str(error).splitlines()[0][:90]}"))
            continue
        finally:
            detach()
        rows.append(Row(method.label, counts, flops, len(merged)))
        if merged and handle is not None:
            removed = {layer: n_in - n_out for layer, (n_in, n_out) in merged.items()}
            ideal = Method.ideal(method, removed, handle.config)
            detach, _ = ideal.attach(model)
            try:
                rows.append(Row(ideal.label, *count(work, model), len(merged), ideal_of=method.label))
            except (RuntimeError, NotImplementedError, TokenMergeError) as error:
                rows.append(Row(ideal.label, note=f"n/a: {str(error).splitlines()[0][:90]}", ideal_of=method.label))
            finally:
                detach()
    return title, rows


def profile(
    arch: str, resolution: int, batch: int, specs: tuple[str, ...], top: int, fewer: tuple[float, ...] = (0.5,)
) -> list[str]:
    """The text lines of one architecture."""
    title, rows = profile_rows(arch, resolution, batch, specs, fewer)
    plain = rows[0]
    assert plain.ops is not None
    lines = [f"{title}: plain {plain.total} operators, {plain.flops / 1e9:,.0f} GFLOP per call"]
    for row in rows[1:]:
        if row.ops is None:
            lines.append(f"  {row.label:<24} {row.note}")
            continue
        extra = row.total - plain.total
        per_layer = f", {extra / row.layers:+.0f} per merging layer ({row.layers})" if row.layers else ""
        added = sorted((row.ops - plain.ops).items(), key=lambda kv: -kv[1])[:top]
        shown = ", ".join(f"{name} {n}" for name, n in added)
        bound = f"{row.flops / 1e9:,.0f} GFLOP, FLOP ratio {plain.flops / row.flops:.2f}x"
        lines.append(f"  {row.label:<24} {row.total:>6} ({extra:+d}{per_layer}); {bound}; added: {shown}")
    return lines


def markdown(arch: str, resolution: int, batch: int, specs: tuple[str, ...], fewer: tuple[float, ...]) -> list[str]:
    """One architecture as Markdown table rows (the header is `MARKDOWN_HEADER`)."""
    title, rows = profile_rows(arch, resolution, batch, specs, fewer)
    plain = rows[0]
    by_label = {row.label: row for row in rows}
    lines = []
    for row in rows:
        if row.ops is None:
            lines.append(f"| {title} | {row.label} | {row.note} | | | |")
            continue
        ratio = f"{plain.flops / row.flops:.2f}x"
        versus = ""
        if row.ideal_of is None and f"ideal@{row.label}" in by_label:
            ideal = by_label[f"ideal@{row.label}"]
            if ideal.ops is not None:
                versus = f"{row.total - ideal.total:+d} ({row.total / ideal.total:.2f}x the ideal's)"
        elif row.label.startswith("token floor") or row.label == "plain":
            versus = "(no merging ops)"
        lines.append(f"| {title} | {row.label} | {row.total:,} | {row.flops / 1e12:,.2f} | {ratio} | {versus} |")
    return lines


MARKDOWN_HEADER = [
    "| model, size, batch, dtype | row | ops per call | TFLOP per call | FLOP ratio | ops vs ideal |",
    "| --- | --- | --- | --- | --- | --- |",
]


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="op_counts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="one architecture instead of the default table (see tokenmerge bench)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None, help="method specs, as tokenmerge bench takes them")
    parser.add_argument("--top", type=int, default=6, help="operators shown per row (the most added)")
    parser.add_argument("--set", choices=sorted(ROW_SETS), default="all", help="which default table (no --arch)")
    parser.add_argument(
        "--fewer", type=float, nargs="*", default=[0.5], help="token-floor fractions (Flux, SD3, Wan; none: no rows)"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for BENCHMARKS.md)")
    args = parser.parse_args(argv)
    if args.arch:
        spec = get_arch(args.arch)
        rows: Any = [
            (args.arch, args.resolution or spec.resolution, args.batch or spec.batch, tuple(args.methods or ()))
        ]
    else:
        rows = ROW_SETS[args.set]
    import diffusers

    print(
        f"operators and FLOPs per call (torch {torch.__version__}, diffusers {diffusers.__version__}, "
        "built on the meta device)"
    )
    fewer = tuple(args.fewer)
    if args.markdown:
        print("\n".join(MARKDOWN_HEADER))
    for arch, resolution, batch, specs in rows:
        if args.markdown:
            print("\n".join(markdown(arch, resolution, batch, specs, fewer)), flush=True)
        else:
            print("\n".join(profile(arch, resolution, batch, specs, args.top, fewer)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
