"""Profile one denoising step of a trained reference model with and without merging (CPU or GPU).

One step of ``tokenmerge.tools.zoo``'s model at the fidelity benchmark's batch (2 images with
classifier-free guidance: a batch of 4), plain, with tokenmerge's ToMeSD and, when it is
installed, with the tomesd library at the same ratio: the best wall time of a few steps and
a `torch.profiler` table of the operators that take the most time. Timings on a shared
machine move from run to run; the profile says where the time goes.

    python benchmarks/zoo_step_profile.py                 # unet-photos, ratio 0.5, CPU
    python benchmarks/zoo_step_profile.py --model dit-photos --ratio 0.25 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch

import tokenmerge
from tokenmerge.tools import zoo
from tokenmerge.tools.common import device_argument, resolve_device
from tokenmerge.tools.demo import measure


def best_ms(step: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up, in ms (`tokenmerge.tools.demo.measure`)."""
    return 1000 * measure(step, device, repeats)[0]


def profile_table(step: Callable[[], object], rows: int) -> str:
    """The operators of one call, most self time first."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    """Print the timings and profiles; returns the exit status."""
    parser = argparse.ArgumentParser(prog="zoo_step_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet-photos", choices=zoo.names())
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--device", type=device_argument, default="cpu")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--rows", type=int, default=10, help="operators shown per profile")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    pipe = zoo.load(args.model, device=device)
    denoiser = pipe.unet if args.model.startswith("unet") else pipe.transformer
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=generator).to(device)  # (B, 3, H, W)
    t = torch.full((4,), 500, device=device)  # (B,)
    labels = torch.tensor([0, 1, 16, 16], device=device)  # two classes and their null labels
    if args.model.startswith("unet"):
        tokens = pipe.class_tokens(labels)  # (B, 4, 64)

        def step() -> Any:
            return denoiser(x, t, encoder_hidden_states=tokens).sample
    else:

        def step() -> Any:
            return denoiser(x, timestep=t, class_labels=labels).sample

    print(f"{args.model}, one step at batch 4, {device}, torch {torch.__version__}")
    print(f"plain: {best_ms(step, device, args.repeats):.1f} ms")
    handle = tokenmerge.apply(denoiser, tokenmerge.ToMeSD(ratio=args.ratio, seed=0))
    try:
        print(f"tokenmerge ToMeSD({args.ratio:g}): {best_ms(step, device, args.repeats):.1f} ms")
        print(profile_table(step, args.rows))
    finally:
        handle.remove()
    if importlib.util.find_spec("tomesd") is not None and args.model.startswith("unet"):
        import tomesd

        tomesd.apply_patch(denoiser, ratio=args.ratio)
        try:
            print(f"tomesd library r={args.ratio:g}: {best_ms(step, device, args.repeats):.1f} ms")
            print(profile_table(step, args.rows))
        finally:
            tomesd.remove_patch(denoiser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
