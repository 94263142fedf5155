"""Pictures of merged tokens: every group of patches filled with its mean colour and outlined.

Pure numpy; PNGs are written with `zlib`, so neither matplotlib nor PIL is needed to draw
or save (PIL is needed only to *read* `load_sample_image`). Typical use with a timm ViT::

    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=16, trace_source=True))
    model(batch)
    record = tokenmerge.adapters.vit.merge_record(model)
    picture = tokenmerge.tools.vis.visualize(image, record)   # (H, W, 3) uint8
    tokenmerge.tools.vis.save_png("merged.png", picture)

or in one call, with the trained reference ViT of `tokenmerge.tools.zoo` (``vit-photos``),
whose groups follow the image's content (a random-weight ViT groups tokens by noise)::

    picture = tokenmerge.tools.vis.merged_groups(reference_vit(), load_sample_image(), r=8)
"""

from __future__ import annotations

import struct
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import Tensor

from ..errors import TokenMergeError, check

__all__ = [
    "draw_groups",
    "visualize",
    "save_png",
    "load_sample_image",
    "SAMPLE_IMAGE",
    "REFERENCE_VIT",
    "reference_vit",
    "model_input",
    "merged_groups",
    "merged_groups_with_record",
]

#: The `tokenmerge.tools.zoo` model the pictures use by default: a ViT trained on photographs.
REFERENCE_VIT = "vit-photos"

#: Name of the demo image shipped in ``tokenmerge/tools/assets`` (224x224 RGB, from scikit-image's ``astronaut``).
SAMPLE_IMAGE = "sample.png"


class _Record(Protocol):
    """What `visualize` needs from a merge record (`tokenmerge.adapters.vit.ViTMergeRecord`)."""

    grid: tuple[int, int] | None

    def patch_groups(self, batch: int = 1) -> Tensor: ...


def _as_rgb(image: Any) -> np.ndarray:
    """An image as ``(H, W, 3)`` float64 in [0, 255].

    Accepts a PIL image, a numpy array or a torch tensor, ``(H, W, 3)`` or ``(3, H, W)``,
    as uint8 or as floats in [0, 1].
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    integer = np.issubdtype(array.dtype, np.integer)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    check(array.ndim == 3 and array.shape[-1] in (3, 4), f"image must be (H, W, 3) or (3, H, W); got {array.shape}")
    array = array[..., :3].astype(np.float64)
    if not integer:
        array = array * 255.0
    return np.clip(array, 0.0, 255.0)


def draw_groups(
    image: Any,
    groups: Any,
    grid: tuple[int, int],
    *,
    outline: tuple[int, int, int] | None = (255, 255, 255),
) -> np.ndarray:
    """Fill every group of patches with its mean colour and outline it.

    Args:
        image: the model's input picture (not normalised), ``(H, W, 3)`` or ``(3, H, W)``,
            uint8 or floats in [0, 1]; a PIL image works too.
        groups: ``(h * w,)`` or ``(h, w)`` group id of every patch (row-major), e.g.
            ``record.patch_groups()[0]``.
        grid: ``(h, w)`` patch grid; pixel row ``y`` belongs to patch row ``y * h // H``.
        outline: RGB colour of the one-pixel group borders, or None for no outline.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    rgb = _as_rgb(image)  # (H, W, 3)
    height, width = rgb.shape[:2]
    h, w = grid
    labels = np.asarray(groups.detach().cpu() if isinstance(groups, Tensor) else groups).reshape(-1)
    check(labels.size == h * w, f"groups must have one entry per patch of the {h}x{w} grid; got {labels.size}")
    check(height >= h and width >= w, f"image ({height}x{width}) must have at least one pixel per patch ({h}x{w})")
    _, labels = np.unique(labels, return_inverse=True)  # ids 0 .. G-1
    rows = np.arange(height) * h // height  # (H,) patch row of each pixel row
    cols = np.arange(width) * w // width  # (W,)
    pixels = labels.reshape(h, w)[rows[:, None], cols[None, :]]  # (H, W) group of every pixel
    flat = pixels.reshape(-1)
    count = np.bincount(flat)  # (G,)
    mean = np.stack([np.bincount(flat, weights=rgb[..., c].reshape(-1)) for c in range(3)], axis=-1)  # (G, 3)
    out = (mean / count[:, None])[pixels]  # (H, W, 3)
    if outline is not None:
        edge = np.zeros((height, width), dtype=bool)
        edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
        edge[:-1, :] |= pixels[:-1, :] != pixels[1:, :]
        out[edge] = outline
    return np.rint(out).astype(np.uint8)


def visualize(
    image: Any, record: _Record, *, index: int = 0, outline: tuple[int, int, int] | None = (255, 255, 255)
) -> np.ndarray:
    """Draw the merged groups of one image of a forward from its merge record.

    Args:
        image: that image, as the model saw it (resized to the model's input size, not
            normalised): a PIL image, a numpy array or a torch tensor, ``(H, W, 3)`` or
            ``(3, H, W)`` (an alpha channel is dropped, a grey ``(H, W)`` image is
            repeated), as uint8 in [0, 255] or floats in [0, 1].
        record: `tokenmerge.adapters.vit.merge_record` of the forward, taken while the
            config is applied (inside its ``with`` block; apply with ``trace_source=True``).
        index: which image of the batch.
        outline: border colour, or None.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    check(
        record is not None and hasattr(record, "patch_groups"),
        "record must be the merge record of a forward: call tokenmerge.adapters.vit.merge_record(model) while "
        f"the config is applied (inside its with block, ToMe(..., trace_source=True)); got {record!r}",
    )
    if record.grid is None:
        raise TokenMergeError("record.grid is None: the patch tokens of that forward did not form a grid")
    groups = record.patch_groups(index + 1)[index]  # (h * w,)
    return draw_groups(image, groups, record.grid, outline=outline)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def save_png(path: str | Path, image: Any) -> Path:
    """Write an image as an 8-bit RGB PNG (pure Python, zlib only).

    Args:
        path: where to write; parent folders are created.
        image: ``(H, W, 3)`` or ``(3, H, W)``, uint8 or floats in [0, 1].

    Returns:
        The path written.
    """
    rgb = np.rint(_as_rgb(image)).astype(np.uint8)  # (H, W, 3)
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour
    data = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def load_sample_image(size: int | None = None) -> np.ndarray:
    """The demo photo shipped with tokenmerge, ``(224, 224, 3)`` uint8 (needs PIL).

    Args:
        size: resize to ``size x size`` (bicubic) when given.
    """
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow comes with tokenmerge[timm]
        raise ImportError("load_sample_image needs Pillow: pip install 'tokenmerge[timm]'") from error
    with (resources.files("tokenmerge.tools") / "assets" / SAMPLE_IMAGE).open("rb") as handle:
        picture = Image.open(handle).convert("RGB")
        if size is not None:
            check(isinstance(size, int) and size >= 1, f"size must be None or an int >= 1; got {size!r}")
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(picture).copy()


def reference_vit(device: Any = "cpu") -> Any:
    """The trained reference ViT (`REFERENCE_VIT`, loaded offline from `tokenmerge.tools.zoo`), in eval mode."""
    from . import zoo

    return zoo.load(REFERENCE_VIT, device=device)


def model_input(pixels: Any, model: Any, device: Any = "cpu") -> Tensor:
    """``pixels`` as a ViT's input: ``(1, 3, h, w)`` at its ``patch_embed.img_size``, normalised.

    The normalisation is the model's timm ``pretrained_cfg`` ``mean``/``std`` (the reference
    ViT reads [0, 1]: mean 0, std 1), and timm's ViT default of mean 0.5, std 0.5 when it
    has none.

    Args:
        pixels: ``(H, W, 3)`` or ``(3, H, W)``, uint8 or floats in [0, 1], any size.
        model: a timm `VisionTransformer`.
        device: where the input goes.
    """
    import torch
    import torch.nn.functional as F

    rgb = _as_rgb(pixels)  # (H, W, 3) in [0, 255]
    batch = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
    size = tuple(getattr(getattr(model, "patch_embed", None), "img_size", None) or batch.shape[-2:])
    if tuple(batch.shape[-2:]) != size:
        batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(config.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - mean) / std).to(device)  # (1, 3, h, w)


def merged_groups(model: Any, pixels: Any, r: int, *, device: Any = "cpu") -> np.ndarray:
    """The groups ToMe with ``r`` tokens per block merges ``pixels`` into, drawn over ``pixels``.

    The model sees ``pixels`` resized to its input (`model_input`); the groups are drawn
    at the size of ``pixels``, so a picture can be larger than the model's input.

    Args:
        model: a timm `VisionTransformer` on ``device`` (`reference_vit` for the trained one).
        pixels: ``(H, W, 3)`` or ``(3, H, W)``, uint8 or floats in [0, 1].
        r: tokens merged per block.
        device: where the model runs.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    return merged_groups_with_record(model, pixels, r, device=device)[0]


def merged_groups_with_record(model: Any, pixels: Any, r: int, *, device: Any = "cpu") -> tuple[np.ndarray, Any]:
    """`merged_groups`'s picture and the `~tokenmerge.adapters.vit.ViTMergeRecord` it was drawn from.

    The record tells how many tokens entered the first block and left the last
    (``num_input``, ``num_tokens``, ``num_prefix``), e.g. for a label under the picture.
    """
    import torch

    from ..adapters.vit import merge_record
    from ..api import apply
    from ..presets import ToMe

    batch = model_input(pixels, model, device)  # (1, 3, h, w)
    with apply(model, ToMe(r=r, trace_source=True)), torch.inference_mode():
        model(batch)
        record = merge_record(model)
    if record is None:  # pragma: no cover - the ViT adapter always records a forward
        raise TokenMergeError("the ViT adapter kept no merge record")
    return visualize(pixels, record), record
