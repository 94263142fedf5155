"""ToMe against the zero-overhead ideal on the residual-stream families, in CPU time.

For a ViT-B-sized timm ``VisionTransformer``, Hugging Face ``ViTModel`` and timm EVA-02
(random weights, float32, batch 16, ``ToMe(13)``) it times, interleaved over rounds:
the plain model, ToMe, the ideal at ToMe's token counts
(`tokenmerge.tools.ideal`), and ToMe with the generic `MergePlan.merge_with_size` in
place of the stream's own merge (`tokenmerge.adapters.stream.merge_stream`), the form
the stream used before. Each call is timed in process CPU time on one thread, which a
shared, busy machine disturbs far less than wall-clock time. Prints the median of the
rounds and the share of the ideal's gain each method reaches,
``(speed-up - 1) / (ideal - 1)``.

    PYTHONPATH=. python benchmarks/stream_families.py timm-vit hf-vit eva02 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import tokenmerge
import tokenmerge.adapters.stream as stream
from tokenmerge.policies.caches import NoCache
from tokenmerge.tools.ideal import IdealMatcher, TokenCounts

FAMILIES = ("timm-vit", "hf-vit", "eva02")


def build(name: str) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Any]]:
    """A ViT-B-sized model of the family with random weights, and how to call it."""
    torch.manual_seed(0)
    if name == "hf-vit":
        import transformers

        config = transformers.ViTConfig()
        config._attn_implementation = "sdpa"
        return transformers.ViTModel(config).eval(), lambda model, x: model(pixel_values=x).pooler_output
    import timm

    arch = "vit_base_patch16_224" if name == "timm-vit" else "eva02_base_patch14_224"
    return timm.create_model(arch, pretrained=False).eval(), lambda model, x: model(x)


def _generic_merge(plan: Any, x: Tensor, mode: Any, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
    return plan.merge_with_size(x, mode, sizes)


def measure(name: str, rounds: int, batch: int, r: int) -> dict[str, float]:
    """Median CPU seconds of each row over ``rounds`` interleaved rounds (after one warm-up round)."""
    model, call = build(name)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tome = tokenmerge.ToMe(r)
    with torch.no_grad():
        handle = tokenmerge.apply(model, tome)
        call(model, x)
        counts = {layer: n_in - n_out for layer, (n_in, n_out) in handle.state.merged_tokens.items()}
        handle.remove()
    ideal = tome.replace(matcher=IdealMatcher(), threshold=TokenCounts(counts), cache=NoCache())
    rows = {"plain": None, f"ToMe({r})": tome, "ideal": ideal, f"ToMe({r}) generic merge": tome}
    own_merge = stream.merge_stream
    times: dict[str, list[float]] = {label: [] for label in rows}
    try:
        with torch.no_grad():
            for round_index in range(rounds + 1):
                for label, config in rows.items():
                    stream.merge_stream = _generic_merge if "generic" in label else own_merge
                    handle = tokenmerge.apply(model, config) if config is not None else None
                    begin = time.process_time()
                    call(model, x)
                    took = time.process_time() - begin
                    if handle is not None:
                        handle.remove()
                    if round_index:
                        times[label].append(took)
    finally:
        stream.merge_stream = own_merge
    return {label: statistics.median(values) for label, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--r", type=int, default=13)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.families:
        medians = measure(name, args.rounds, args.batch, args.r)
        plain, ideal = medians["plain"], medians["ideal"]
        gain = plain / ideal - 1
        print(f"{name}: plain {plain * 1e3:.0f} ms CPU, ideal {ideal * 1e3:.0f} ms ({plain / ideal:.2f}x)")
        for label, seconds in medians.items():
            if label.startswith("ToMe"):
                speedup = plain / seconds
                print(
                    f"  {label}: {seconds * 1e3:.0f} ms ({speedup:.2f}x), "
                    f"share of the ideal's gain {(speedup - 1) / gain:.2f}"
                )


if __name__ == "__main__":
    main()
