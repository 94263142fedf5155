"""PixArt-α with and without token merging: images and time per call.

    python examples/pixart.py --model PixArt-alpha/PixArt-XL-2-1024-MS --method tomesd --ratio 0.5
    python examples/pixart.py --model ./pixart --blocks 4,23 --ratio 0.5 --size 1024
    python examples/pixart.py --tiny --steps 4      # tiny random-weight pipeline on the CPU

``--blocks first,last`` keeps the residual stream merged from block ``first`` through
block ``last`` (with proportional attention) instead of merging around every layer.
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

PROMPT = "a small cactus with a happy face in the Sahara desert"


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline: from ``--model`` (hub id or folder), or the tiny one with ``--tiny``."""
    if args.tiny:
        from tokenmerge.tools.tiny import tiny_pixart_pipeline

        pipe = tiny_pixart_pipeline(seed=args.seed)
    else:
        from diffusers import PixArtAlphaPipeline

        pipe = from_pretrained(PixArtAlphaPipeline, args.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if pipe.dtype == dtype else pipe.to(device=device, dtype=dtype)


def tiny_prompt(batch: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Random caption embeddings and masks standing in for PixArt's T5 encoder."""
    from tokenmerge.tools.tiny import CAPTION_DIM

    caption = torch.randn(batch, 8, CAPTION_DIM, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    mask = torch.ones(batch, 8, device=device)
    return {
        "prompt_embeds": caption,
        "prompt_attention_mask": mask,
        "negative_prompt": None,
        "negative_prompt_embeds": torch.zeros_like(caption),
        "negative_prompt_attention_mask": mask,
        "use_resolution_binning": False,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="PixArt-alpha/PixArt-XL-2-1024-MS", steps=20, size=1024)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--guidance", type=float, default=4.5)
    args = parse(parser, argv, tiny_size=128)
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    prompt = tiny_prompt(args.batch, args.seed, device, dtype) if args.tiny else {"prompt": [args.prompt] * args.batch}
    generate = sampler(pipe, args, **prompt, height=args.size, width=args.size)

    name = f"PixArt-α ({args.model if not args.tiny else 'tiny'})"
    return compare(pipe, generate, build_config(args), args, device, name=name)


if __name__ == "__main__":
    run_script(main, "pixart.py", load_errors=(OSError,))
