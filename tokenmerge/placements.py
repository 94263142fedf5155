"""Placements: where in a model merging acts, one small dataclass per form.

A `MergeConfig` says *how* tokens merge (matcher, threshold, cache, mode, seed); its
``placement`` says *where*. Each form is a frozen dataclass validated when it is built,
and each adapter accepts the forms its model family can honour (refusing the others at
`tokenmerge.apply` time with a `TokenMergeError` that names the placement):

| placement | the form | accepted by |
| --- | --- | --- |
| `SubLayers` | tomesd: around self-/cross-attention, feed-forward | UNets, DiT, PixArt; block stacks |
| `KeyValues` | ToDo: self-attention keys/values only | UNets, DiT, PixArt |
| `ResidualRange` | residual stream merged over blocks ``first..last`` | DiT, PixArt |
| `TokenStream` | ToMe: every block merges its residual stream | timm ViTs |

``MergeConfig(placement=None)`` lets the adapter pick its family's default
(`SubLayers()` for diffusion models and block stacks, `TokenStream()` for a ViT).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import MAX_TOKENS, check

__all__ = [
    "Placement",
    "SubLayers",
    "KeyValues",
    "ResidualRange",
    "TokenStream",
    "DOWNSAMPLES",
    "DEFAULT_MIN_TOKENS",
    "min_tokens_for",
]

#: The values ``max_downsample`` may take: levels downsampled at most this much merge.
DOWNSAMPLES: tuple[int, ...] = (1, 2, 4, 8)

#: ``min_tokens=None`` per ``(device type, model family)``: a layer merges only when its
#: mergeable tokens are at least this many. CUDA UNets: on an H100, SD 1.5's top level
#: merged at 4096 tokens (512 px) made the eager step slower (ToMeSD 0.5: 0.85x,
#: launch-bound, attention 9 % of kernel time) and at 16384 tokens (1024 px) faster (1.16x
#: eager, 1.34x with CUDA graphs), so UNet layers below 16384 tokens stay unmerged there.
#: Every other pair (the CPU, where merging pays at every measured size; the transformer
#: families, whose wide blocks are compute-bound at 4096 tokens and were not measured
#: slower): every layer merges, as before.
DEFAULT_MIN_TOKENS: dict[tuple[str, str], int] = {("cuda", "unet"): 16384}


def min_tokens_for(min_tokens: int | None, device_type: str, family: str = "") -> int:
    """The token count from which a layer merges: ``min_tokens``, or the default of the device and family when None.

    Args:
        min_tokens: a placement's ``min_tokens`` (an int >= 0, or None for the default).
        device_type: ``tensor.device.type`` of the layer's tokens (``"cuda"``, ``"cpu"``, ...).
        family: the model family's kind (``DenoiserSpec.kind``: ``"unet"``, ``"dit"``, ``"flux"``, ...).
    """
    if min_tokens is not None:
        return min_tokens
    return DEFAULT_MIN_TOKENS.get((device_type, family), 0)


def _check_min_tokens(owner: str, value: Any) -> None:
    check(
        value is None or (_is_int(value) and 0 <= value <= MAX_TOKENS),
        f"{owner}.min_tokens must be None (the default of the device and family) or an int in "
        f"[0, {MAX_TOKENS}]; got {value!r}",
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: Any) -> None:
    check(isinstance(value, bool), f"{owner}.{name} must be a bool (True or False); got {value!r}")


def _check_range(owner: str, name: str, value: Any) -> None:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(_is_int(v) and v >= 0 for v in value)
        and value[0] <= value[1]
    )
    check(ok, f"{owner}.{name} must be None or a tuple (first, last) of ints with 0 <= first <= last; got {value!r}")


@dataclass(frozen=True)
class Placement:
    """Base class of the placements: where in a model merging acts.

    Subclasses are frozen dataclasses whose `validate` (run when they are built) raises
    `TokenMergeError` naming the field, the value given and what is allowed.
    """

    #: What the placement does, in a few words (for error messages).
    form: ClassVar[str] = "a placement"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `TokenMergeError` naming the first field that is out of range."""

    def describe(self) -> str:
        """The placement as it would be written, e.g. ``SubLayers(attn=True, mlp=True)`` (non-default fields only)."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class SubLayers(Placement):
    """tomesd's form: in every block, the chosen sub-layers run on merged tokens and are unmerged right after.

    The plan is computed from each block's input; the residual stream keeps every token.

    Args:
        attn: merge around self-attention (tomesd's ``merge_attn``).
        cross_attn: merge around cross-attention (``merge_crossattn``); the block must
            have one (diffusers UNets and PixArt do, DiT does not).
        mlp: merge around the feed-forward layer (``merge_mlp``).
        max_downsample: merge only in levels whose token grid is downsampled at most
            this much from the model's highest-resolution level with attention
            (1, 2, 4 or 8; UNets; patch transformers have one level).
        min_tokens: merge a block only when its mergeable tokens are at least this many
            (diffusion models; below it the block runs unmerged, bit for bit). None: the
            default of the device and family from `DEFAULT_MIN_TOKENS` (16384 for UNets on
            CUDA, so SD 1.5 merges at 1024 px and not at 512 px; 0 elsewhere: every block
            merges). 0 always merges.
        protected: leading tokens never merged (class or register tokens); generic
            block stacks only, diffusion models have none. It must leave tokens to
            merge: a count at least the block's token count is refused at the first
            forward (the count is known only then), naming this field.
        grid: ``(h, w)`` token grid of the mergeable tokens, for grid matchers when the
            adapter cannot derive it (a generic block stack whose N is not square);
            diffusion models derive it from the latent. A grid matcher's cell must fit
            it (checked at `tokenmerge.apply`), and ``h * w`` must equal the tokens
            after ``protected`` (checked at the first forward, naming this field).
    """

    form: ClassVar[str] = "merging around the sub-layers of every block"
    attn: bool = True
    cross_attn: bool = False
    mlp: bool = False
    max_downsample: int = 1
    min_tokens: int | None = None
    protected: int = 0
    grid: tuple[int, int] | None = None

    def validate(self) -> None:
        """Check the field types and ranges, and that at least one sub-layer merges."""
        for name in ("attn", "cross_attn", "mlp"):
            _check_bool("SubLayers", name, getattr(self, name))
        check(
            self.attn or self.cross_attn or self.mlp,
            "SubLayers needs attn, cross_attn or mlp True (ToMeSD's merge_attn, merge_crossattn, merge_mlp): "
            "otherwise nothing merges",
        )
        check(
            _is_int(self.max_downsample) and self.max_downsample in DOWNSAMPLES,
            f"SubLayers.max_downsample must be 1, 2, 4 or 8; got {self.max_downsample!r}",
        )
        _check_min_tokens("SubLayers", self.min_tokens)
        check(
            _is_int(self.protected) and 0 <= self.protected <= MAX_TOKENS,
            f"SubLayers.protected must be an int >= 0 and <= {MAX_TOKENS}; got {self.protected!r}",
        )
        if self.grid is not None:
            ok = isinstance(self.grid, tuple) and len(self.grid) == 2 and all(_is_int(v) and v > 0 for v in self.grid)
            ok = ok and self.grid[0] * self.grid[1] <= MAX_TOKENS
            check(
                ok,
                f"SubLayers.grid must be None or a tuple (h, w) of ints > 0 with h * w <= {MAX_TOKENS}; "
                f"got {self.grid!r}",
            )


@dataclass(frozen=True)
class KeyValues(Placement):
    """ToDo's form: self-attention attends to merged keys and values; queries keep every token.

    Nothing needs unmerging: attention's output has one row per query.

    Args:
        max_downsample: as in `SubLayers` (1, 2, 4 or 8).
        min_tokens: as in `SubLayers` (None: the default of the device and family).
    """

    form: ClassVar[str] = "merging of self-attention keys and values"
    max_downsample: int = 1
    min_tokens: int | None = None

    def validate(self) -> None:
        """Check ``max_downsample`` and ``min_tokens``."""
        check(
            _is_int(self.max_downsample) and self.max_downsample in DOWNSAMPLES,
            f"KeyValues.max_downsample must be 1, 2, 4 or 8; got {self.max_downsample!r}",
        )
        _check_min_tokens("KeyValues", self.min_tokens)


@dataclass(frozen=True)
class ResidualRange(Placement):
    """The residual stream merged over a range of blocks of a patch transformer (DiT, PixArt).

    Tokens are merged before block ``first``, stay merged through block ``last`` and are
    unmerged after it.

    Args:
        first: the first block (0-based) that runs on merged tokens.
        last: the last one (inclusive), ``last >= first``; it must exist in the model
            (checked at `tokenmerge.apply`).
        prop_attn: proportional attention in the range: ``log(size)`` added to the
            self-attention logits.
    """

    form: ClassVar[str] = "residual-stream merging over a range of blocks"
    first: int
    last: int
    prop_attn: bool = True

    def validate(self) -> None:
        """Check that ``0 <= first <= last`` are ints and ``prop_attn`` a bool."""
        check(_is_int(self.first) and self.first >= 0, f"ResidualRange.first must be an int >= 0; got {self.first!r}")
        check(
            _is_int(self.last) and self.last >= self.first,
            f"ResidualRange.last must be an int >= first ({self.first}); got {self.last!r}",
        )
        _check_bool("ResidualRange", "prop_attn", self.prop_attn)

    @property
    def blocks(self) -> tuple[int, int]:
        """``(first, last)``."""
        return (self.first, self.last)


@dataclass(frozen=True)
class TokenStream(Placement):
    """ToMe's ViT form: every block in ``blocks`` merges its residual stream, which stays merged.

    Args:
        blocks: ``(first, last)`` (inclusive): the blocks that merge; None: all of them.
        prop_attn: proportional attention (``log(size)`` added to the attention logits)
            once tokens have merged.
        trace_source: keep which input tokens every token covers (for `tokenmerge.tools.vis`).
        dense: the final features (timm's ``forward_features``, a Hugging Face encoder's
            ``last_hidden_state``) hold every input token, unmerged, one row per patch
            (True), or the merged tokens (False). None (the default): the family's
            default, True for timm models, False for Hugging Face ``transformers`` encoders.
    """

    form: ClassVar[str] = "residual-stream merging in every block"
    blocks: tuple[int, int] | None = None
    prop_attn: bool = True
    trace_source: bool = False
    dense: bool | None = None

    def validate(self) -> None:
        """Check the field types and the block range."""
        if self.blocks is not None:
            _check_range("TokenStream", "blocks", self.blocks)
        for name in ("prop_attn", "trace_source"):
            _check_bool("TokenStream", name, getattr(self, name))
        if self.dense is not None:
            _check_bool("TokenStream", "dense", self.dense)
