"""Small trained reference models that ship with tokenmerge.

Three models trained by tokenmerge itself on crops of the photographs bundled with
scikit-image, one class per photograph (see `tokenmerge.tools.zoo.specs.CLASS_NAMES`):

* ``"dit-photos"``: a class-conditional pixel-space `DiTTransformer2DModel` (64 x 64 RGB)
  with patch 2 (1,024 tokens);
* ``"unet-photos"``: a class-conditional pixel-space `UNet2DConditionModel` in the SD
  layout (cross-attention blocks at the top resolution: 4,096 tokens), conditioned on
  learned class tokens;
* ``"vit-photos"``: a timm `VisionTransformer` classifier (112 x 112 RGB in [0, 1], patch
  8: 196 patch tokens, 12 blocks) that tells which photograph a crop comes from
  (`tokenmerge.tools.zoo.classifier`).

They load offline in one call and can be merged like any diffusers pipeline or timm ViT::

    from tokenmerge.tools import zoo
    pipe = zoo.load("unet-photos")
    images = pipe(["grass", "coffee"], num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images
    tokenmerge.apply(pipe, tokenmerge.ToMeSD(ratio=0.5, seed=0))

    from tokenmerge.tools.zoo.classifier import eval_crops

    vit = zoo.load("vit-photos")
    images, labels = eval_crops(per_class=4)  # held-out crops, (64, 3, 112, 112) in [0, 1]
    tokenmerge.apply(vit, tokenmerge.ToMe(r=8))
    accuracy = (vit(images).argmax(-1) == labels).float().mean()

How the shipped weights were trained is in ``tokenmerge/tools/zoo/README.md`` and in each
model's JSON record (`info`). Importing this module does not import diffusers or timm; `load` does.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import TokenMergeError, check
from ..common import resolve_device

__all__ = ["WEIGHTS_DIR", "names", "info", "load", "heldout"]

#: Where the shipped weights, their JSON records and the held-out crops live.
WEIGHTS_DIR = Path(__file__).parent / "weights"

_MODELS = ("dit-photos", "unet-photos", "vit-photos")


def names() -> list[str]:
    """Names of the reference models `load` accepts."""
    return list(_MODELS)


def _directory(weights_dir: str | Path | None) -> Path:
    return WEIGHTS_DIR if weights_dir is None else Path(weights_dir)


def _check_name(name: str) -> None:
    check(name in _MODELS, f"name must be one of {', '.join(_MODELS)}; got {name!r}")


def info(name: str, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """The JSON record of a model: its spec and how it was trained (command, steps, loss, hardware).

    Args:
        name: a name from `names`.
        weights_dir: directory holding ``<name>.json``; the shipped weights by default.
    """
    _check_name(name)
    path = _directory(weights_dir) / f"{name}.json"
    if not path.is_file():
        raise TokenMergeError(
            f"weights_dir has no {path.name}; train it with examples/train_reference.py (looked in {path.parent})"
        )
    return json.loads(path.read_text())


def load(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    weights_dir: str | Path | None = None,
) -> Any:
    """Load a reference model: a ready diffusers pipeline, or the ViT classifier (offline; nothing is downloaded).

    Args:
        name: ``"dit-photos"``, ``"unet-photos"`` or ``"vit-photos"``.
        device: where the model runs (`tokenmerge.tools.common.resolve_device`: ``"auto"``, ``"cpu"``, ...).
        dtype: its floating-point type (the weights are stored in fp16).
        weights_dir: a directory written by the training script; the shipped weights by default.

    Returns:
        A `PixelDiTPipeline` (``.transformer``) or `PixelUNetPipeline` (``.unet``,
        ``.class_tokens``) in eval mode with gradients off, a DDIM scheduler and
        ``class_names``. Call it as ``pipe(class_labels, num_inference_steps=25,
        guidance_scale=3.0, generator=...)``. For ``"vit-photos"``: a timm
        `VisionTransformer` in eval mode with gradients off, taking ``(B, 3, 112, 112)`` RGB
        in [0, 1] (its ``pretrained_cfg`` says so: mean 0, std 1) and returning ``(B, 16)``
        class logits.

    Raises:
        TokenMergeError: for an unknown name, a device that is not present, a non-floating dtype or
            missing weights.
    """
    check(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        f"dtype must be a floating torch.dtype; got {dtype!r}",
    )
    resolved = resolve_device(device)
    record = info(name, weights_dir)
    from safetensors.torch import load_file

    if record["spec"]["kind"] == "vit":
        return _load_classifier(record, _directory(weights_dir) / f"{name}.safetensors", resolved, dtype)

    from .specs import ZooSpec, build_pipeline

    spec = ZooSpec.from_json(record["spec"])
    path = _directory(weights_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise TokenMergeError(f"weights_dir has no {path.name} (looked in {path.parent})")
    state = load_file(str(path))
    pipe = build_pipeline(spec)
    components = (
        {"transformer": getattr(pipe, "transformer", None)}
        if spec.kind == "dit"
        else {
            "unet": pipe.unet,
            "class_tokens": pipe.class_tokens,
        }
    )
    for component, module in components.items():
        prefix = f"{component}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
        # torch's own Module.to: diffusers' override warns about fp32 modules on every dtype cast
        torch.nn.Module.to(module, device=resolved, dtype=dtype).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_classifier(record: dict[str, Any], path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from safetensors.torch import load_file

    from .classifier import ClassifierSpec, build_classifier

    if not path.is_file():
        raise TokenMergeError(f"weights_dir has no {path.name} (looked in {path.parent})")
    model = build_classifier(ClassifierSpec.from_json(record["spec"]))
    model.load_state_dict(load_file(str(path)), strict=True)  # fp16 on disk, upcast into the float32 model
    # timm's record of the input a model expects: RGB in [0, 1] at the spec's size, no normalisation
    size = int(record["spec"]["vit"]["img_size"])
    model.pretrained_cfg = {"input_size": (3, size, size), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@lru_cache(maxsize=4)
def _heldout(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["images"], data["labels"]


def heldout(weights_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out evaluation crops: never seen in training.

    Returns:
        ``(N, 3, 64, 64)`` float images in [0, 1] and ``(N,)`` long class labels (4 crops
        from the held-out strip of every photograph).
    """
    path = _directory(weights_dir) / "heldout_crops.npz"
    if not path.is_file():
        raise TokenMergeError(f"weights_dir has no heldout_crops.npz (looked in {path.parent})")
    images, labels = _heldout(str(path))
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)  # (N, 3, 64, 64)
    return tensor, torch.from_numpy(labels).long()
