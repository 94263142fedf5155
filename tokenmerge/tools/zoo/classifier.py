"""The trained reference ViT: a timm `VisionTransformer` that tells which photograph a crop comes from.

Its classes are the 16 photographs of `tokenmerge.tools.zoo.specs.CLASS_NAMES`, the same
ones the diffusion reference models are trained on. Inputs are ``(B, 3, S, S)`` RGB
images in [0, 1] (no further normalisation), ``S`` = `ClassifierSpec.image_size`.

Training crops come from the left 80% of every photograph's columns
(`tokenmerge.tools.zoo.photos.split_columns`); the evaluation crops come from the
held-out right 20% only. The held-out strips ship with the weights
(``weights/heldout_strips.npz``), so `eval_crops` draws any number of seeded held-out
crops without scikit-image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import TokenMergeError, check, check_int
from .photos import MIN_CROP, split_columns
from .specs import CLASS_NAMES

__all__ = [
    "ClassifierSpec",
    "CLASSIFIER_SPECS",
    "STRIPS_FILE",
    "EVAL_SEED",
    "build_classifier",
    "heldout_strips",
    "write_heldout_strips",
    "sample_crops",
    "eval_crops",
    "predict",
    "accuracy",
]

#: File (in a weights directory) holding the held-out right strip of every photograph.
STRIPS_FILE = "heldout_strips.npz"
#: Seed of the evaluation crops whose accuracy the weights' JSON records.
EVAL_SEED = 0


@dataclass(frozen=True)
class ClassifierSpec:
    """A reference classifier: a timm `VisionTransformer` and the size of its input.

    Attributes:
        name: the name `tokenmerge.tools.zoo.load` takes.
        kind: ``"vit"``.
        vit: keyword arguments of `timm.models.vision_transformer.VisionTransformer`.
        class_names: class names, in label order (one per photograph).
    """

    name: str
    kind: str
    vit: dict[str, Any]
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def image_size(self) -> int:
        """Side of the square input images, in pixels."""
        return int(self.vit["img_size"])

    @property
    def grid(self) -> tuple[int, int]:
        """The ``(h, w)`` patch grid of an input image."""
        side = self.image_size // int(self.vit["patch_size"])
        return side, side

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-ready data."""
        return {"name": self.name, "kind": self.kind, "vit": dict(self.vit), "class_names": list(self.class_names)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassifierSpec:
        """Inverse of `to_json`."""
        return cls(name=data["name"], kind=data["kind"], vit=dict(data["vit"]), class_names=tuple(data["class_names"]))


#: The reference classifiers by name: what `tokenmerge.tools.zoo.train` trains.
CLASSIFIER_SPECS: dict[str, ClassifierSpec] = {
    # 112x112 RGB, patch 8: 196 patch tokens + the class token, width 64 (2 heads of 32), 12 blocks
    # (ToMe merges r tokens per block). Small enough to train on a 2-core CPU in under 30 minutes.
    "vit-photos": ClassifierSpec(
        name="vit-photos",
        kind="vit",
        vit={
            "img_size": 112,
            "patch_size": 8,
            "num_classes": len(CLASS_NAMES),
            "embed_dim": 64,
            "depth": 12,
            "num_heads": 2,
            "mlp_ratio": 4.0,
        },
    ),
}


def build_classifier(spec: ClassifierSpec) -> nn.Module:
    """A timm `VisionTransformer` with freshly initialised weights for ``spec`` (training mode, float32)."""
    from timm.models.vision_transformer import VisionTransformer

    check(spec.kind == "vit", f"kind must be 'vit'; got {spec.kind!r}")
    return VisionTransformer(**spec.vit)


# ---------------------------------------------------------------------- data
def write_heldout_strips(photos: Sequence[Tensor], path: str | Path) -> Path:
    """Write the held-out right strip of every photograph (uint8, compressed) to ``path``.

    Args:
        photos: ``(3, H, W)`` tensors in [-1, 1] from `tokenmerge.tools.zoo.photos.load_photos`,
            in `CLASS_NAMES` order.
    """
    strips = {}
    for name, photo in zip(CLASS_NAMES, photos):
        split = split_columns(photo.shape[-1])
        strip = photo[:, :, split:].add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # (3, H, W - split)
        strips[name] = strip.permute(1, 2, 0).cpu().numpy()  # (H, w, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **strips)
    return path


@lru_cache(maxsize=4)
def _strips(path: str) -> tuple[np.ndarray, ...]:
    with np.load(path) as data:
        return tuple(data[name] for name in CLASS_NAMES)


def heldout_strips(weights_dir: str | Path | None = None) -> list[Tensor]:
    """The held-out strips of the photographs as ``(3, H, w)`` float tensors in [0, 1], in label order."""
    from . import WEIGHTS_DIR

    path = (WEIGHTS_DIR if weights_dir is None else Path(weights_dir)) / STRIPS_FILE
    if not path.is_file():
        raise TokenMergeError(f"weights_dir has no {STRIPS_FILE} (looked in {path.parent})")
    return [torch.from_numpy(np.ascontiguousarray(s)).permute(2, 0, 1).float().div(255.0) for s in _strips(str(path))]


def _resize(patch: Tensor, size: int) -> Tensor:
    if patch.shape[-1] == size and patch.shape[-2] == size:
        return patch
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def sample_crops(
    regions: Sequence[Tensor],
    labels: Tensor,
    size: int,
    generator: torch.Generator,
    *,
    augment: bool = False,
) -> Tensor:
    """One random square crop per label from that label's region, resized to ``size``.

    The crop side is log-uniform between `tokenmerge.tools.zoo.photos.MIN_CROP` and the
    largest square that fits the region, so crops range from textures to whole scenes.

    Args:
        regions: ``(3, H, W)`` float images in [0, 1], one per class (the training part of
            every photograph, or its held-out strip).
        labels: ``(B,)`` class of every crop.
        size: output side in pixels.
        generator: a CPU `torch.Generator`; the crops depend on it alone.
        augment: also flip horizontally half of the time and scale brightness by U(0.9, 1.1).

    Returns:
        ``(B, 3, size, size)`` crops in [0, 1], rounded to the values a uint8 image holds.
    """
    crops = []
    for label in labels.tolist():
        region = regions[label]
        height, width = region.shape[-2:]
        largest = min(height, width)
        low = min(MIN_CROP, largest)
        draw = torch.rand(5, generator=generator).tolist()
        side = int(round(math.exp(math.log(low) + draw[0] * (math.log(largest) - math.log(low)))))
        top = int(draw[1] * (height - side + 1))
        left = int(draw[2] * (width - side + 1))
        crop = _resize(region[:, top : top + side, left : left + side], size)  # (3, size, size)
        if augment:
            if draw[3] < 0.5:
                crop = crop.flip(-1)
            crop = crop * (0.9 + 0.2 * draw[4])
        crops.append(crop)
    batch = torch.stack(crops)  # (B, 3, size, size)
    return batch.mul(255.0).round().clamp(0, 255).div(255.0)


def eval_crops(
    per_class: int = 32,
    size: int = 112,
    *,
    seed: int = EVAL_SEED,
    weights_dir: str | Path | None = None,
) -> tuple[Tensor, Tensor]:
    """Seeded held-out evaluation crops: ``per_class`` crops of every photograph's held-out strip.

    The crops for a smaller ``per_class`` are a prefix, class by class, of those for a
    larger one (each class draws from its own generator), so a fast subset scores the
    same crops as the full set.

    Args:
        per_class: crops per class.
        size: side of the crops (the classifier's `ClassifierSpec.image_size`).
        seed: the evaluation seed (`EVAL_SEED` is what the weights' JSON records).
        weights_dir: where ``heldout_strips.npz`` lives; the shipped weights by default.

    Returns:
        ``(16 * per_class, 3, size, size)`` images in [0, 1] and ``(16 * per_class,)`` labels,
        class by class.
    """
    check_int("per_class", per_class, 1)
    check_int("size", size, 8)
    strips = heldout_strips(weights_dir)
    images, labels = [], []
    for label, strip in enumerate(strips):
        generator = torch.Generator().manual_seed(seed * 1000 + label)
        wanted = torch.full((per_class,), label, dtype=torch.long)
        images.append(sample_crops([strip] * len(strips), wanted, size, generator))
        labels.append(wanted)
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """Top-1 predictions ``(N,)`` of ``model`` on ``images`` ``(N, 3, S, S)``, in batches."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = [
        model(images[i : i + batch_size].to(device, dtype)).argmax(-1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(N, 3, S, S)`` with ``labels`` ``(N,)``."""
    return float((predict(model, images, batch_size) == labels).float().mean())
