"""Flux.1 (text to image, MM-DiT) with and without token merging: images, time per call, PSNR.

    python examples/flux.py --model black-forest-labs/FLUX.1-dev --blocks 4,52 --ratio 0.5
    python examples/flux.py --model /path/to/FLUX.1-dev --method tomesd --ratio 0.5 --size 1024
    python examples/flux.py --tiny --steps 4          # tiny random-weight pipeline on the CPU

Text tokens never merge; only the image tokens do, and their rotary positions follow
them. ``--blocks first,last`` merges the image tokens of the residual stream once before
block ``first`` and unmerges them after block ``last``; Flux's blocks are counted in the
order they run, the 19 double-stream blocks as 0-18 and the 38 single-stream blocks as
19-56 (the range runs with proportional attention, as an attention mask). Without it,
the preset merges around every block's attention (and feed-forward with ``--merge-mlp``).
``--tiny`` builds the pipeline in code (no download, no text encoder: random prompt
embeddings); a checkpoint given by ``--model`` is loaded by hub id or local folder and
prompted with ``--prompt``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from _diffusion_common import add_arguments, build_config, compare, parse, pick_device, sampler

from tokenmerge.tools.common import psnr


def pick_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """``--dtype``, else bfloat16 on cuda (Flux overflows in float16) and float32 elsewhere."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline: from ``--model`` (hub id or folder), or the tiny one with ``--tiny``."""
    if args.tiny:
        from tokenmerge.tools.tiny import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(seed=args.seed, guidance_embeds=True)  # FLUX.1-dev's guidance-distilled form
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def prompt_inputs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the pipeline is prompted with: ``--prompt``, or random embeddings for ``--tiny``."""
    common = {"height": args.size, "width": args.size}
    if not args.tiny:
        return {**common, "prompt": [args.prompt] * args.batch, "max_sequence_length": args.max_sequence_length}
    from tokenmerge.tools.tiny import FLUX_POOLED_DIM, JOINT_TEXT_DIM

    gen = torch.Generator().manual_seed(args.seed)
    text = torch.randn(args.batch, 7, JOINT_TEXT_DIM, generator=gen)  # (B, T, D) in place of T5's output
    pooled = torch.randn(args.batch, FLUX_POOLED_DIM, generator=gen)  # (B, D) in place of CLIP's pooled output
    return {**common, "prompt_embeds": text.to(pipe.dtype), "pooled_prompt_embeds": pooled.to(pipe.dtype)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns, with ``psnr_db`` of the merged images."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="black-forest-labs/FLUX.1-dev", steps=28, size=1024)
    parser.add_argument("--prompt", default="a photo of a red fox in the snow, golden hour")
    parser.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance (default 3.5)")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens of the prompt")
    args = parse(parser, argv, tiny_size=64)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (8x VAE, 2x2 packing); got {args.size}")
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    generate = sampler(pipe, args, **prompt_inputs(pipe, args))
    name = f"Flux ({args.model if not args.tiny else 'tiny'})"
    result = compare(pipe, generate, build_config(args), args, device, name=name)
    result["psnr_db"] = psnr(result["merged"].float(), result["plain"].float())
    print(f"PSNR of the merged images against the plain ones: {result['psnr_db']:.2f} dB")
    return result


if __name__ == "__main__":
    main()
