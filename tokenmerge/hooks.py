"""Attaching merges to modules with PyTorch hooks, never by rewriting a forward.

Removing the hooks restores the module exactly: nothing else is touched.

`torch.compile` and hooks: by default dynamo does not guard on a module's hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so code compiled for one instance
of a block class is reused for another instance whose hooks differ, or after hooks are
removed — merging would then silently run where it should not, or not where it should
(this happens as soon as a graph break makes dynamo compile blocks as frames of their
own, as cached policies do). Registering a hook through `HookSet` therefore turns those
guards on for the process (once; see `guard_hooks_under_compile`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .plan import MergeMode, MergePlan

__all__ = ["HookSet", "PlanSlot", "merge_around", "guard_hooks_under_compile"]


class HookSet:
    """The hooks one `apply` registered, removable together."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep ``handle`` for `remove` (and make `torch.compile` guard on hooks)."""
        guard_hooks_under_compile()
        self.handles.append(handle)
        return handle

    def pre(self, module: nn.Module, hook: Callable[..., Any], *, prepend: bool = False) -> RemovableHandle:
        """Register a forward pre-hook with kwargs on ``module``."""
        return self.add(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend))

    def post(self, module: nn.Module, hook: Callable[..., Any], *, always_call: bool = False) -> RemovableHandle:
        """Register a forward hook with kwargs on ``module``."""
        return self.add(module.register_forward_hook(hook, with_kwargs=True, always_call=always_call))

    def remove(self) -> None:
        """Remove every hook, newest first."""
        while self.handles:
            self.handles.pop().remove()

    def __len__(self) -> int:
        return len(self.handles)


_HOOK_GUARDS_ON = False


def guard_hooks_under_compile() -> None:
    """Make `torch.compile` guard on nn.Module hooks: compiled code then never outlives a
    hook change nor serves a module whose hooks differ (see the module docstring).

    Sets ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` once per process; the
    cost is a few more guard checks per compiled call.
    """
    global _HOOK_GUARDS_ON
    if _HOOK_GUARDS_ON:
        return
    import torch._dynamo.config as dynamo_config

    if getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        dynamo_config.skip_nnmodule_hook_guards = False
    _HOOK_GUARDS_ON = True


class PlanSlot:
    """Holds the plan of the block currently running, between its hooks."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: MergePlan | None = None


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> tuple[Tensor | None, bool]:
    if args and isinstance(args[0], Tensor):
        return args[0], True
    value = kwargs.get(name)
    return (value, False) if isinstance(value, Tensor) else (None, False)


def merge_around(
    hooks: HookSet,
    module: nn.Module,
    slot: PlanSlot,
    mode: MergeMode = "mean",
    input_name: str = "hidden_states",
) -> None:
    """Merge ``module``'s token input with ``slot.plan`` and unmerge its output.

    The input is the first positional argument, or the keyword ``input_name``. The
    output (or the first element of a tuple output) is unmerged back to N tokens.
    A module called while ``slot.plan`` is None, or with an input the plan does not fit
    (another batch size or token count, e.g. a chunked feed-forward), runs unchanged, and
    only an output whose input was merged is unmerged.
    """

    merged_call = [False]  # whether the running call's input was merged (modules are not re-entered)

    def merge_input(
        _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        plan = slot.plan
        merged_call[0] = False
        x, positional = _first_tensor(args, kwargs, input_name)
        if plan is None or x is None or x.dim() != 3 or x.shape[:2] != (plan.batch, plan.num_in):
            return None
        merged_call[0] = True
        merged = plan.merge(x, mode=mode)
        if positional:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, input_name: merged}

    def unmerge_output(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        plan = slot.plan
        if plan is None or not merged_call[0]:
            return None
        merged_call[0] = False
        if isinstance(output, Tensor):
            return plan.unmerge(output) if output.dim() == 3 and output.shape[1] == plan.num_out else None
        if (
            isinstance(output, tuple)
            and output
            and isinstance(output[0], Tensor)
            and output[0].shape[1] == plan.num_out
        ):
            return (plan.unmerge(output[0]), *output[1:])
        return None

    hooks.pre(module, merge_input)
    hooks.post(module, unmerge_output)
