"""Configurations of the reference models, and how to build them.

The weights' JSON file records the configuration it was trained with; `build_pipeline`
builds from that record, so retrained weights with another configuration still load.
The defaults here are what `tokenmerge.tools.zoo.train` trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import check

__all__ = ["CLASS_NAMES", "ZooSpec", "SPECS", "SCHEDULER_CONFIG", "build_pipeline"]

#: The photographs of ``skimage.data`` the models are conditioned on, in label order.
CLASS_NAMES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "clock",
    "colorwheel",
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
    "coins",
    "page",
)

#: Noise schedule shared by training (DDPM) and sampling (DDIM): cosine betas suit pixel space.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
    "timestep_spacing": "trailing",  # the first sampling step starts at t = 999
}


@dataclass(frozen=True)
class ZooSpec:
    """One reference model: its kind and the configs of its components.

    Attributes:
        name: the name `tokenmerge.tools.zoo.load` takes.
        kind: ``"dit"`` or ``"unet"``.
        denoiser: keyword arguments of `DiTTransformer2DModel` or `UNet2DConditionModel`.
        class_tokens: keyword arguments of `ClassTokens` (UNet only).
        scheduler: DDIM/DDPM scheduler config.
        class_names: class names, in label order.
    """

    name: str
    kind: str
    denoiser: dict[str, Any]
    class_tokens: dict[str, Any] | None = None
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    class_names: tuple[str, ...] = CLASS_NAMES

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-ready data."""
        return {
            "name": self.name,
            "kind": self.kind,
            "denoiser": dict(self.denoiser),
            "class_tokens": None if self.class_tokens is None else dict(self.class_tokens),
            "scheduler": dict(self.scheduler),
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ZooSpec:
        """Inverse of `to_json`."""
        return cls(
            name=data["name"],
            kind=data["kind"],
            denoiser=dict(data["denoiser"]),
            class_tokens=None if data.get("class_tokens") is None else dict(data["class_tokens"]),
            scheduler=dict(data["scheduler"]),
            class_names=tuple(data["class_names"]),
        )


_NUM_CLASSES = len(CLASS_NAMES)

#: The reference models by name: what `tokenmerge.tools.zoo.train` trains.
SPECS: dict[str, ZooSpec] = {
    # 64x64 RGB, patch 2: 1,024 tokens of width 128 through 6 adaLN-Zero blocks (about 2 M parameters).
    "dit-photos": ZooSpec(
        name="dit-photos",
        kind="dit",
        denoiser={
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": 6,
            "sample_size": 64,
            "patch_size": 2,
            "num_embeds_ada_norm": _NUM_CLASSES,  # label _NUM_CLASSES is the null class
            "norm_num_groups": 32,
        },
    ),
    # SD layout at 64x64 RGB: cross-attention transformer blocks at 64x64 (4,096 tokens) and 32x32,
    # a plain ResNet level at 16x16, a cross-attention mid block; classes enter as 4 learned tokens.
    "unet-photos": ZooSpec(
        name="unet-photos",
        kind="unet",
        denoiser={
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": [32, 64, 128],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": 64,
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads per
            # level (a historical misnomer): 1, 2, 4 heads of 32 channels each.
            "attention_head_dim": [1, 2, 4],
            "norm_num_groups": 8,
        },
        class_tokens={"num_classes": _NUM_CLASSES, "num_tokens": 4, "dim": 64},
    ),
}


def build_pipeline(spec: ZooSpec) -> Any:
    """A pipeline with freshly initialised weights for ``spec`` (training mode, float32).

    Returns:
        A `PixelDiTPipeline` or `PixelUNetPipeline`.
    """
    from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    from .pipeline import ClassTokens, PixelDiTPipeline, PixelUNetPipeline

    check(spec.kind in ("dit", "unet"), f"kind must be 'dit' or 'unet'; got {spec.kind!r}")
    scheduler = DDIMScheduler(**spec.scheduler)
    if spec.kind == "dit":
        transformer = DiTTransformer2DModel(**spec.denoiser)
        for block in transformer.transformer_blocks:
            # Labels are dropped by the training loop (seeded), not by each block on its own.
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return PixelDiTPipeline(transformer=transformer, scheduler=scheduler, class_names=spec.class_names)
    check(spec.class_tokens is not None, f"{spec.name}: a UNet spec needs class_tokens")
    assert spec.class_tokens is not None
    unet = UNet2DConditionModel(**spec.denoiser)
    tokens = ClassTokens(**spec.class_tokens)
    return PixelUNetPipeline(unet=unet, class_tokens=tokens, scheduler=scheduler, class_names=spec.class_names)
