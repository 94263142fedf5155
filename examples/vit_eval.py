"""ImageNet-style evaluation of a timm ViT with and without ToMe: top-1 and images/s.

The image folder holds one sub-folder per class, named so that their sorted order is the
model's class order (ImageNet's ``val/n01440764/...`` layout works as is). Only the model
forwards are timed (after warm-up, synchronised on CUDA); data loading is not.

Examples::

    # a pretrained timm model (downloads its weights once)
    python examples/vit_eval.py --arch vit_base_patch16_224.augreg2_in21k_ft_in1k --pretrained \\
        --data /data/imagenet/val --r 13 --batch-size 256 --device cuda --dtype float16

    # a local checkpoint of a known architecture
    python examples/vit_eval.py --arch deit_small_patch16_224 --checkpoint deit_small.pth --data val/ --r 13

Prints a table and, with ``--json``, writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader

import tokenmerge
from tokenmerge.errors import TokenMergeError
from tokenmerge.tools.cli import OneLineParser, run_script
from tokenmerge.tools.common import device_argument, resolve_device, synchronize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing for ``model``, at the input size the model was built for."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"input_size": (3, *img_size)} if img_size is not None else {}
    return resolve_data_config(overrides, model=model)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="timm architecture name, e.g. vit_base_patch16_224")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    parser.add_argument("--checkpoint", default="", help="local checkpoint (state dict) to load instead")
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of extra timm.create_model arguments")
    parser.add_argument("--data", required=True, type=Path, help="image folder: one sub-folder per class")
    parser.add_argument("--r", default="13", help="tokens merged per block: an int, a JSON list, or 'r,inflection'")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0: all)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up batches before each timed pass")
    parser.add_argument("--device", type=device_argument, default="auto", help="auto (GPU if present), cpu, cuda, ...")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype on CUDA")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    args.device = str(resolve_device(args.device))  # "auto" becomes the device it picks
    return args


def parse_r(text: str) -> int | list[int] | tuple[int, float]:
    """``"13"`` -> 13, ``"[8, 8, 4]"`` -> a list, ``"16,-0.5"`` -> ``(16, -0.5)``."""
    text = text.strip()
    if text.startswith("["):
        return [int(v) for v in json.loads(text)]
    if "," in text:
        r, inflection = text.split(",")
        return int(r), float(inflection)
    return int(text)


def build_model(args: argparse.Namespace) -> nn.Module:
    """The timm model, with pretrained or local weights, in eval mode."""
    kwargs: dict[str, Any] = json.loads(args.model_kwargs)
    if args.checkpoint:
        kwargs["checkpoint_path"] = args.checkpoint
    try:
        model = timm.create_model(args.arch, pretrained=args.pretrained, **kwargs)
    except RuntimeError as error:  # timm's unknown architecture, or a checkpoint of another one
        raise TokenMergeError(f"--arch/--checkpoint must be a timm architecture and its weights: {error}") from None
    return model.eval().to(args.device)


def build_loader(model: nn.Module, args: argparse.Namespace) -> DataLoader:
    """Batches of the folder, preprocessed as the model's pretrained config says."""
    config = data_config(model)
    dataset = ImageDataset(str(args.data), transform=create_transform(**config))
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.device != "cpu")


def evaluate(model: nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict[str, float]:
    """Top-1 accuracy (%) and model throughput (images/s) over the loader."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=DTYPES[args.dtype]) if cuda and args.dtype != "float32" else nullcontext()

    correct = seen = 0
    seconds = 0.0
    with torch.inference_mode(), autocast:
        warm = 0
        for images, _ in loader:  # warm-up: kernels, allocator, (compiled) graphs
            if warm >= args.warmup:
                break
            model(images.to(device))
            warm += 1
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            synchronize(device)
            start = time.perf_counter()
            logits = model(images)
            synchronize(device)
            seconds += time.perf_counter() - start
            correct += int((logits.argmax(-1) == labels).sum())
            seen += labels.numel()
    return {"top1": 100.0 * correct / max(seen, 1), "images_per_s": seen / max(seconds, 1e-9), "images": seen}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate without and with merging; print and return the figures."""
    args = parse_args(argv)
    if not args.data.is_dir():
        raise TokenMergeError(
            f"--data must be an image folder, one sub-folder per class; got '{args.data}' (no such folder)"
        )
    model = build_model(args)
    loader = build_loader(model, args)
    r = parse_r(args.r)
    plain = evaluate(model, loader, args)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=r)):
        merged = evaluate(model, loader, args)
    device = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "cpu"
    results = {
        "model": args.arch,
        "r": r,
        "device": device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "plain": plain,
        "tome": merged,
        "speedup": merged["images_per_s"] / plain["images_per_s"],
    }
    print(f"{args.arch} on {device} ({args.dtype}, batch {args.batch_size}, {plain['images']} images)")
    print(f"{'':10} {'top-1 %':>8} {'images/s':>10}")
    print(f"{'plain':10} {plain['top1']:8.2f} {plain['images_per_s']:10.1f}")
    print(f"{'ToMe r=' + str(args.r):10} {merged['top1']:8.2f} {merged['images_per_s']:10.1f}")
    print(f"speedup {results['speedup']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_script(main, "vit_eval.py", load_errors=(OSError,))
