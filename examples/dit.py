"""DiT (class-conditional ImageNet) with and without token merging: images and time per call.

    python examples/dit.py --model facebook/DiT-XL-2-256 --method tomesd --ratio 0.5
    python examples/dit.py --model facebook/DiT-XL-2-512 --size 512 --blocks 4,23 --ratio 0.5
    python examples/dit.py --tiny --steps 4         # tiny random-weight pipeline on the CPU

``--blocks first,last`` merges the residual stream once before block ``first`` and
unmerges it after block ``last`` (with proportional attention), instead of merging
around every attention/feed-forward layer: for DiTs the per-layer round trip costs most
of what merging saves.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from _diffusion_common import (
    add_arguments,
    build_config,
    compare,
    from_pretrained,
    parse,
    pick_device,
    pick_dtype,
    sampler,
)

from tokenmerge.tools.cli import OneLineParser, run_script


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline: from ``--model`` (hub id or folder), or the tiny one with ``--tiny``."""
    if args.tiny:
        from tokenmerge.tools.tiny import tiny_dit_pipeline

        pipe = tiny_dit_pipeline(seed=args.seed)
    else:
        from diffusers import DiTPipeline

        pipe = from_pretrained(DiTPipeline, args.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if pipe.dtype == dtype else pipe.to(device=device, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="facebook/DiT-XL-2-256", steps=50, size=256)
    parser.add_argument("--classes", default="207,360,387,974", help="comma-separated ImageNet class ids")
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parse(parser, argv, tiny_size=16)
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    latent = pipe.transformer.config.sample_size
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if args.size != latent * scale:  # DiTPipeline draws latents of the transformer's own size
        print(f"note: this DiT generates {latent * scale} px images; --size {args.size} is ignored")
        args.size = latent * scale
    classes = [int(label) for label in args.classes.split(",")]
    labels = (classes * args.batch)[: max(args.batch, 1)] if args.batch else classes
    generate = sampler(pipe, args, class_labels=labels)

    name = f"DiT ({args.model if not args.tiny else 'tiny'})"
    return compare(pipe, generate, build_config(args), args, device, name=name)


if __name__ == "__main__":
    run_script(main, "dit.py", load_errors=(OSError,))
