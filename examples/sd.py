"""Stable Diffusion 1.x/2.x with and without token merging: images and time per call.

    python examples/sd.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --method tomesd --ratio 0.5
    python examples/sd.py --model ./sd15 --method catome --threshold 0.7 --steps 50 --size 512
    python examples/sd.py --tiny --steps 4          # tiny random-weight pipeline on the CPU

The pipeline call itself is unchanged: `tokenmerge.apply(pipe, config)` hooks the UNet.
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

PROMPT = "a photograph of an astronaut riding a horse"


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline: from ``--model`` (hub id or folder), or the tiny one with ``--tiny``."""
    if args.tiny:
        from tokenmerge.tools.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=args.seed)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = from_pretrained(StableDiffusionPipeline, args.model, torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if pipe.dtype == dtype else pipe.to(device=device, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="stable-diffusion-v1-5/stable-diffusion-v1-5", steps=50, size=512)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parse(parser, argv, tiny_size=16)
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    if args.tiny:
        from tokenmerge.tools.tiny import tiny_prompt_embeds

        text = tiny_prompt_embeds(args.batch, seed=args.seed).to(device, dtype)
        prompt: dict[str, Any] = {"prompt_embeds": text, "negative_prompt_embeds": torch.zeros_like(text)}
    else:
        prompt = {"prompt": [args.prompt] * args.batch}
    generate = sampler(pipe, args, **prompt, height=args.size, width=args.size)

    return compare(
        pipe, generate, build_config(args), args, device, name=f"SD ({args.model if not args.tiny else 'tiny'})"
    )


if __name__ == "__main__":
    run_script(main, "sd.py", load_errors=(OSError,))
