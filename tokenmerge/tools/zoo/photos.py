"""The training data: random multi-scale crops of the photographs bundled with scikit-image.

Each photograph is one class. Its rightmost `HOLDOUT_FRACTION` of columns is held out:
training crops come from the rest, evaluation crops (`heldout_crops`) from that strip
only. Needs ``scikit-image`` (training and regenerating the held-out set only; the
shipped held-out crops load without it), or a file written by `export_photos`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import TokenMergeError

__all__ = [
    "HOLDOUT_FRACTION",
    "load_photos",
    "use_photos",
    "export_photos",
    "split_columns",
    "random_crops",
    "heldout_crops",
]

#: Fraction of each photograph's columns (on the right) kept out of training.
HOLDOUT_FRACTION = 0.2
#: Smallest crop side in source pixels (crops are resized to the model resolution).
MIN_CROP = 64


_EXPORTED: dict[str, np.ndarray] = {}


def use_photos(path: str | Path) -> None:
    """Read the photographs from an `export_photos` file from now on (no scikit-image needed)."""
    path = Path(path)
    if not path.is_file():
        raise TokenMergeError(f"photos must name an .npz written by --export-photos; got {str(path)!r}")
    with np.load(path) as data:
        _EXPORTED.update({name: data[name] for name in data.files})


def export_photos(names: Sequence[str], path: str | Path) -> None:
    """Write the photographs ``names`` (uint8 ``(H, W, 3)``) to a compressed .npz."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{name: _load_one(name) for name in names})


def _load_one(name: str) -> np.ndarray:
    if name in _EXPORTED:
        return _EXPORTED[name]
    try:
        import skimage.data as data
    except ImportError:
        raise TokenMergeError(
            "the reference photographs need scikit-image (pip install scikit-image), or a file written by "
            "--export-photos passed as --photos"
        ) from None
    if name == "motorcycle":
        image = data.stereo_motorcycle()[0]
    else:
        loader = getattr(data, name, None)
        if loader is None:
            raise TokenMergeError(f"class name {name!r} is not a photograph in skimage.data")
        image = loader()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)  # (H, W, 3)


def load_photos(names: Sequence[str], device: torch.device | str = "cpu") -> list[Tensor]:
    """The photographs as ``(3, H, W)`` float tensors in [-1, 1], in ``names`` order."""
    photos = []
    for name in names:
        array = _load_one(name)
        photo = torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)
        photos.append(photo.to(device))
    return photos


def split_columns(width: int) -> int:
    """The first held-out column: columns ``[0, split)`` train, ``[split, width)`` evaluate."""
    return int(round(width * (1.0 - HOLDOUT_FRACTION)))


def _crop(photo: Tensor, top: int, left: int, side: int, size: int) -> Tensor:
    patch = photo[:, top : top + side, left : left + side][None]  # (1, 3, side, side)
    if side == size:
        return patch[0]
    return F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def random_crops(
    photos: Sequence[Tensor],
    count: int,
    size: int,
    generator: torch.Generator,
    *,
    heldout: bool = False,
) -> tuple[Tensor, Tensor]:
    """``count`` random square crops, resized to ``size``, with their class labels.

    The crop side is log-uniform between `MIN_CROP` and the largest square that fits
    the (training or held-out) region, so crops range from textures to whole scenes.
    Flips are applied by the training loop, not here.

    Args:
        photos: ``(3, H, W)`` tensors from `load_photos`.
        count: number of crops; classes are drawn uniformly.
        size: output side in pixels.
        generator: a CPU `torch.Generator` (all draws are made on the CPU, so the crops
            are the same on every device).
        heldout: crop from the held-out strips instead of the training regions.

    Returns:
        ``(count, 3, size, size)`` crops in [-1, 1] (as uint8-rounded values, on the
        photos' device) and ``(count,)`` long labels.
    """
    labels = torch.randint(len(photos), (count,), generator=generator)
    crops = []
    for label in labels.tolist():
        photo = photos[label]
        height, width = photo.shape[-2:]
        split = split_columns(width)
        left0, right = (split, width) if heldout else (0, split)
        largest = min(height, right - left0)
        draw = torch.rand(3, generator=generator).tolist()
        low = min(MIN_CROP, largest)
        side = int(round(math.exp(math.log(low) + draw[0] * (math.log(largest) - math.log(low)))))
        top = int(draw[1] * (height - side + 1))
        left = left0 + int(draw[2] * (right - left0 - side + 1))
        crops.append(_crop(photo, top, left, side, size))
    batch = torch.stack(crops)  # (count, 3, size, size)
    batch = ((batch + 1.0) * 127.5).round().clamp(0, 255).div(127.5).sub(1.0)  # the values a uint8 image holds
    return batch, labels.to(batch.device)


def heldout_crops(count_per_class: int = 4, size: int = 64, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Regenerate the held-out evaluation crops from scikit-image (deterministic).

    Returns:
        ``(N, size, size, 3)`` uint8 crops and ``(N,)`` int64 labels, ``count_per_class``
        crops of every class in `tokenmerge.tools.zoo.specs.CLASS_NAMES` order.
    """
    from .specs import CLASS_NAMES

    photos = load_photos(CLASS_NAMES)
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label, photo in enumerate(photos):
        for _ in range(count_per_class):
            crop, _ = random_crops([photo], 1, size, generator, heldout=True)
            images.append(crop[0])
            labels.append(label)
    stacked = torch.stack(images).add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # (N, 3, size, size)
    return stacked.permute(0, 2, 3, 1).numpy(), np.asarray(labels, dtype=np.int64)
