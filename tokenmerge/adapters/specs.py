"""Block and denoiser specs: how a model family is called, as data registered per class.

An adapter that merges inside transformer blocks needs to know a few facts about each
block class: which argument carries the image tokens, which the text tokens, the
attention mask and the rotary embeddings; which output is which stream; and which
sub-modules are its self-attention, cross-attention and feed-forward layer. A
`BlockSpec` states them, `register_block_spec` files it under the block class, and
`block_spec` finds it for a block (through the class's MRO, so subclasses inherit their
parent's spec). A `DenoiserSpec` does the same for a diffusion model class: how its
blocks are enumerated, its patch size, where the latent and the timestep are in its
call, and which placements it can honour.

The built-in rows for diffusers live in `tokenmerge.adapters.diffusion_specs`; a new
family is a row there (or a `register_*_spec` call in user code) plus only the code its
quirks need. This module imports neither diffusers nor timm.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import TokenMergeError, check
from ..placements import KeyValues, Placement, ResidualRange, SubLayers

__all__ = [
    "BlockSpec",
    "DenoiserSpec",
    "Argument",
    "BlockCall",
    "register_block_spec",
    "block_spec",
    "block_call",
    "register_denoiser_spec",
    "denoiser_spec",
    "registered_denoisers",
    "ROTARY_STYLES",
    "argument_of",
]


#: How a family lays out and applies its rotary table (`BlockSpec.rotary_style`).
ROTARY_STYLES: tuple[str, ...] = ("flux", "wan", "qwen", "cogvideox", "hunyuan")


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value.isidentifier()


def _check_name(owner: str, name: str, value: Any, optional: bool = True) -> None:
    ok = _is_name(value) or (optional and value is None)
    allowed = "None or an identifier" if optional else "an identifier"
    check(ok, f"{owner}.{name} must be {allowed} (an argument or attribute name); got {value!r}")


def _check_index(owner: str, name: str, value: Any) -> None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    check(ok, f"{owner}.{name} must be None or an int >= 0 (a position in the returned tuple); got {value!r}")


@dataclass(frozen=True)
class BlockSpec:
    """How one transformer block class is called and what it is made of.

    Args:
        hidden: the argument that carries the image-stream tokens ``(B, N, C)``; None:
            the first argument of ``forward``, whatever its name.
        context: the text-stream argument (``encoder_hidden_states``), None if none.
        mask: the self-attention mask argument, None if none. A call that passes a mask
            runs self-attention unmerged (the mask would not fit merged tokens).
        rotary: the rotary-embedding argument, None if none (read by families that
            carry rotary embeddings through a merge).
        hidden_output: where the image stream is in the block's output: None when the
            block returns it as a tensor, else its index in the returned tuple.
        context_output: the text stream's index in a returned tuple, None if the block
            does not return it.
        self_attention, cross_attention, feed_forward: attribute names of the
            sub-modules (None: the block has none). `SubLayers` merges around them.
        sublayer_input: the keyword a sub-module takes its tokens by when they are not
            passed positionally.
        key_value_argument: the self-attention's keyword for separate keys and values
            (``encoder_hidden_states`` in diffusers' ``Attention``); None when it has
            none (joint attention merges keys and values at its projections instead).
        text_order: for blocks whose self-attention is *joint* (MM-DiT: text and image
            tokens attend together): where the text tokens sit in the attention's
            sequence, ``"before"`` the image tokens (Flux, Qwen-Image, CogVideoX,
            HunyuanVideo) or ``"after"`` them (SD3). None: the self-attention sees image
            tokens only (cross-attention families, Wan).
        concatenated: the block itself concatenates text and image tokens (in
            ``text_order``) and runs its attention and feed-forward on the joint sequence
            (Flux's and HunyuanVideo's single-stream blocks); the text span is then a
            protected prefix (or suffix) of that sequence. False: the attention takes the
            image tokens as ``sublayer_input`` and the text as ``key_value_argument``-like
            ``attention_context`` (dual-stream blocks).
        attention_context: the joint attention's keyword for the text stream (dual-stream
            blocks), None if it has none.
        attention_rotary: the attention module's keyword for the rotary table (None: no
            rotary embeddings reach the attention).
        rotary_text: whether the rotary table covers the text tokens too (Flux: the
            table spans ``[text | image]`` in ``text_order``), or the image tokens only.
        image_attention: a second self-attention over the image tokens alone (SD3.5's
            ``attn2``), merged like the joint one; None if none.
        context_mask: the joint attention's keyword for a text padding mask from which
            its processor builds the joint mask over ``[text | image]`` keys (Qwen-Image's
            ``encoder_hidden_states_mask``); None if none.
        joint_mask: whether the joint attention's processor applies an
            ``attention_mask`` (needed for proportional attention); SD3's does not.
        rotary_style: how the table is laid out and applied (`ROTARY_STYLES`):
            ``"flux"``, a ``(cos, sin)`` pair of ``(S, D)`` tables applied to
            ``(B, S, heads, D)`` queries and keys with interleaved pairs; its queries
            and keys are read at ``norm_q``/``norm_k`` (``norm_added_q``/``norm_added_k``
            for the text stream), where the tables are applied per token; ``"wan"``, a
            pair of ``(1, S, 1, D)`` tables applied to the ``(B, S, heads * D)`` outputs
            of Wan's query/key norms, split into heads; ``"qwen"``, a pair ``(image
            freqs, text freqs)`` of complex ``(N, D/2)`` and ``(T, D/2)`` tables applied
            to ``(B, S, heads, D)`` (Qwen-Image); ``"cogvideox"``, ``(cos, sin)`` over
            the video tokens only, ``(N, D)``, applied to the video part of ``(B, heads,
            T + N, D)`` queries and keys; ``"hunyuan"``, ``(cos, sin)`` ``(N, D)`` over the
            video tokens, applied to their part of ``(B, S, heads, D)`` queries and keys.
        joint_feed_forward: the block runs its feed-forward on ``[text | image]``
            (CogVideoX) although its attention takes the streams apart: the image span
            is merged around it.
    """

    hidden: str | None = "hidden_states"
    context: str | None = "encoder_hidden_states"
    mask: str | None = "attention_mask"
    rotary: str | None = None
    hidden_output: int | None = None
    context_output: int | None = None
    self_attention: str | None = "attn1"
    cross_attention: str | None = "attn2"
    feed_forward: str | None = "ff"
    sublayer_input: str = "hidden_states"
    key_value_argument: str | None = "encoder_hidden_states"
    text_order: str | None = None
    concatenated: bool = False
    attention_context: str | None = None
    attention_rotary: str | None = None
    rotary_text: bool = False
    rotary_style: str = "flux"
    image_attention: str | None = None
    joint_mask: bool = True
    context_mask: str | None = None
    joint_feed_forward: bool = False

    @property
    def joint(self) -> bool:
        """Whether the block's self-attention is joint (text and image tokens attend together)."""
        return self.text_order is not None

    @property
    def attention_hooks(self) -> bool:
        """Whether merging reaches inside the self-attention (joint attention or rotary tables)."""
        return self.joint or self.attention_rotary is not None

    def __post_init__(self) -> None:
        for name in ("hidden", "context", "mask", "rotary", "self_attention", "cross_attention", "feed_forward"):
            _check_name("BlockSpec", name, getattr(self, name))
        _check_name("BlockSpec", "sublayer_input", self.sublayer_input, optional=False)
        _check_name("BlockSpec", "key_value_argument", self.key_value_argument)
        _check_name("BlockSpec", "attention_context", self.attention_context)
        _check_name("BlockSpec", "image_attention", self.image_attention)
        _check_name("BlockSpec", "context_mask", self.context_mask)
        check(
            isinstance(self.joint_feed_forward, bool),
            f"BlockSpec.joint_feed_forward must be a bool; got {self.joint_feed_forward!r}",
        )
        check(isinstance(self.joint_mask, bool), f"BlockSpec.joint_mask must be a bool; got {self.joint_mask!r}")
        _check_name("BlockSpec", "attention_rotary", self.attention_rotary)
        check(
            self.text_order in (None, "before", "after"),
            f"BlockSpec.text_order must be None, 'before' or 'after'; got {self.text_order!r}",
        )
        check(isinstance(self.concatenated, bool), f"BlockSpec.concatenated must be a bool; got {self.concatenated!r}")
        check(
            not self.concatenated or self.text_order is not None,
            "BlockSpec.concatenated needs text_order ('before' or 'after'): where the block puts the text tokens",
        )
        check(isinstance(self.rotary_text, bool), f"BlockSpec.rotary_text must be a bool; got {self.rotary_text!r}")
        check(
            self.rotary_style in ROTARY_STYLES,
            f"BlockSpec.rotary_style must be one of {', '.join(ROTARY_STYLES)}; got {self.rotary_style!r}",
        )
        _check_index("BlockSpec", "hidden_output", self.hidden_output)
        _check_index("BlockSpec", "context_output", self.context_output)
        check(
            self.context_output is None or self.context_output != self.hidden_output,
            f"BlockSpec.context_output must differ from hidden_output; both are {self.hidden_output!r}",
        )

    def sublayer(self, block: nn.Module, role: str) -> nn.Module | None:
        """``block``'s sub-module for ``role``: ``"self_attention"``, ``"cross_attention"`` or ``"feed_forward"``."""
        name = getattr(self, role)
        module = getattr(block, name, None) if name is not None else None
        return module if isinstance(module, nn.Module) else None


@dataclass(frozen=True)
class Argument:
    """One argument of a call: its name and its position (None when it can only be passed by keyword).

    Attributes:
        name: the parameter name.
        index: its position among the positional parameters (``self`` not counted).
    """

    name: str
    index: int | None

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The value the call received (None if absent)."""
        if self.index is not None and len(args) > self.index:
            return args[self.index]
        return kwargs.get(self.name)

    def replace(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> tuple[tuple[Any, ...], dict]:
        """``(args, kwargs)`` with this argument set to ``value`` where the call passed it (as a keyword if absent)."""
        if self.index is not None and len(args) > self.index:
            return (*args[: self.index], value, *args[self.index + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


@dataclass(frozen=True)
class BlockCall:
    """A `BlockSpec` bound to a block class's ``forward`` signature: arguments with their positions.

    Attributes:
        spec: the spec.
        hidden: the image-stream argument.
        context, mask, rotary: the other arguments, None where the spec has none.
    """

    spec: BlockSpec
    hidden: Argument
    context: Argument | None
    mask: Argument | None
    rotary: Argument | None

    def image_output(self, output: Any) -> Tensor | None:
        """The image stream in a block's ``output`` (None when it is not where the spec says)."""
        index = self.spec.hidden_output
        if index is None:
            return output if isinstance(output, Tensor) else None
        if isinstance(output, tuple) and len(output) > index and isinstance(output[index], Tensor):
            return output[index]
        return None

    def with_image_output(self, output: Any, image: Tensor) -> Any:
        """``output`` with its image stream replaced by ``image``."""
        index = self.spec.hidden_output
        if index is None:
            return image
        return (*output[:index], image, *output[index + 1 :])


def _parameters(cls: type) -> tuple[list[inspect.Parameter], bool]:
    forward = getattr(cls, "forward", None)
    check(callable(forward), f"block class {cls.__qualname__} has no forward method")
    params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)], var_keyword


def argument_of(cls: type, name: str) -> Argument | None:
    """``name`` as an `Argument` of ``cls.forward`` (its position if it can be passed positionally); None if absent."""
    params, var_keyword = _parameters(cls)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if name in positional:
        return Argument(name, positional.index(name))
    if name in {p.name for p in params} or var_keyword:
        return Argument(name, None)
    return None


_BOUND: weakref.WeakKeyDictionary[type, dict[BlockSpec, BlockCall]] = weakref.WeakKeyDictionary()


def _bind(spec: BlockSpec, cls: type) -> BlockCall:
    bound = _BOUND.setdefault(cls, {})
    if spec not in bound:
        bound[spec] = _bind_new(spec, cls)
    return bound[spec]


def _bind_new(spec: BlockSpec, cls: type) -> BlockCall:
    params, var_keyword = _parameters(cls)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params}
    signature = f"{cls.__qualname__}.forward({', '.join(p.name for p in params)})"

    def argument(field: str, name: str | None) -> Argument | None:
        if name is None:
            return None
        check(
            name in names or var_keyword,
            f"BlockSpec.{field} {name!r} is not an argument of {signature}",
        )
        return Argument(name, positional.index(name) if name in positional else None)

    hidden_name = spec.hidden if spec.hidden is not None else (positional[0] if positional else None)
    check(hidden_name is not None, f"BlockSpec.hidden is None but {signature} takes no positional argument")
    hidden = argument("hidden", hidden_name)
    assert hidden is not None
    return BlockCall(
        spec=spec,
        hidden=hidden,
        context=argument("context", spec.context),
        mask=argument("mask", spec.mask),
        rotary=argument("rotary", spec.rotary),
    )


# ---------------------------------------------------------------------------- registries
_BLOCK_SPECS: weakref.WeakKeyDictionary[type, BlockSpec] = weakref.WeakKeyDictionary()
_DENOISER_SPECS: weakref.WeakKeyDictionary[type, DenoiserSpec] = weakref.WeakKeyDictionary()


def _lookup(registry: weakref.WeakKeyDictionary[type, Any], cls: type) -> Any:
    for base in cls.__mro__:
        found = registry.get(base)
        if found is not None:
            return found
    return None


def register_block_spec(block_cls: type, spec: BlockSpec) -> BlockSpec:
    """File ``spec`` under ``block_cls`` (replacing an earlier one); subclasses inherit it.

    The spec is checked against ``block_cls.forward`` now: an argument it names that the
    signature lacks is a `TokenMergeError`.
    """
    check(isinstance(block_cls, type), f"block_cls must be a class; got {block_cls!r}")
    check(isinstance(spec, BlockSpec), f"spec must be a tokenmerge.adapters.specs.BlockSpec; got {spec!r}")
    _bind(spec, block_cls)
    _BLOCK_SPECS[block_cls] = spec
    return spec


def block_spec(block: type | nn.Module) -> BlockSpec | None:
    """The spec registered for ``block``'s class or its nearest base class in the MRO; None if none."""
    cls = block if isinstance(block, type) else type(block)
    return _lookup(_BLOCK_SPECS, cls)


def block_call(block: nn.Module, spec: BlockSpec | None = None) -> BlockCall:
    """``spec`` (by default ``block``'s registered spec) bound to ``block``'s ``forward`` signature."""
    spec = spec if spec is not None else block_spec(block)
    if spec is None:
        raise TokenMergeError(f"block {type(block).__qualname__} has no registered BlockSpec")
    return _bind(spec, type(block))


# ---------------------------------------------------------------------------- denoisers
#: A denoiser's blocks: ``(module path, block, level)``, level = 2x downsamplings from the latent.
SiteList = Iterable[tuple[str, nn.Module, int]]


@dataclass(frozen=True)
class DenoiserSpec:
    """How a diffusion model class is called and where its transformer blocks are.

    Args:
        kind: a short family name (``"unet"``, ``"dit"``, ``"pixart"``).
        blocks: the attribute whose sub-modules with a registered `BlockSpec` are the
            blocks, all at the latent's resolution (level 0, e.g.
            ``"transformer_blocks"``), or a function ``model -> [(path, block, level)]``
            for models with several resolutions (UNets).
        patch_size: latent pixels per token side: an int, or the name of the
            ``model.config`` entry that holds it.
        latent: the ``forward`` argument that carries the latent ``(B, C, H, W)``.
        timestep: the ``forward`` argument that carries the timestep.
        placements: the placements the family can honour; the first is its default.
        grid_ids: a ``forward`` argument with one position row per image token (Flux's
            ``img_ids``, ``(N, 3)``: frame, row, column): the token grid is read from it
            (its largest row and column), for models whose latent arrives packed as
            ``(B, N, C)``. None: the grid follows the latent's shape, ``(B, C, H, W)``
            or, for video, ``(B, C, F, H, W)`` (or ``(B, F, C, H, W)``, `frames_first`).
        grid_shapes: a ``forward`` argument with each sample's token grids, a list per
            sample of ``(frames, rows, columns)`` (Qwen-Image's ``img_shapes``): the token
            grid is the first sample's first entry (in tokens, so ``patch_size`` 1).
        patch_size_t: latent frames per token for video models: an int, the name of the
            ``model.config`` entry that holds it, or None (1).
        frames_first: the video latent is ``(B, F, C, H, W)`` (CogVideoX) instead of
            ``(B, C, F, H, W)``.
        timestep_scale: what the model's timestep argument is multiplied by to get the
            scheduler's timestep (Flux pipelines pass ``t / 1000``: 1000), so steps are
            placed on the scheduler's schedule.
    """

    kind: str
    blocks: str | Callable[[nn.Module], SiteList] = "transformer_blocks"
    patch_size: int | str = 1
    latent: str = "hidden_states"
    timestep: str = "timestep"
    placements: tuple[type[Placement], ...] = (SubLayers, KeyValues, ResidualRange)
    grid_ids: str | None = None
    grid_shapes: str | None = None
    patch_size_t: int | str | None = None
    frames_first: bool = False
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_name("DenoiserSpec", "grid_ids", self.grid_ids)
        _check_name("DenoiserSpec", "grid_shapes", self.grid_shapes)
        ok = (
            self.patch_size_t is None
            or _is_name(self.patch_size_t)
            or (
                isinstance(self.patch_size_t, int)
                and not isinstance(self.patch_size_t, bool)
                and self.patch_size_t >= 1
            )
        )
        check(
            ok, f"DenoiserSpec.patch_size_t must be None, an int >= 1 or a config entry name; got {self.patch_size_t!r}"
        )
        check(
            isinstance(self.frames_first, bool), f"DenoiserSpec.frames_first must be a bool; got {self.frames_first!r}"
        )
        ok = isinstance(self.timestep_scale, (int, float)) and not isinstance(self.timestep_scale, bool)
        check(
            ok and self.timestep_scale > 0,
            f"DenoiserSpec.timestep_scale must be a number > 0; got {self.timestep_scale!r}",
        )
        check(isinstance(self.kind, str) and self.kind, f"DenoiserSpec.kind must be a non-empty str; got {self.kind!r}")
        check(
            _is_name(self.blocks) or callable(self.blocks),
            f"DenoiserSpec.blocks must be an attribute name or a function model -> sites; got {self.blocks!r}",
        )
        ok = _is_name(self.patch_size) or (
            isinstance(self.patch_size, int) and not isinstance(self.patch_size, bool) and self.patch_size >= 1
        )
        check(ok, f"DenoiserSpec.patch_size must be an int >= 1 or a config entry name; got {self.patch_size!r}")
        _check_name("DenoiserSpec", "latent", self.latent, optional=False)
        _check_name("DenoiserSpec", "timestep", self.timestep, optional=False)
        ok = (
            isinstance(self.placements, tuple)
            and len(self.placements) > 0
            and all(isinstance(p, type) and issubclass(p, Placement) for p in self.placements)
        )
        check(ok, f"DenoiserSpec.placements must be a non-empty tuple of Placement classes; got {self.placements!r}")

    def sites(self, model: nn.Module) -> list[tuple[str, nn.Module, int]]:
        """``(path, block, level)`` of every transformer block of ``model``, in execution order."""
        if callable(self.blocks):
            return list(self.blocks(model))
        container = getattr(model, self.blocks, None)
        if not isinstance(container, nn.Module):
            return []
        return [(f"{self.blocks}.{path}", block, 0) for path, block in blocks_in(container)]

    def patch_size_of(self, model: nn.Module) -> int:
        """The model's patch size (1 for UNets)."""
        if isinstance(self.patch_size, int):
            return self.patch_size
        value = getattr(model.config, self.patch_size)
        return int(value[-1] if isinstance(value, (tuple, list)) else value)  # Wan: (t, h, w)

    def patch_size_t_of(self, model: nn.Module) -> int:
        """The model's temporal patch size (1 when it has none)."""
        if self.patch_size_t is None:
            return 1
        if isinstance(self.patch_size_t, int):
            return self.patch_size_t
        value = getattr(model.config, self.patch_size_t, None)
        if isinstance(value, (tuple, list)):
            value = value[0]  # Wan: patch_size (t, h, w)
        return int(value) if value else 1

    def grid_ids_argument(self, model: nn.Module, field: str = "grid_ids") -> Argument | None:
        """The `grid_ids` (or `grid_shapes`) argument of ``model.forward`` (None when the spec has none)."""
        name = getattr(self, field)
        if name is None:
            return None
        params, _ = _parameters(type(model))
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if name not in {p.name for p in params}:
            raise TokenMergeError(f"model {type(model).__name__}.forward has no {name} argument (DenoiserSpec.{field})")
        return Argument(name, positional.index(name) if name in positional else None)

    def arguments(self, model: nn.Module) -> tuple[Argument, Argument]:
        """The latent and timestep arguments of ``model.forward``; `TokenMergeError` if either is missing."""
        params, _ = _parameters(type(model))
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = {p.name for p in params}
        found = []
        for field, name in (("latent", self.latent), ("timestep", self.timestep)):
            if name not in names:
                raise TokenMergeError(
                    f"model {type(model).__name__}.forward has no {name} argument (DenoiserSpec.{field}); "
                    + ("cannot track steps" if field == "timestep" else "cannot read the latent size")
                )
            found.append(Argument(name, positional.index(name) if name in positional else None))
        return found[0], found[1]


def blocks_in(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, block)`` of every sub-module of ``module`` with a registered `BlockSpec`, outermost only."""
    found: list[tuple[str, nn.Module]] = []
    for path, sub in module.named_modules():
        if sub is module or block_spec(sub) is None:
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue  # a block inside a block belongs to the outer one
        found.append((path, sub))
    return found


def register_denoiser_spec(model_cls: type, spec: DenoiserSpec) -> DenoiserSpec:
    """File ``spec`` under the denoiser class ``model_cls`` (replacing an earlier one); subclasses inherit it."""
    check(isinstance(model_cls, type), f"model_cls must be a class; got {model_cls!r}")
    check(isinstance(spec, DenoiserSpec), f"spec must be a tokenmerge.adapters.specs.DenoiserSpec; got {spec!r}")
    _DENOISER_SPECS[model_cls] = spec
    return spec


def denoiser_spec(model: type | nn.Module) -> DenoiserSpec | None:
    """The spec registered for ``model``'s class or its nearest base class in the MRO; None if none."""
    cls = model if isinstance(model, type) else type(model)
    return _lookup(_DENOISER_SPECS, cls)


def registered_denoisers() -> tuple[str, ...]:
    """Names of the denoiser classes with a spec, in registration order."""
    return tuple(cls.__name__ for cls in _DENOISER_SPECS.keys())
