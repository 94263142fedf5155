"""Where the transformer blocks of a diffusers denoiser sit, and their token layouts.

A `DenoiserLayout` lists every transformer block of a denoiser with its *level*: how
many 2x downsamplings separate its token grid from the latent (UNets), or 0 for every
block of a patch transformer. For each block call it gives the runtime the tokens'
`~tokenmerge.layout.TokenLayout` (`DenoiserLayout.token_layout`): the image grid
``(h, w)`` of the block's level, with no protected tokens. Which classes are denoisers and blocks, and how they are
called, is data: the `DenoiserSpec` and `BlockSpec` rows registered in
`tokenmerge.adapters.diffusion_specs` (or by the user, `tokenmerge.adapters.specs`).
Levels are read from the model's structure (which down/up blocks carry a
downsampler/upsampler), not from token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..layout import TokenLayout
from . import diffusion_specs  # noqa: F401 - registers the diffusers rows
from .specs import Argument, BlockCall, BlockSpec, DenoiserSpec, block_call, block_spec, denoiser_spec
from .specs import registered_denoisers as _registered

__all__ = ["BlockSite", "DenoiserLayout", "describe_denoiser", "token_grid", "supported_models", "SUPPORTED_MODELS"]


def supported_models() -> tuple[str, ...]:
    """The denoiser classes with a registered `DenoiserSpec`, by name (for error messages)."""
    return _registered()


#: The denoiser classes the diffusers adapter handled when it was imported (see `supported_models`).
SUPPORTED_MODELS: tuple[str, ...] = supported_models()


@dataclass(frozen=True)
class BlockSite:
    """One transformer block of a denoiser.

    Attributes:
        name: the block's module path inside the denoiser (the merge layer key).
        block: the block module (a `BasicTransformerBlock` in diffusers' own families).
        level: number of 2x downsamplings between the latent and this block's token grid.
        call: the block's `BlockSpec` bound to its ``forward`` (argument positions).
    """

    name: str
    block: nn.Module
    level: int
    call: BlockCall = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.call is None:
            object.__setattr__(self, "call", block_call(self.block))

    @property
    def spec(self) -> BlockSpec:
        """The block's `BlockSpec`."""
        return self.call.spec

    def sublayer(self, role: str) -> nn.Module | None:
        """The block's ``"self_attention"``, ``"cross_attention"`` or ``"feed_forward"`` module (None if none)."""
        return self.spec.sublayer(self.block, role)

    @property
    def has_cross_attention(self) -> bool:
        """Whether the block has a cross-attention layer (the spec's ``cross_attention``, ``attn2``)."""
        return self.sublayer("cross_attention") is not None


@dataclass(frozen=True)
class DenoiserLayout:
    """What the adapter needs to know about a denoiser.

    Attributes:
        kind: ``"unet"``, ``"dit"`` or ``"pixart"`` (the `DenoiserSpec`'s kind).
        model: the denoiser.
        sites: its transformer blocks, in execution order for patch transformers.
        patch_size: latent pixels per token side (1 for UNets).
        latent_index, latent_name: where the latent ``(B, C, H, W)`` is in the forward call.
        timestep_index, timestep_name: where the timestep is in the forward call.
    """

    kind: str
    model: nn.Module
    sites: tuple[BlockSite, ...]
    patch_size: int
    latent_index: int
    latent_name: str
    timestep_index: int
    timestep_name: str = "timestep"
    spec: DenoiserSpec | None = None
    patch_size_t: int = 1
    frames_first: bool = False
    grid_ids: Argument | None = None
    timestep_scale: float = 1.0
    grid_shapes: Argument | None = None

    def grid_of_shapes(self, shapes: object) -> tuple[int, ...] | None:
        """The token grid of Qwen-Image's ``img_shapes``: the first sample's first ``(frames, rows, columns)``."""
        try:
            frames, rows, cols = (int(v) for v in shapes[0][0])  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            return None
        spatial = (rows * self.patch_size, cols * self.patch_size)
        return spatial if frames == 1 else (frames * self.patch_size_t, *spatial)

    def latent_grid(self, latent: object) -> tuple[int, ...] | None:
        """The latent's spatial size as the tokens see it: ``(H, W)``, or ``(F, H, W)`` for a video latent.

        ``(B, C, H, W)`` gives ``(H, W)``; ``(B, C, F, H, W)`` (``(B, F, C, H, W)`` when
        `frames_first`) gives ``(F, H, W)``. Anything else (a packed ``(B, N, C)`` latent)
        gives None: its grid comes from `grid_of_ids`.
        """
        shape = getattr(latent, "shape", None)
        if shape is None or len(shape) not in (4, 5):
            return None
        if len(shape) == 4:
            return int(shape[-2]), int(shape[-1])  # (B, C, H, W) -> (H, W)
        frames = shape[1] if self.frames_first else shape[2]
        return int(frames), int(shape[-2]), int(shape[-1])  # (B, C, F, H, W) -> (F, H, W)

    def grid_of_ids(self, ids: object) -> tuple[int, ...] | None:
        """The latent grid, in latent pixels, of position ids ``(N, 3+)`` or ``(B, N, 3+)`` (frame, row, column, ...).

        Reads the ids on the host (once per denoiser call): rows and columns are the
        largest ids plus one, times the patch size; frames likewise when there are several.
        """
        shape = getattr(ids, "shape", None)
        if shape is None or len(shape) not in (2, 3) or shape[-1] < 3 or shape[-2] == 0:
            return None
        table = ids.reshape(-1, shape[-1])[:, :3]  # type: ignore[attr-defined]  # Flux.2 adds a 4th column
        frames, rows, cols = (int(v) + 1 for v in (table.amax(0) - table.amin(0)).tolist())
        if rows * cols * frames != shape[-2]:
            return None
        spatial = (rows * self.patch_size, cols * self.patch_size)
        return spatial if frames == 1 else (frames * self.patch_size_t, *spatial)

    @property
    def base_level(self) -> int:
        """The level of the highest-resolution blocks that have attention (0 for SD, 1 for SDXL)."""
        return min((site.level for site in self.sites), default=0)

    @property
    def is_unet(self) -> bool:
        """True for UNets (several resolutions), False for patch transformers (one)."""
        return self.kind == "unet"

    def relative_downsample(self, site: BlockSite) -> int:
        """How much coarser ``site``'s grid is than the finest grid with attention (1, 2, 4, ...)."""
        return 2 ** (site.level - self.base_level)

    def grid(self, latent_hw: tuple[int, ...] | None, site: BlockSite, num_tokens: int) -> tuple[int, ...] | None:
        """The token grid of ``site`` for a latent of size ``latent_hw``; None if it does not fit.

        ``(h, w)`` for an image latent ``(H, W)``; ``(t, h, w)`` = ``(F / pt, H / p, W / p)``
        for a video latent ``(F, H, W)``.
        """
        if latent_hw is None:
            return None
        if len(latent_hw) == 3:
            frames, height, width = latent_hw
            p, pt = self.patch_size, self.patch_size_t
            grid = (-(-frames // pt), height // p, width // p)
            return grid if math.prod(grid) == num_tokens and min(grid) > 0 else None
        return token_grid(latent_hw, site.level, self.patch_size, num_tokens)  # type: ignore[arg-type]

    def num_image_tokens(self, latent_hw: tuple[int, ...] | None) -> int | None:
        """Image (or video) tokens of a patch transformer's latent of size ``latent_hw``; None if unknown."""
        if latent_hw is None or self.is_unet:
            return None
        if len(latent_hw) == 3:
            return (
                -(-latent_hw[0] // self.patch_size_t)
                * (latent_hw[1] // self.patch_size)
                * (latent_hw[2] // self.patch_size)
            )
        return (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)

    def token_layout(
        self, latent_hw: tuple[int, ...] | None, site: BlockSite, num_tokens: int, text: int = 0
    ) -> TokenLayout | None:
        """The `TokenLayout` of one call of ``site``: ``TokenLayout.image(h, w)`` (or ``.video(t, h, w)``) on its grid.

        Every token of a UNet, DiT or PixArt block is an image token, so nothing is
        protected: the grid is `grid`'s (``(h, w)`` of the block's level, ``(H/p, W/p)``
        for a patch transformer, ``(F/pt, H/p, W/p)`` for a video transformer). With
        ``text`` > 0 the sequence is a joint one: ``num_tokens`` counts ``text`` text
        tokens, protected before the grid or after it (the block's
        `BlockSpec.text_order`). None when the latent size is unknown or no grid covers
        the image tokens (the block call then runs unmerged).
        """
        grid = self.grid(latent_hw, site, num_tokens - text)
        if grid is None:
            return None
        before = text if site.spec.text_order != "after" else 0
        return TokenLayout(grid, prefix=before, suffix=text - before)


def token_grid(latent_hw: tuple[int, int], level: int, patch_size: int, num_tokens: int) -> tuple[int, int] | None:
    """The token grid ``(h, w)`` with ``h * w == num_tokens`` of a block ``level`` halvings below the latent.

    Patch transformers: ``(H // p, W // p)``. UNets: ``(ceil(H / 2**level), ceil(W / 2**level))``,
    which is what repeated stride-2 convolutions with padding 1 give; failing that, tomesd's
    rule ``ds = ceil(sqrt(H*W // N))``, ``(ceil(H / ds), ceil(W / ds))``. None when neither
    covers ``num_tokens`` (the block runs unmerged then).
    """
    height, width = latent_hw
    if patch_size > 1:
        candidates = [(height // patch_size, width // patch_size)]
    else:
        scale = 2**level
        candidates = [(-(-height // scale), -(-width // scale)), (height // scale, width // scale)]
    if num_tokens > 0:
        ds = math.ceil(math.sqrt(height * width // num_tokens)) if height * width >= num_tokens else 1
        candidates.append((-(-height // ds), -(-width // ds)))
    for h, w in candidates:
        if h * w == num_tokens and h > 0 and w > 0:
            return h, w
    return None


def _index(argument: Argument) -> int:
    # A keyword-only argument never arrives positionally: an index past any call's arguments.
    return argument.index if argument.index is not None else 1 << 30


def describe_denoiser(model: object) -> DenoiserLayout | None:
    """The `DenoiserLayout` of ``model``, or None when its class has no registered `DenoiserSpec`."""
    if not isinstance(model, nn.Module):
        return None
    spec = denoiser_spec(model)
    if spec is None:
        return None
    latent, timestep = spec.arguments(model)
    sites = tuple(BlockSite(name, block, level) for name, block, level in spec.sites(model) if block_spec(block))
    return DenoiserLayout(
        kind=spec.kind,
        model=model,
        sites=sites,
        patch_size=spec.patch_size_of(model),
        latent_index=_index(latent),
        latent_name=latent.name,
        timestep_index=_index(timestep),
        timestep_name=timestep.name,
        spec=spec,
        patch_size_t=spec.patch_size_t_of(model),
        frames_first=spec.frames_first,
        grid_ids=spec.grid_ids_argument(model),
        grid_shapes=spec.grid_ids_argument(model, "grid_shapes"),
        timestep_scale=float(spec.timestep_scale),
    )
