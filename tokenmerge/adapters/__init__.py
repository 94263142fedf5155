"""Adapters apply a merging policy to a model family, found by `tokenmerge.apply`.

Adapters are imported lazily: the diffusers adapter only once a diffusers object is
applied to, the timm adapter only for a timm model, the ``transformers`` adapter only
for a ``transformers`` model. `import tokenmerge` imports none of these libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import TokenMergeError
from .base import Adapter

__all__ = ["Adapter", "register_adapter", "find_adapter", "supported_targets"]

# (top-level package the target's class must come from, "module:Class" of the adapter)
_LAZY: list[tuple[str, str]] = [
    ("diffusers", "tokenmerge.adapters.diffusion:DiffusersAdapter"),
    ("timm", "tokenmerge.adapters.vit:TimmViTAdapter"),
    ("transformers", "tokenmerge.adapters.hf_vision:HFVisionAdapter"),
]
_LOADED: dict[str, Adapter] = {}
_USER: list[Adapter] = []
_GENERIC = "tokenmerge.adapters.blocks:BlockStackAdapter"


def register_adapter(adapter: Adapter) -> Adapter:
    """Register a user adapter; it is tried before the built-in ones."""
    if not isinstance(adapter, Adapter):
        raise TokenMergeError(f"adapter must be a tokenmerge.adapters.Adapter; got {adapter!r}")
    _USER.insert(0, adapter)
    return adapter


def _load(path: str) -> Adapter | None:
    if path not in _LOADED:
        module_name, class_name = path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # the adapter's library is not installed
            return None
        _LOADED[path] = getattr(module, class_name)()
    return _LOADED[path]


def _packages_of(target: Any) -> set[str]:
    return {cls.__module__.split(".")[0] for cls in type(target).__mro__}


def find_adapter(target: Any) -> Adapter:
    """The adapter for ``target``; `TokenMergeError` listing what is supported if none fits."""
    for adapter in _USER:
        if adapter.accepts(target):
            return adapter
    packages = _packages_of(target)
    for package, path in _LAZY:
        if package in packages:
            adapter = _load(path)
            if adapter is not None and adapter.accepts(target):
                return adapter
    generic = _load(_GENERIC)
    assert generic is not None
    if generic.accepts(target):
        return generic
    got = f"{type(target).__module__}.{type(target).__qualname__}"
    raise TokenMergeError(f"target must be one of: {', '.join(supported_targets())}; got {got}")


def supported_targets() -> list[str]:
    """Names of the model classes the registered adapters handle."""
    names: list[str] = [n for a in _USER for n in a.supported]
    names += [
        "diffusers DiffusionPipeline (with a unet or transformer)",
        "diffusers UNet2DConditionModel",
        "diffusers DiTTransformer2DModel",
        "diffusers PixArtTransformer2DModel",
        "diffusers FluxTransformer2DModel (Flux.1, double- and single-stream blocks)",
        "diffusers Flux2Transformer2DModel (Flux.2: SubLayers without merge_mlp, ResidualRange; no ToDo)",
        "diffusers SD3Transformer2DModel (SD3, SD3.5)",
        "diffusers WanTransformer3DModel (Wan 2.1/2.2 video)",
        "diffusers QwenImageTransformer2DModel (Qwen-Image)",
        "diffusers CogVideoXTransformer3DModel (CogVideoX 1.0/1.5 video)",
        "diffusers HunyuanVideoTransformer3DModel (HunyuanVideo, double- and single-stream blocks)",
        "timm VisionTransformer (vit_*, deit_*, deit3_*)",
        "timm VisionTransformerDistilled",
        "timm Eva (eva02_*, vit_*_dinov3*, vit_pe_*, vit_*rope*)",
        "transformers ViTModel / ViTForImageClassification",
        "transformers CLIPVisionModel / CLIPVisionModelWithProjection",
        "transformers SiglipVisionModel",
        "transformers Dinov2Model / Dinov2ForImageClassification (and the WithRegisters variants)",
        "a stack of transformer blocks with .attn and .mlp (nn.ModuleList/Sequential, or a module with .blocks)",
    ]
    return names
