"""Draw which patches ToMe merged in a timm ViT: each group filled with its mean colour and outlined.

Examples::

    # the photo shipped with tokenmerge, a pretrained DeiT (downloads its weights once)
    python examples/vit_visualize.py --arch deit_small_patch16_224 --pretrained --r 16 --out merged.png

    # your own image
    python examples/vit_visualize.py --arch vit_base_patch16_224 --pretrained --image cat.jpg --r 8

The output shows the input (resized to the model's input size) beside the merged groups.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import nn

import tokenmerge
from tokenmerge.adapters.vit import merge_record
from tokenmerge.errors import TokenMergeError
from tokenmerge.tools import vis
from tokenmerge.tools.cli import OneLineParser, run_script


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
    parser.add_argument("--image", type=Path, default=None, help="image file (default: tokenmerge's sample photo)")
    parser.add_argument("--r", type=int, default=16, help="tokens merged per block")
    parser.add_argument("--out", type=Path, default=Path("merged.png"), help="PNG to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run one image through the merged model and save the picture; returns its path."""
    args = parse_args(argv)
    kwargs: dict[str, Any] = json.loads(args.model_kwargs)
    if args.checkpoint:
        kwargs["checkpoint_path"] = args.checkpoint
    try:
        model = timm.create_model(args.arch, pretrained=args.pretrained, **kwargs).eval()
    except RuntimeError as error:  # timm's unknown architecture, or a checkpoint of another one
        raise TokenMergeError(f"--arch/--checkpoint must be a timm architecture and its weights: {error}") from None
    config = data_config(model)
    _, height, width = config["input_size"]
    picture = Image.open(args.image).convert("RGB") if args.image else Image.fromarray(vis.load_sample_image())
    pixels = np.array(picture.resize((width, height), Image.Resampling.BICUBIC))  # (H, W, 3) uint8
    mean = torch.tensor(config["mean"])[:, None, None]
    std = torch.tensor(config["std"])[:, None, None]
    batch = ((torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - mean) / std)[None]  # (1, 3, H, W)

    with tokenmerge.apply(model, tokenmerge.ToMe(r=args.r, trace_source=True)), torch.inference_mode():
        logits = model(batch)
        record = merge_record(model)
    assert record is not None
    groups = vis.visualize(pixels, record)  # (H, W, 3)
    gap = np.full((height, 8, 3), 255, dtype=np.uint8)
    out = vis.save_png(args.out, np.concatenate([pixels, gap, groups], axis=1))
    print(
        f"{args.arch}: {record.num_input - record.num_prefix} patches merged into "
        f"{record.num_tokens - record.num_prefix} tokens (r={args.r}); top class {int(logits.argmax())}; wrote {out}"
    )
    return out


if __name__ == "__main__":
    run_script(main, "vit_visualize.py", load_errors=(OSError,))
