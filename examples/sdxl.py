"""Stable Diffusion XL with and without token merging: images and time per call.

    python examples/sdxl.py --model stabilityai/stable-diffusion-xl-base-1.0 --method tomesd --ratio 0.5
    python examples/sdxl.py --model ./sdxl --method todo --size 1024
    python examples/sdxl.py --tiny --steps 4        # tiny random-weight pipeline on the CPU

SDXL has no attention at its full latent resolution; tokenmerge counts ``max_downsample``
from its highest-resolution level that has attention, so the default merges there
(tomesd's default merges nothing on SDXL).
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
        from tokenmerge.tools.tiny import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline(seed=args.seed)
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = from_pretrained(StableDiffusionXLPipeline, args.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if pipe.dtype == dtype else pipe.to(device=device, dtype=dtype)


def tiny_prompt(batch: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Random text and pooled embeddings standing in for SDXL's two text encoders."""
    from tokenmerge.tools.tiny import POOLED_DIM, tiny_prompt_embeds

    text = tiny_prompt_embeds(batch, seed=seed).to(device, dtype)
    pooled = torch.randn(batch, POOLED_DIM, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return {
        "prompt_embeds": text,
        "negative_prompt_embeds": torch.zeros_like(text),
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="stabilityai/stable-diffusion-xl-base-1.0", steps=50, size=1024)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parse(parser, argv, tiny_size=16)
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    prompt = tiny_prompt(args.batch, args.seed, device, dtype) if args.tiny else {"prompt": [args.prompt] * args.batch}
    generate = sampler(pipe, args, **prompt, height=args.size, width=args.size)

    name = f"SDXL ({args.model if not args.tiny else 'tiny'})"
    return compare(pipe, generate, build_config(args), args, device, name=name)


if __name__ == "__main__":
    run_script(main, "sdxl.py", load_errors=(OSError,))
