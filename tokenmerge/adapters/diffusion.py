"""The diffusers adapter: any merging policy in UNets, DiT, PixArt, MM-DiTs and video DiTs.

`tokenmerge.apply` reaches `DiffusersAdapter` for any diffusers object. It accepts a
`DiffusionPipeline` (whose ``unet`` or ``transformer`` gets the hooks) or one of the
registered denoisers itself: SD 1.x/2.x/SDXL's `UNet2DConditionModel`,
`DiTTransformer2DModel`, `PixArtTransformer2DModel`, and the MM-DiT and video families
`FluxTransformer2DModel`, `SD3Transformer2DModel`, `QwenImageTransformer2DModel`,
`WanTransformer3DModel`, `CogVideoXTransformer3DModel` and
`HunyuanVideoTransformer3DModel`. It attaches forward hooks only:

* on the denoiser, a `StepTracker` (latent size or token grid, denoising step, new
  generations);
* on every transformer block that merges, a `SubLayerMerge` (`SubLayers`: tomesd's
  merge around self-attention / cross-attention / feed-forward; `KeyValues`: ToDo's
  key/value merging), or for `ResidualRange` a `RangeMerge` over a block range;
* inside joint attention (MM-DiT) and attention with rotary tables, the hooks of
  `tokenmerge.adapters.diffusion_joint` (text tokens never merge; rotary tables follow
  the merged tokens; ToDo's keys and values merged at the projections).

Which models and blocks these are, and how they are called, is data: the
`DenoiserSpec` and `BlockSpec` rows of `tokenmerge.adapters.diffusion_specs`. The
placements a model accepts are its `DenoiserSpec.placements` (UNets: `SubLayers`,
`KeyValues`; the transformers: those and `ResidualRange`).

``max_downsample`` counts from the highest-resolution level of the model that has
attention, so SDXL, whose first level has none, merges at its second level by default.
The pipeline's own call is unchanged.
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin

from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet
from ..placements import KeyValues, Placement, ResidualRange, SubLayers
from ..state import MergeState
from .base import Adapter, check_layer_counts
from .diffusion_blocks import KV_ONLY_FUSED_MESSAGE, RangeMerge, SubLayerMerge, fused_self_attention
from .diffusion_caches import CacheGuard, check_cache
from .diffusion_joint import check_joint_attention
from .diffusion_layout import DenoiserLayout, describe_denoiser, supported_models
from .diffusion_steps import StepTracker

__all__ = ["DiffusersAdapter"]


def _supported_text() -> str:
    return (
        "a DiffusionPipeline whose unet or transformer is one of "
        + ", ".join(supported_models())
        + ", or one of those models itself"
    )


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

    Placements: `SubLayers` (the default) and `KeyValues` on every model, `ResidualRange`
    on DiT/PixArt (each model's `DenoiserSpec.placements`); ``mode`` says how tokens
    combine. ``seed``, the matcher, threshold and cache act through `MergeState`.
    """

    name = "diffusers"
    placements = (SubLayers, KeyValues, ResidualRange)

    @property
    def supported(self) -> tuple[str, ...]:  # type: ignore[override]
        """The pipeline and the registered denoiser classes, for error messages."""
        return (
            "diffusers DiffusionPipeline (with a unet or transformer)",
            *(f"diffusers {name}" for name in supported_models()),
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
            raise TokenMergeError(f"target must be {_supported_text()}; got {got}")
        return layout

    def placements_for(self, target: Any) -> tuple[type[Placement], ...]:
        """The placements of the model's `DenoiserSpec` (UNets: no `ResidualRange`)."""
        spec = self.layout(target).spec
        return spec.placements if spec is not None else self.placements

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject what the model lacks, before anything is changed."""
        layout = self.layout(target)
        model_name = type(layout.model).__name__
        check(len(layout.sites) > 0, f"target {model_name} has no transformer blocks to merge in")
        placement = self.placement(target, config)
        check_cache(layout.model, placement)  # a diffusers cache (enable_cache) that merging cannot run beside
        if isinstance(placement, SubLayers):
            check(
                placement.protected == 0 and placement.grid is None,
                f"SubLayers.protected and SubLayers.grid are for generic block stacks; {model_name} has no "
                f"protected tokens and its grids follow the latent; got {placement.describe()}",
            )
            for role, wanted, old in (
                ("self_attention", placement.attn, "merge_attn"),
                ("cross_attention", placement.cross_attn, "merge_crossattn"),
                ("feed_forward", placement.mlp, "merge_mlp"),
            ):
                if wanted:
                    check(
                        all(site.sublayer(role) is not None for site in layout.sites),
                        f"{old} must be False for {model_name} ({placement.describe()}): its transformer blocks "
                        f"have no {role.replace('_', '-')} layer",
                    )
        if isinstance(placement, (KeyValues, ResidualRange)) or getattr(placement, "attn", False):
            for site in layout.sites:
                if site.spec.attention_hooks:
                    check_joint_attention(site, keys_values=isinstance(placement, KeyValues))
        if isinstance(placement, KeyValues):
            for site in layout.sites:
                attn = site.sublayer("self_attention")
                if site.spec.attention_hooks:
                    continue  # checked above: keys and values merged at the projections
                check(
                    attn is not None and site.spec.key_value_argument is not None,
                    f"placement KeyValues needs a self-attention that takes separate keys and values "
                    f"(BlockSpec.key_value_argument); {type(site.block).__name__} at {site.name} has none",
                )
                check(not fused_self_attention(attn), KV_ONLY_FUSED_MESSAGE)
                only_cross = bool(getattr(site.block, "only_cross_attention", False))
                check(
                    not (only_cross or getattr(attn, "is_cross_attention", False)),
                    f"placement KeyValues (ToDo) downsamples self-attention keys and values, but "
                    f"{type(site.block).__name__} at {site.name} has no self-attention: its attn1 attends to the "
                    "encoder states (a model built with only_cross_attention=True); use SubLayers (ToMeSD) instead",
                )
        elif isinstance(placement, ResidualRange):
            count = len(layout.sites)
            check(
                placement.last < count,
                f"ResidualRange.last must lie within the model's {count} transformer blocks, "
                f"0 <= first <= last <= {count - 1} (MergeConfig.blocks); got {placement.describe()}",
            )
            unmasked = [
                site.name
                for site in layout.sites[placement.first : placement.last + 1]
                if (site.spec.attention_hooks) and not site.spec.joint_mask
            ]
            check(
                not (placement.prop_attn and unmasked),
                f"ResidualRange.prop_attn needs an attention mask, which the joint attention of {model_name} "
                f"({', '.join(unmasked[:2])}{', ...' if len(unmasked) > 2 else ''}) does not take; "
                f"pass prop_attn=False; got {placement.describe()}",
            )
            check_layer_counts(config, 1, f"{model_name}'s ResidualRange plans once per call (1 layer)")
            return
        merging = self.merging_sites(layout, placement)
        where = f"{model_name} merges in {len(merging)} transformer blocks"
        check_layer_counts(config, len(merging), f"{where} (max_downsample={placement.max_downsample})")

    @staticmethod
    def merging_sites(layout: DenoiserLayout, placement: SubLayers | KeyValues) -> list[Any]:
        """The blocks that merge under ``placement``: those within its ``max_downsample``, in order."""
        return [site for site in layout.sites if layout.relative_downsample(site) <= placement.max_downsample]

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook the denoiser (step tracking) and its transformer blocks (merging)."""
        # An earlier config on the denoiser (applied through the pipeline or the denoiser) is
        # removed by `tokenmerge.apply` once these hooks are attached, never before.
        layout = self.layout(target)
        pipeline = target if isinstance(target, DiffusionPipeline) else None
        tracker = StepTracker(state, layout, pipeline)
        hooks.pre(layout.model, tracker, prepend=True)
        placement = self.placement(target, config)
        tracker.on_call(CacheGuard(layout.model, placement))  # a cache enabled after merging: refused at its call
        if isinstance(placement, ResidualRange):
            RangeMerge(config, state, tracker, layout).attach(hooks)
            return
        assert isinstance(placement, (SubLayers, KeyValues))
        merging = self.merging_sites(layout, placement)
        for index, site in enumerate(merging):
            SubLayerMerge(config, state, tracker, layout, site, index, len(merging)).attach(hooks)
