"""The diffusers adapter: any merging policy in SD 1.x/2.x/SDXL UNets, DiT and PixArt.

`tokenmerge.apply` reaches `DiffusersAdapter` for any diffusers object. It accepts a
`DiffusionPipeline` (whose ``unet`` or ``transformer`` gets the hooks), a
`UNet2DConditionModel`, a `DiTTransformer2DModel` or a `PixArtTransformer2DModel`, and
attaches forward hooks only:

* on the denoiser, a `StepTracker` (latent size, denoising step, new generations);
* on every `BasicTransformerBlock` that merges, a `SubLayerMerge` (tomesd's
  merge around self-attention / cross-attention / feed-forward, or ToDo's key/value
  merging), or for ``config.blocks`` a `RangeMerge` over a block range (DiT/PixArt).

``max_downsample`` counts from the highest-resolution level of the model that has
attention, so SDXL, whose first level has none, merges at its second level by default.
The pipeline's own call is unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet
from ..state import MergeState
from .base import Adapter
from .diffusion_blocks import KV_ONLY_FUSED_MESSAGE, RangeMerge, SubLayerMerge, fused_self_attention
from .diffusion_layout import SUPPORTED_MODELS, DenoiserLayout, describe_denoiser
from .diffusion_steps import StepTracker

__all__ = ["DiffusersAdapter"]

_SUPPORTED_TEXT = (
    "a DiffusionPipeline whose unet or transformer is one of "
    + ", ".join(SUPPORTED_MODELS)
    + ", or one of those models itself"
)

# The hook set last attached to each denoiser, so applying through the pipeline and then
# through its denoiser (or the other way round) still leaves one set of hooks.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, HookSet] = weakref.WeakKeyDictionary()


def _denoiser_of(target: Any) -> Any:
    if isinstance(target, DiffusionPipeline):
        for name in ("unet", "transformer"):
            model = getattr(target, name, None)
            if model is not None:
                return model
        return None
    return target


class DiffusersAdapter(Adapter):
    """Applies a `MergeConfig` to a diffusers pipeline or denoiser through forward hooks.

    Config fields it reads: ``merge_attn``, ``merge_crossattn``, ``merge_mlp``,
    ``max_downsample``, ``kv_only`` and ``mode`` (per-sub-layer merging), or ``blocks``,
    ``mode`` and ``prop_attn`` (block-range merging, DiT/PixArt only). ``seed``, the
    matcher, threshold and cache act through `MergeState`.
    """

    name = "diffusers"
    supported = (
        "diffusers DiffusionPipeline (with a unet or transformer)",
        *(f"diffusers {name}" for name in SUPPORTED_MODELS),
    )

    def accepts(self, target: Any) -> bool:
        """True for any diffusers pipeline or model; `check` rejects the unsupported ones by name."""
        return isinstance(target, (DiffusionPipeline, ModelMixin))

    def model_of(self, target: Any) -> Any:
        """The denoiser that carries the hooks: a pipeline's ``unet`` or ``transformer``, else ``target``."""
        return _denoiser_of(target)

    def layout(self, target: Any) -> DenoiserLayout:
        """The `DenoiserLayout` of ``target``'s denoiser; `TokenMergeError` naming the supported classes if none."""
        model = self.model_of(target)
        layout = describe_denoiser(model) if model is not None else None
        if layout is None:
            got = type(model).__name__ if model is not None else f"{type(target).__name__} without unet/transformer"
            raise TokenMergeError(f"target must be {_SUPPORTED_TEXT}; got {got}")
        return layout

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject what the model lacks, before anything is changed."""
        layout = self.layout(target)
        model_name = type(layout.model).__name__
        check(len(layout.sites) > 0, f"target {model_name} has no transformer blocks to merge in")
        check(not config.trace_source, "trace_source is not supported for diffusion models (it is for ViTs)")
        if config.merge_crossattn:
            check(
                all(site.has_cross_attention for site in layout.sites),
                f"merge_crossattn must be False for {model_name}: its transformer blocks have no cross-attention",
            )
        if config.blocks is not None:
            self._check_range(layout, config)
            return
        check(
            not config.kv_only or config.merge_attn,
            "kv_only merges self-attention keys/values: merge_attn must be True",
        )
        check(
            config.merge_attn or config.merge_crossattn or config.merge_mlp,
            "merge_attn, merge_crossattn or merge_mlp must be True: otherwise nothing merges",
        )
        if config.kv_only and config.merge_attn:
            check(not any(fused_self_attention(site.block.attn1) for site in layout.sites), KV_ONLY_FUSED_MESSAGE)

    @staticmethod
    def _check_range(layout: DenoiserLayout, config: MergeConfig) -> None:
        assert config.blocks is not None
        model_name = type(layout.model).__name__
        check(
            not layout.is_unet,
            f"blocks (block-range merging) is supported for DiTTransformer2DModel and PixArtTransformer2DModel, "
            f"not {model_name}; use blocks=None",
        )
        first, last = config.blocks
        count = len(layout.sites)
        check(
            last < count,
            f"blocks must lie within the model's {count} transformer blocks, 0 <= first <= last <= {count - 1}; "
            f"got {config.blocks}",
        )
        check(not config.kv_only, "kv_only cannot be combined with blocks (block-range merging)")

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook the denoiser (step tracking) and its transformer blocks (merging)."""
        layout = self.layout(target)
        previous = _ATTACHED.get(layout.model)
        if previous is not None and previous is not hooks:
            previous.remove()  # applied before through another handle (pipeline vs denoiser)
        _ATTACHED[layout.model] = hooks
        pipeline = target if isinstance(target, DiffusionPipeline) else None
        tracker = StepTracker(state, layout, pipeline)
        hooks.pre(layout.model, tracker, prepend=True)
        if config.blocks is not None:
            RangeMerge(config, state, tracker, layout).attach(hooks)
            return
        merging = [site for site in layout.sites if layout.relative_downsample(site) <= config.max_downsample]
        for index, site in enumerate(merging):
            SubLayerMerge(config, state, tracker, layout, site, index, len(merging)).attach(hooks)
