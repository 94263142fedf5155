"""Generic adapter: a stack of plain pre-norm transformer blocks.

A block is any module with ``attn`` and ``mlp`` sub-modules that it calls on
``(B, N, C)`` tokens; the stack is an `nn.ModuleList`/`nn.Sequential` of them, or a
module whose ``blocks`` attribute is one. The plan is computed from each block's
input; attention and MLP run on the merged tokens and are unmerged right after
(ToMeSD-style merging around each sub-layer). The plan between a block's hooks is
held per thread (`tokenmerge.hooks.PlanSlot`), so threads may share one merged stack.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet, PlanSlot, merge_around
from ..state import MergeState
from .base import Adapter

__all__ = ["BlockStackAdapter", "block_stack"]


def block_stack(target: Any) -> list[nn.Module] | None:
    """The blocks of ``target`` if it is a stack of ``attn``/``mlp`` blocks, else None."""
    stack = getattr(target, "blocks", target)
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
        return None
    blocks = list(stack)
    if all(
        isinstance(getattr(b, "attn", None), nn.Module) and isinstance(getattr(b, "mlp", None), nn.Module)
        for b in blocks
    ):
        return blocks
    return None


class BlockStackAdapter(Adapter):
    """Merges around ``attn`` and ``mlp`` of every block of a plain transformer stack.

    Reads ``config.merge_attn`` and ``config.merge_mlp``, and from ``config.options``:
    ``protected`` (prefix tokens never merged, default 0) and ``grid`` (``(h, w)`` of
    the patch tokens, needed by grid matchers when N is not square).
    """

    name = "blocks"
    supported = ("a stack of transformer blocks with .attn and .mlp",)

    def accepts(self, target: Any) -> bool:
        """True for an `nn.Module` whose blocks all have ``attn`` and ``mlp``."""
        return isinstance(target, nn.Module) and block_stack(target) is not None

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject options a plain block stack cannot honour."""
        check(
            not config.merge_crossattn,
            "merge_crossattn must be False: plain transformer blocks have no cross-attention",
        )
        check(not config.kv_only, "kv_only is not supported by the generic block adapter; use merge_attn/merge_mlp")
        check(config.blocks is None, "blocks (residual-stream merging) is not supported by the generic block adapter")
        protected = config.options.get("protected", 0)
        check(
            isinstance(protected, int) and protected >= 0,
            f"options['protected'] must be an int >= 0; got {protected!r}",
        )
        if not (config.merge_attn or config.merge_mlp):
            raise TokenMergeError("merge_attn or merge_mlp must be True: otherwise nothing merges")

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook every block: plan on entry, merge around the chosen sub-layers."""
        blocks = block_stack(target)
        assert blocks is not None
        protected = config.options.get("protected", 0)
        grid = config.options.get("grid")
        for index, block in enumerate(blocks):
            slot = PlanSlot()
            hooks.pre(block, _plan_hook(state, slot, f"blocks.{index}", index, len(blocks), grid, protected))
            hooks.post(block, _clear_hook(slot), always_call=True)
            if config.merge_attn:
                merge_around(hooks, block.attn, slot, config.mode)
            if config.merge_mlp:
                merge_around(hooks, block.mlp, slot, config.mode)


class _PlanHook:
    """A block's forward pre-hook: the plan of this call, into the (per-thread) slot."""

    def __init__(self, state: MergeState, slot: PlanSlot, key: str, index: int, count: int, grid: Any, protected: int):
        self.state, self.slot, self.key, self.index, self.count = state, slot, key, index, count
        self.grid, self.protected = grid, protected

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))  # (B, N, C)
        self.slot.plan = self.state.plan(
            self.key, x, layer_index=self.index, num_layers=self.count, grid=self.grid, protected=self.protected
        )


class _ClearHook:
    """A block's forward hook: forget the plan once the block has run."""

    def __init__(self, slot: PlanSlot) -> None:
        self.slot = slot

    def __call__(self, *_: Any) -> None:
        self.slot.plan = None


def _plan_hook(state: MergeState, slot: PlanSlot, key: str, index: int, count: int, grid: Any, protected: int) -> Any:
    return _PlanHook(state, slot, key, index, count, grid, protected)


def _clear_hook(slot: PlanSlot) -> Any:
    return _ClearHook(slot)
