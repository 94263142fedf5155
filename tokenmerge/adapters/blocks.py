"""Generic adapter: a stack of plain pre-norm transformer blocks.

A block is any module with ``attn`` and ``mlp`` sub-modules that it calls on
``(B, N, C)`` tokens, or one whose class has a registered `BlockSpec`
(`tokenmerge.adapters.specs`: its token argument and the names of its sub-layers); the
stack is an `nn.ModuleList`/`nn.Sequential` of them, or a module whose ``blocks``
attribute is one. The plan is computed from each block's input; the sub-layers the
`SubLayers` placement chooses run on the merged tokens and are unmerged right after
(ToMeSD-style merging around each sub-layer). The plan between a block's hooks is
held per thread (`tokenmerge.hooks.PlanSlot`), so threads may share one merged stack.

Each block call describes its ``(B, N, C)`` tokens to the runtime by a
`~tokenmerge.layout.TokenLayout` (`stack_layout`): ``SubLayers.protected`` prefix tokens
never merged, then the mergeable span on ``SubLayers.grid`` when it is given. Without a
grid the span is taken to be a square ``(s, s)`` patch grid when its length is a
perfect square (the convention of this adapter since it existed), and otherwise a
sequence ``(n,)``; grid matchers (`RandomGrid`, `StridedGrid`) need a grid, so a span
that forms none raises `TokenMergeError` naming ``SubLayers.grid``, and so does a
``grid`` that does not cover the span.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

from torch import nn

from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet, PlanSlot, merge_around
from ..layout import TokenLayout
from ..placements import SubLayers, TokenStream
from ..policies.matchers import RandomGrid
from ..state import MergeState
from .base import Adapter, check_layer_counts
from .specs import Argument, BlockSpec, block_call, block_spec

__all__ = ["BlockStackAdapter", "block_stack", "stack_layout", "GENERIC_BLOCK"]

#: The spec of a block without one of its own: tokens in its first argument, ``attn`` and ``mlp``.
GENERIC_BLOCK = BlockSpec(
    hidden=None, context=None, mask=None, self_attention="attn", cross_attention=None, feed_forward="mlp"
)


def _spec_of(block: nn.Module) -> BlockSpec:
    return block_spec(block) or GENERIC_BLOCK


def stack_layout(
    num_tokens: int, protected: int = 0, grid: tuple[int, ...] | None = None, matcher: Any = None
) -> TokenLayout:
    """The `TokenLayout` of a block call on ``num_tokens`` tokens under a `SubLayers` placement.

    Checked at every block call, since a stack's token count is known only then (a few
    int comparisons, no tensor op).

    Args:
        num_tokens: N, the tokens the block gets (the protected ones included).
        protected: `SubLayers.protected`, prefix tokens never merged.
        grid: `SubLayers.grid`, the mergeable span's grid; None for a square ``(s, s)``
            when ``N - protected`` is a perfect square, else a sequence ``(N - protected,)``.
        matcher: the config's matcher; a grid matcher (`RandomGrid`, `StridedGrid`)
            refuses a span that forms no grid, or a square grid smaller than its cell.

    Raises:
        TokenMergeError: naming ``SubLayers.protected`` or ``SubLayers.grid`` (or the
            matcher's cell) when they do not fit ``num_tokens``.
    """
    mergeable = num_tokens - protected
    if mergeable < 1:
        raise TokenMergeError(
            f"SubLayers.protected must be less than the block's {num_tokens} tokens (it must leave tokens to "
            f"merge); got protected={protected}"
        )
    if grid is not None:
        if math.prod(grid) != mergeable:
            raise TokenMergeError(
                f"SubLayers.grid must cover the {mergeable} tokens after the {protected} protected ones "
                f"(the blocks get {num_tokens}); got grid={grid}, which covers {math.prod(grid)}"
            )
        return TokenLayout(grid, prefix=protected)
    side = math.isqrt(mergeable)
    grid_matcher = isinstance(matcher, RandomGrid)
    if side * side != mergeable:
        if grid_matcher:
            raise TokenMergeError(
                f"SubLayers.grid must be given for {type(matcher).__name__}: the {mergeable} tokens after the "
                f"{protected} protected ones do not form a square; pass SubLayers(grid=(h, w))"
            )
        return TokenLayout.sequence(mergeable, prefix=protected)
    if grid_matcher and not matcher.fits((side, side)):
        raise TokenMergeError(
            f"{type(matcher).__name__}(sx={matcher.sx}, sy={matcher.sy}) does not fit the block's {side} x {side} "
            "token grid: no cell would be full and nothing would merge; use a smaller cell or pass "
            "SubLayers(grid=(h, w))"
        )
    return TokenLayout.image(side, side, prefix=protected)


def block_stack(target: Any) -> list[nn.Module] | None:
    """The blocks of ``target`` if it is a stack of ``attn``/``mlp`` blocks (or blocks with a spec), else None."""
    stack = getattr(target, "blocks", target)
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
        return None
    blocks = list(stack)

    def usable(block: nn.Module) -> bool:
        spec = block_spec(block)
        if spec is None:  # the generic form: both sub-layers present
            return isinstance(getattr(block, "attn", None), nn.Module) and isinstance(
                getattr(block, "mlp", None), nn.Module
            )
        return any(spec.sublayer(block, role) is not None for role in ("self_attention", "feed_forward"))

    if all(usable(b) for b in blocks):
        return blocks
    return None


#: Words in an argument or parameter name that mark attention tied to token positions
#: (rotary embeddings, relative-position biases): merged tokens no longer have one position.
_POSITION_WORDS = ("rope", "rotary", "freqs_cis", "rel_pos", "relative_position", "position_bias", "pos_bias")


def _position_dependence(block: nn.Module, attn: nn.Module, spec: BlockSpec | None) -> str | None:
    """Why ``block``'s attention ``attn`` depends on token positions (a rotary or relative-position input), or None."""
    if spec is not None and spec.rotary is not None:
        return f"its BlockSpec names a rotary-embedding argument {spec.rotary!r}"
    for module in (block, attn):
        try:
            names = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):  # a builtin forward: nothing to read
            names = []
        for name in names:
            if any(word in name.lower() for word in _POSITION_WORDS):
                return f"{type(module).__name__}.forward takes {name!r}"
    for name, _ in [*attn.named_parameters(), *attn.named_buffers()]:
        if any(word in name.lower() for word in _POSITION_WORDS):
            return f"its attention {type(attn).__name__} holds {name!r}"
    return None


def _class_name(module: nn.Module) -> str:
    """``module``'s class with its module path (``timm.models.beit.Block``): a bare name can be ambiguous."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


class BlockStackAdapter(Adapter):
    """Merges around the sub-layers of every block of a plain transformer stack.

    The placement it takes is `SubLayers` (the default; `TokenStream` runs as
    ``SubLayers(attn=True)``, see `sub_layers`): ``attn``, ``mlp`` (and
    ``cross_attn`` for blocks whose `BlockSpec` names a cross-attention), ``protected``
    (prefix tokens never merged, default 0) and ``grid`` (``(h, w)`` of the patch
    tokens, needed by grid matchers when N is not square): together the
    `~tokenmerge.layout.TokenLayout` of every block call (`stack_layout`). The
    deprecated ``options['protected'|'grid']`` still reach those fields.
    """

    name = "blocks"
    supported = ("a stack of transformer blocks with .attn and .mlp",)
    placements = (SubLayers, TokenStream)

    def sub_layers(self, target: Any, config: MergeConfig, warn: bool = False) -> SubLayers:
        """The `SubLayers` placement in effect on ``target``.

        `TokenStream` (what `ToMe` builds) keeps the meaning it had here before
        placements existed: merging around each block's self-attention,
        ``SubLayers(attn=True)``. Generic blocks offer no way to carry token sizes or an
        attention bias, so ToMe's residual stream cannot be honoured; ``warn`` says so
        with a `DeprecationWarning`.
        """
        placement = self.placement(target, config)
        if isinstance(placement, SubLayers):
            return placement
        assert isinstance(placement, TokenStream)
        check(
            placement.blocks is None,
            f"TokenStream.blocks is not supported by the generic block adapter; got {placement.blocks}",
        )
        if warn:
            warnings.warn(
                "TokenStream on a generic block stack runs as SubLayers(attn=True) (merging around self-attention, "
                "as before placements existed); pass placement=SubLayers(...) to say so",
                DeprecationWarning,
                stacklevel=4,
            )
        return SubLayers(attn=True)

    def accepts(self, target: Any) -> bool:
        """True for an `nn.Module` whose blocks all have ``attn`` and ``mlp``."""
        return isinstance(target, nn.Module) and block_stack(target) is not None

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject placements and settings a plain block stack cannot honour."""
        placement = self.sub_layers(target, config, warn=True)
        blocks = block_stack(target)
        assert blocks is not None
        for role, wanted, field in (
            ("self_attention", placement.attn, "attn"),
            ("cross_attention", placement.cross_attn, "cross_attn"),
            ("feed_forward", placement.mlp, "mlp"),
        ):
            old = {"attn": "merge_attn", "cross_attn": "merge_crossattn", "mlp": "merge_mlp"}[field]
            if wanted:
                check(
                    all(_spec_of(b).sublayer(b, role) is not None for b in blocks),
                    f"{old} must be False (SubLayers.{field}): the blocks of this stack have no "
                    f"{role.replace('_', '-')} layer",
                )
        for index, block in enumerate(blocks):
            for role, wanted in (("self_attention", placement.attn), ("cross_attention", placement.cross_attn)):
                attn = _spec_of(block).sublayer(block, role) if wanted else None
                reason = _position_dependence(block, attn, block_spec(block)) if attn is not None else None
                check(
                    reason is None,
                    f"the generic block adapter cannot merge around the attention of {_class_name(block)} "
                    f"(blocks.{index}): {reason}, and merged tokens have no single position (EVA, BEiT, Swin and "
                    "other rotary or relative-position attention are not supported); merge around mlp only "
                    "(SubLayers(attn=False, mlp=True)) or register a BlockSpec and adapter for this family",
                )
        matcher = config.matcher
        if placement.grid is not None and isinstance(matcher, RandomGrid):
            sx, sy, st = matcher.sx, matcher.sy, matcher.st
            check(
                matcher.fits(placement.grid),
                f"SubLayers.grid={placement.grid} is smaller than a cell of {type(config.matcher).__name__}"
                f"(sx={sx}, sy={sy}, st={st}): no cell would be full and nothing would merge; "
                "the cell must fit the grid (sx <= w, sy <= h, st == 1 on an image grid)",
            )
        check_layer_counts(config, len(blocks), f"the block stack merges in {len(blocks)} blocks")

    def family(self, target: Any) -> str:
        """``"a block stack"``, for error messages."""
        return "a block stack"

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook every block: plan on entry, merge around the chosen sub-layers."""
        blocks = block_stack(target)
        assert blocks is not None
        placement = self.sub_layers(target, config)
        tokens = _Tokens(placement.protected, placement.grid, config.matcher)
        for index, block in enumerate(blocks):
            spec = _spec_of(block)
            hidden = block_call(block, spec).hidden
            slot = PlanSlot()
            hooks.pre(block, _plan_hook(state, slot, f"blocks.{index}", index, len(blocks), tokens, hidden))
            hooks.post(block, _clear_hook(slot), always_call=True)
            for wanted, role in (
                (placement.attn, "self_attention"),
                (placement.cross_attn, "cross_attention"),
                (placement.mlp, "feed_forward"),
            ):
                if wanted:
                    merge_around(hooks, spec.sublayer(block, role), slot, config.mode, input_name=spec.sublayer_input)


class _Tokens:
    """How the placement describes a block call's tokens: `stack_layout`'s arguments but N."""

    def __init__(self, protected: int, grid: tuple[int, ...] | None, matcher: Any) -> None:
        self.protected, self.grid, self.matcher = protected, grid, matcher

    def layout(self, num_tokens: int) -> TokenLayout:
        """The layout of a call on ``num_tokens`` tokens (a Python value: no operator)."""
        return stack_layout(num_tokens, self.protected, self.grid, self.matcher)


class _PlanHook:
    """A block's forward pre-hook: the plan of this call, into the (per-thread) slot."""

    def __init__(
        self, state: MergeState, slot: PlanSlot, key: str, index: int, count: int, tokens: _Tokens, hidden: Argument
    ) -> None:
        self.state, self.slot, self.key, self.index, self.count = state, slot, key, index, count
        self.tokens, self.hidden = tokens, hidden

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = self.hidden.get(args, kwargs)  # (B, N, C): the block's token argument, by its spec
        layout = self.tokens.layout(x.shape[1])  # protected prefix, then the grid (or sequence)
        self.slot.plan = self.state.plan(self.key, x, layout=layout, layer_index=self.index, num_layers=self.count)


class _ClearHook:
    """A block's forward hook: forget the plan once the block has run."""

    def __init__(self, slot: PlanSlot) -> None:
        self.slot = slot

    def __call__(self, *_: Any) -> None:
        self.slot.plan = None


def _plan_hook(
    state: MergeState, slot: PlanSlot, key: str, index: int, count: int, tokens: _Tokens, hidden: Argument
) -> Any:
    return _PlanHook(state, slot, key, index, count, tokens, hidden)


def _clear_hook(slot: PlanSlot) -> Any:
    return _ClearHook(slot)
