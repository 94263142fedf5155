"""Wan 2.1 (text to video) with and without token merging: frames, time per call, PSNR.

    python examples/wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --blocks 2,27 --ratio 0.5
    python examples/wan.py --model /path/to/Wan2.1-T2V-1.3B-Diffusers --method tomesd --ratio 0.5
    python examples/wan.py --tiny --steps 4           # tiny random-weight pipeline on the CPU

A Wan video is a (frames, height, width) grid of tokens: 81 frames at 480x832 px are
21 x 30 x 52 = 32,760 of them (the VAE keeps one latent frame in four, patches are 2x2).
Only these merge; the text is attended to by cross-attention and never merges. A
merging cell is a box of the grid, 2x2 tokens of one latent frame (``--st 2``: of two
consecutive frames), and the rotary positions follow the merged tokens. ``--blocks
first,last`` merges the residual stream once before block ``first`` and unmerges after
block ``last`` (the 1.3B model has blocks 0-29). ``--size`` is the height, ``--width``
and ``--frames`` the rest; the frames are saved as ``plain_<n>.png``/``merged_<n>.png``.
``--tiny`` builds the pipeline in code (no download, no text encoder: random prompt
embeddings; a tiny Wan VAE with random weights); a checkpoint given by ``--model`` is
loaded by hub id or local folder and prompted with ``--prompt``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _diffusion_common import add_arguments, build_config, compare, parse, pick_device

from tokenmerge.tools.common import psnr, seeded


def pick_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """``--dtype``, else bfloat16 on cuda (the checkpoints' dtype) and float32 elsewhere."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def tiny_video_vae(seed: int) -> Any:
    """A Wan VAE with random weights at tiny widths: 4 latent channels, 4x in time and 8x in space, as Wan's."""
    from diffusers import AutoencoderKLWan

    with seeded(seed, torch.device("cpu")):
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline: from ``--model`` (hub id or folder; its VAE kept in float32), or the tiny one."""
    if args.tiny:
        from diffusers import WanPipeline

        from tokenmerge.tools.tiny import tiny_wan_pipeline

        tiny = tiny_wan_pipeline(seed=args.seed)  # no VAE: its latents would be all there is to see
        pipe = WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=tiny_video_vae(args.seed),
            scheduler=tiny.scheduler,
            transformer=tiny.transformer,
        ).to(dtype=dtype)
    else:
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(args.model, vae=vae, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prompt_inputs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the pipeline is prompted with: ``--prompt``, or random embeddings for ``--tiny``."""
    common = {"height": args.size, "width": args.width, "num_frames": args.frames}
    if not args.tiny:
        return {**common, "prompt": [args.prompt] * args.batch, "negative_prompt": [args.negative_prompt] * args.batch}
    gen = torch.Generator().manual_seed(args.seed)
    width = pipe.transformer.config.text_dim
    text, negative = (torch.randn(args.batch, 7, width, generator=gen).to(pipe.transformer.dtype) for _ in range(2))
    return {**common, "prompt_embeds": text, "negative_prompt_embeds": negative}  # (B, T, D) each


def video_sampler(pipe: Any, args: argparse.Namespace, **inputs: Any) -> Callable[[], torch.Tensor]:
    """The ``generate()`` that `compare` times: one call of ``pipe``, its frames ``(B * F, 3, H, W)`` in [0, 1]."""

    def generate() -> torch.Tensor:
        with torch.no_grad():
            frames = pipe(
                **inputs,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator(device="cpu").manual_seed(args.seed),
                output_type="pt",
            ).frames  # (B, F, 3, H, W)
        return frames.flatten(0, 1)  # (B * F, 3, H, W)

    return generate


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns what `compare` returns (frames as images), with ``psnr_db``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", steps=50, size=480)
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default 832; tiny 32)")
    parser.add_argument("--frames", type=int, default=None, help="frames, 4k + 1 (default 81; tiny 5)")
    parser.add_argument("--prompt", default="a red fox running through fresh snow, slow motion")
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt of guidance")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--st", type=int, default=1, help="frames a merging cell spans (default 1)")
    args = parse(parser, argv, tiny_size=32)
    args.width = args.width or (32 if args.tiny else 832)
    args.frames = args.frames or (5 if args.tiny else 81)
    if args.size % 16 or args.width % 16 or args.frames % 4 != 1:
        got = f"{args.size}, {args.width}, {args.frames}"
        parser.error(f"--size and --width must be multiples of 16 and --frames 4k + 1; got {got}")
    device = pick_device(args)
    dtype = pick_dtype(args, device)
    pipe = load(args, device, dtype)
    generate = video_sampler(pipe, args, **prompt_inputs(pipe, args))
    name = f"Wan ({args.model if not args.tiny else 'tiny'}), {args.frames} frames of {args.size}x{args.width} px"
    result = compare(pipe, generate, build_config(args), args, device, name=name)
    result["psnr_db"] = psnr(result["merged"].float(), result["plain"].float())
    print(f"PSNR of the merged frames against the plain ones: {result['psnr_db']:.2f} dB")
    return result


if __name__ == "__main__":
    main()
