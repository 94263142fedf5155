"""Shared code of the diffusers examples (sd.py, sdxl.py, dit.py, pixart.py).

Each example loads a pipeline (``--model``: a hub id or a local folder; ``--tiny``: a
tiny random-weight pipeline built in code, for a CPU check in seconds), generates with
and without merging and prints the time per call. This module holds what they share:
the merging options, the config they build, the timing and the report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import tokenmerge
from tokenmerge.placements import ResidualRange
from tokenmerge.policies import CA_TOME_C3
from tokenmerge.tools.common import device_argument, resolve_device
from tokenmerge.tools.demo import STABLE_SPREAD, interleaved_times, speed_of


class _Applied:
    """Apply ``config`` to ``pipe`` before a timed call and remove it after."""

    def __init__(self, pipe: Any, config: tokenmerge.MergeConfig) -> None:
        self.pipe, self.config, self.handle = pipe, config, None

    def enter(self) -> None:
        self.handle = tokenmerge.apply(self.pipe, self.config)

    def leave(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _nothing() -> None:
    return None


__all__ = [
    "from_pretrained",
    "add_arguments",
    "build_config",
    "compare",
    "parse",
    "pick_device",
    "pick_dtype",
    "sampler",
]

METHODS = ("tomesd", "catome", "todo")


def add_arguments(parser: argparse.ArgumentParser, *, model: str, steps: int, size: int) -> None:
    """Add the options every example takes (model, merging method, sampling, timing)."""
    parser.add_argument(
        "--model",
        default=None,
        help=f"the diffusers pipeline: a Hugging Face hub id (downloaded once), e.g. {model}, or a local folder",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny random-weight pipeline built in code instead (CPU, no download)"
    )
    parser.add_argument("--method", choices=METHODS, default="tomesd", help="merging preset (default tomesd)")
    parser.add_argument("--ratio", type=float, default=0.5, help="tomesd: fraction of tokens merged")
    parser.add_argument("--threshold", type=float, default=0.7, help="catome: similarity threshold")
    parser.add_argument(
        "--recompute-at",
        default=None,
        help="catome: comma-separated 0-based steps where plans are recomputed "
        "(default: the paper's C3 for 50 steps, rescaled to --steps)",
    )
    parser.add_argument("--downsample", type=int, default=2, help="todo: key/value pooling factor per side")
    parser.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8), help="UNet levels that merge")
    parser.add_argument("--merge-crossattn", action="store_true", help="also merge around cross-attention")
    parser.add_argument("--merge-mlp", action="store_true", help="also merge around the feed-forward layers")
    parser.add_argument(
        "--blocks", default=None, help="first,last: merge the residual stream over this block range (DiT/PixArt)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and of the merging")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    parser.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timing rounds: plain and merged calls in turn; medians reported (default 3; --tiny: 5)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per setting first (default 1)")
    parser.add_argument(
        "--device", type=device_argument, default=None, help="cpu, cuda, cuda:N, mps (default: cuda when available)"
    )
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"), help="model dtype")
    parser.add_argument("--out", default=None, help="folder to save the images (plain_*.png, merged_*.png)")


def from_pretrained(pipeline_class: Any, model: str, **kwargs: Any) -> Any:
    """``pipeline_class.from_pretrained(model, **kwargs)``; a model that cannot be found or read is one error line."""
    try:
        with warnings.catch_warnings():  # newer diffusers call torch_dtype dtype; older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return pipeline_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as error:  # not a folder, not a hub id, no network, or not this kind of pipeline
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise tokenmerge.TokenMergeError(
            f"--model must be a {pipeline_class.__name__} hub id or local folder; got {model!r}: {first}"
        ) from None


def pick_device(args: argparse.Namespace) -> torch.device:
    """``--device``, else cuda when available, else cpu (always cpu for ``--tiny``)."""
    if args.device:
        return resolve_device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def pick_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """``--dtype``, else float16 on cuda and float32 elsewhere."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def _recompute_steps(args: argparse.Namespace) -> tuple[int, ...]:
    if args.recompute_at:
        return tuple(int(step) for step in args.recompute_at.split(","))
    return tuple(sorted({min(args.steps - 1, round(step * args.steps / 50)) for step in CA_TOME_C3}))


def build_config(args: argparse.Namespace) -> tokenmerge.MergeConfig:
    """The `MergeConfig` the command line asks for."""
    shared = dict(max_downsample=args.max_downsample, seed=args.seed)
    if getattr(args, "st", 1) != 1:  # video models: cells spanning frames (examples/wan.py --st)
        shared["st"] = args.st
    if args.method == "tomesd":
        config = tokenmerge.ToMeSD(
            ratio=args.ratio, merge_crossattn=args.merge_crossattn, merge_mlp=args.merge_mlp, **shared
        )
    elif args.method == "catome":
        config = tokenmerge.CAToMe(
            threshold=args.threshold,
            recompute_at=_recompute_steps(args),
            merge_crossattn=args.merge_crossattn,
            merge_mlp=args.merge_mlp,
            **shared,
        )
    else:
        config = tokenmerge.ToDo(downsample=args.downsample, **shared)
    if args.blocks:
        first, last = (int(index) for index in args.blocks.split(","))
        config = config.replace(placement=ResidualRange(first, last), mode="weighted")
    return config


def sampler(pipe: Any, args: argparse.Namespace, **inputs: Any) -> Callable[[], torch.Tensor]:
    """The ``generate()`` that `compare` times: one call of ``pipe`` with ``inputs``.

    Each call runs ``--steps`` steps at ``--guidance`` from a CPU generator seeded with
    ``--seed`` (so every call starts from the same noise) and returns the images as a
    ``(B, 3, H, W)`` tensor in [0, 1].
    """

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                **inputs,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator(device="cpu").manual_seed(args.seed),
                output_type="pt",
            ).images

    return generate


def _save(images: torch.Tensor, folder: Path, prefix: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{prefix}_{index}.png")


def compare(
    pipe: Any,
    generate: Callable[[], torch.Tensor],
    config: tokenmerge.MergeConfig,
    args: argparse.Namespace,
    device: torch.device,
    name: str,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time ``generate()`` (images ``(B, 3, H, W)`` in [0, 1]) without, then with ``config`` applied to ``pipe``.

    Returns:
        ``plain_s`` and ``merged_s`` (median seconds per call), ``speedup``, the images
        (``plain``, ``merged``) and ``merging`` (the state's step/plan counters and the
        tokens of each merged layer, from the last call).
    """
    for _ in range(args.warmup):
        generate()
    plain = generate()
    with tokenmerge.apply(pipe, config) as handle:
        for _ in range(args.warmup):
            generate()
        handle.reset()
        merged = generate()
        state = handle.state
        merging = {
            "generation": state.generation,
            "step": state.step,
            "plans_computed": state.plans_computed,
            "plans_reused": state.plans_reused,
            "tokens": dict(state.merged_tokens),
        }
    # Plain and merged calls in turn, so a change in the machine's load hits both alike.
    merging_on = _Applied(pipe, config)
    plain_times, merged_times = interleaved_times(
        [(_nothing, generate, _nothing), (merging_on.enter, generate, merging_on.leave)], device, max(args.repeats, 1)
    )
    speed = speed_of(plain_times, merged_times)
    plain_s, merged_s = statistics.median(plain_times), speed.seconds
    speedup = speed.speedup if speed.speedup is not None else float("nan")
    batch = plain.shape[0]
    print_fn(f"{name}: {args.steps} steps, {args.size} px, batch {batch}, {device} {str(pipe.dtype)[6:]}")
    print_fn(f"config: {config!r}")
    layers = ", ".join(f"{n_in}->{n_out}" for n_in, n_out in sorted(set(merging["tokens"].values()), reverse=True))
    print_fn(f"merged layers: {len(merging['tokens'])} (tokens {layers or 'none'})")
    print_fn(f"plain:  {plain_s:.4f} s/call ({plain_s / batch:.4f} s/image)")
    print_fn(f"merged: {merged_s:.4f} s/call ({merged_s / batch:.4f} s/image)")
    rounds = f"median of {max(args.repeats, 1)} rounds of a plain and a merged call after {args.warmup} warm-up"
    if speed.speedup is None:
        print_fn(
            f"speedup: not stable ({rounds}: the rounds' ratios spread by {speed.spread:.0%}, more than "
            f"{STABLE_SPREAD:.0%}; the machine's other work moved the times; try more --repeats)"
        )
    else:
        print_fn(f"speedup: {speedup:.2f}x ({rounds})")
    if args.out:
        _save(plain, Path(args.out), "plain")
        _save(merged, Path(args.out), "merged")
        print_fn(f"images saved to {args.out}")
    return {
        "plain_s": plain_s,
        "merged_s": merged_s,
        "speedup": speedup,
        "plain": plain,
        "merged": merged,
        "merging": merging,
    }


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, tiny_size: int) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``).

    Neither ``--model`` nor ``--tiny`` is a one-line error. With ``--tiny``, options not
    given on the command line default to a quick check: ``--size tiny_size --steps 4
    --repeats 5 --warmup 1``.
    """
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if not args.tiny and not args.model:
        parser.error("give --model (a hub id, downloaded once, or a local folder) or --tiny (no download)")
    if args.tiny:
        quick = {"size": tiny_size, "steps": 4, "repeats": 5, "warmup": 1}
        for name, value in quick.items():
            option = f"--{name}"
            if not any(arg == option or arg.startswith(option + "=") for arg in given):
                setattr(args, name, value)
    return args
