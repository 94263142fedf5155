"""Attaching merges to modules with PyTorch hooks, never by rewriting a library's forward.

Removing the hooks restores the module exactly: nothing else is touched. The one
exception to hooks is `HookSet.forward`: an instance-level ``forward`` on one module
(an attention whose kernel call a merge must change, `tokenmerge.attention`), which
calls the class's own ``forward`` whenever it has nothing to change and is deleted by
`HookSet.remove` (the class's ``forward`` is then the module's again, bit for bit).

Who owns what:

* Every hook tokenmerge registers is a `ModuleHook`: a small callable that names the
  `HookSet` (one per `apply`) it belongs to. `tokenmerge.apply` finds the configs
  already present in a model tree through them (so a model and its sub-modules never
  hold two), and a deep copy of a merged model gets a `HookSet` of its own: the copy
  is merged, independent, and `tokenmerge.remove(copy)` removes exactly its hooks.
  Pickling a hooked model raises `TokenMergeError` (remove the config first).
* State of one forward call (the plan between a block's hooks, whether a sub-layer's
  input was merged) is per thread: a `PerThread` (a ``threading.local``) gives each
  thread its own plain object, so threads can run one merged model at once, and it
  traces under ``torch.compile(fullgraph=True)`` without recompiles.

`torch.compile` and hooks: by default dynamo does not guard on a module's hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``), so code compiled for one instance
of a block class is reused for another instance whose hooks differ, or after hooks are
removed — merging would then silently run where it should not, or not where it should
(this happens as soon as a graph break makes dynamo compile blocks as frames of their
own, as cached policies do). While any `HookSet` holds hooks, those guards are therefore
on for the process (see `guard_hooks_under_compile`); the setting is put back as it was
when the last one is removed. Code compiled while no config was active does not guard
on hooks (PyTorch's default): compile after `apply`.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .errors import TokenMergeError, check
from .plan import MergeMode, MergePlan

__all__ = [
    "HookSet",
    "ModuleHook",
    "ModuleForward",
    "PerThread",
    "PlanSlot",
    "merge_around",
    "guard_hooks_under_compile",
    "hook_sets_in",
    "PICKLE_MESSAGE",
]

#: Why a merged model cannot be pickled.
PICKLE_MESSAGE = (
    "a model with tokenmerge hooks cannot be pickled (its hooks hold per-thread runtime state): call "
    "handle.remove() or tokenmerge.remove(model) first, and apply again after loading"
)

# The five dicts of an nn.Module that hold a hook under its handle's id.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class PerThread(threading.local):
    """A ``threading.local`` whose one attribute, `value`, is this thread's ``factory()``.

    Per-call state is a plain object per thread, reached as ``per_thread.value``: each
    thread makes its own on first use. The plain object, not the ``threading.local``,
    carries the attributes that hooks write and read, because that is what
    ``torch.compile`` traces faithfully: attributes written on a ``threading.local``
    itself inside a compiled graph were not kept after it, and a later hook of the same
    graph could read the stale value, while ``value`` is only ever read (per thread, so
    a compiled model called from another thread gets that thread's object).

    A deep copy is a fresh holder (no call in flight is copied); pickling raises
    `TokenMergeError`.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.value = factory()

    def __deepcopy__(self, memo: dict[int, Any]) -> PerThread:
        return PerThread(self.factory)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TokenMergeError(PICKLE_MESSAGE)


def copied_ref(ref: weakref.ref[Any] | None, memo: dict[int, Any]) -> weakref.ref[Any] | None:
    """For a ``__deepcopy__``: a weak reference to the copy of ``ref``'s object, or None when it is not copied."""
    target = ref() if ref is not None else None
    copied = memo.get(id(target)) if target is not None else None
    return weakref.ref(copied) if copied is not None else None


class ModuleHook:
    """A hook registered by tokenmerge: calls ``fn`` and names the `HookSet` it belongs to.

    A deep copy (of the model it sits on) copies ``fn`` with the rest of the model and
    joins the copied `HookSet`, which then removes it from the copied module only.
    """

    __slots__ = ("fn", "owner", "module", "key")

    def __init__(self, fn: Callable[..., Any], owner: HookSet, module: nn.Module, key: int) -> None:
        self.fn = fn
        self.owner = owner
        self.module = weakref.ref(module)
        self.key = key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModuleHook:
        owner = copy.deepcopy(self.owner, memo)
        module = memo.get(id(self.module()))  # the module whose hook dict is being copied (memoised first)
        fn = copy.deepcopy(self.fn, memo)
        hook = ModuleHook.__new__(ModuleHook)
        hook.fn, hook.owner, hook.key = fn, owner, self.key
        hook.module = weakref.ref(module) if module is not None else self.module
        if module is not None:
            owner._track(module, self.key)
        return hook

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TokenMergeError(PICKLE_MESSAGE)


#: The key under which a `HookSet` tracks an instance-level forward (hook handle ids are >= 0).
_FORWARD = -1


class ModuleForward:
    """An instance-level ``forward`` set by `HookSet.forward`: calls ``fn(module, *args, **kwargs)``.

    Like `ModuleHook`, a deep copy (of the model it sits on) calls ``fn``'s copy on the
    copied module and joins the copied `HookSet`.
    """

    __slots__ = ("fn", "owner", "module")

    def __init__(self, fn: Callable[..., Any], owner: HookSet, module: nn.Module) -> None:
        self.fn = fn
        self.owner = owner
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ModuleForward:
        owner = copy.deepcopy(self.owner, memo)
        module = memo.get(id(self.module), self.module)  # the module whose __dict__ is being copied
        new = ModuleForward(copy.deepcopy(self.fn, memo), owner, module)
        owner._track(module, _FORWARD)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TokenMergeError(PICKLE_MESSAGE)


# HookSets that hold hooks now; the dynamo setting they changed, to put back after the last.
_ACTIVE: weakref.WeakSet[HookSet] = weakref.WeakSet()
_SAVED_GUARD_SETTING: list[bool] = []


class HookSet:
    """The hooks one `apply` registered (or a deep copy of them), removable together.

    Attributes:
        meta: ``(config, state, adapter)`` of the `apply` that made it, for a handle of a
            copy; None until `tokenmerge.apply` sets it.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[weakref.ref[nn.Module], int]] = []
        self.meta: tuple[Any, Any, Any] | None = None
        self.handle: weakref.ref[Any] | None = None  # the MergeHandle managing this set, if any

    def _track(self, module: nn.Module, key: int) -> None:
        if not self._entries:
            guard_hooks_under_compile()
            if self not in _ACTIVE:
                _ACTIVE.add(self)
                weakref.finalize(self, _restore_if_idle)  # a model dropped without remove()
        self._entries.append((weakref.ref(module), key))

    def _register(self, module: nn.Module, fn: Callable[..., Any], register: Callable[..., Any], **kw: Any) -> Any:
        hook = ModuleHook(fn, self, module, -1)
        handle = register(hook, with_kwargs=True, **kw)
        hook.key = handle.id
        self._track(module, handle.id)
        return handle

    def pre(self, module: nn.Module, hook: Callable[..., Any], *, prepend: bool = False) -> Any:
        """Register a forward pre-hook with kwargs on ``module``."""
        return self._register(module, hook, module.register_forward_pre_hook, prepend=prepend)

    def post(
        self, module: nn.Module, hook: Callable[..., Any], *, always_call: bool = False, prepend: bool = False
    ) -> Any:
        """Register a forward hook with kwargs on ``module``.

        ``prepend=True`` runs it before the module's other forward hooks, so hooks the
        user registered, before or after `apply`, see the output it returns.
        """
        return self._register(module, hook, module.register_forward_hook, always_call=always_call, prepend=prepend)

    def forward(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """Set ``module.forward`` (on the instance) to call ``fn(module, *args, **kwargs)``.

        ``fn`` computes what the module's class ``forward`` computes, and calls it
        (``type(module).forward(module, ...)``) whenever it has nothing to change; hooks
        on ``module`` run around it as usual. `remove` deletes it.
        """
        check(
            "forward" not in module.__dict__,
            f"{type(module).__qualname__} already has an instance-level forward; tokenmerge cannot replace it",
        )
        module.forward = ModuleForward(fn, self, module)  # type: ignore[method-assign]
        self._track(module, _FORWARD)

    def remove(self) -> None:
        """Remove every hook, newest first; restore process-wide settings after the last set goes."""
        while self._entries:
            ref, key = self._entries.pop()
            module = ref()
            if module is not None and key == _FORWARD:
                if isinstance(module.__dict__.get("forward"), ModuleForward):
                    del module.__dict__["forward"]
            elif module is not None:
                for name in _HOOK_DICTS:
                    getattr(module, name).pop(key, None)
        if self in _ACTIVE:
            _ACTIVE.discard(self)
            _restore_if_idle()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict[int, Any]) -> HookSet:
        # Reached from a copied ModuleHook: the copy starts empty and each copied hook joins it.
        new = HookSet()
        memo[id(self)] = new
        if self.meta is not None:
            config, state, adapter = self.meta
            new.meta = (copy.deepcopy(config, memo), copy.deepcopy(state, memo), adapter)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TokenMergeError(PICKLE_MESSAGE)


def hook_sets_in(model: nn.Module) -> list[HookSet]:
    """The `HookSet`s with a hook anywhere in ``model``'s module tree, in the order found."""
    found: dict[int, HookSet] = {}
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                if isinstance(hook, ModuleHook) and len(hook.owner) > 0:
                    found.setdefault(id(hook.owner), hook.owner)
    return list(found.values())


def guard_hooks_under_compile() -> None:
    """Make `torch.compile` guard on nn.Module hooks: compiled code then never outlives a
    hook change nor serves a module whose hooks differ (see the module docstring).

    Sets ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` and remembers the
    value it had; the last `HookSet.remove` puts it back. The cost is a few more guard
    checks per compiled call.
    """
    import torch._dynamo.config as dynamo_config

    if not _SAVED_GUARD_SETTING:
        _SAVED_GUARD_SETTING.append(bool(getattr(dynamo_config, "skip_nnmodule_hook_guards", False)))
    dynamo_config.skip_nnmodule_hook_guards = False


def _restore_if_idle() -> None:
    """Put the dynamo setting back once no `HookSet` holds hooks."""
    if _SAVED_GUARD_SETTING and not any(True for _ in _ACTIVE):
        import torch._dynamo.config as dynamo_config

        dynamo_config.skip_nnmodule_hook_guards = _SAVED_GUARD_SETTING.pop()


class _Plan:
    def __init__(self) -> None:
        self.plan: MergePlan | None = None


class PlanSlot:
    """Holds the plan of the block currently running, between its hooks; one per thread."""

    def __init__(self) -> None:
        self._per_thread = PerThread(_Plan)

    @property
    def plan(self) -> MergePlan | None:
        """The calling thread's plan of the running block, None between blocks."""
        return self._per_thread.value.plan

    @plan.setter
    def plan(self, plan: MergePlan | None) -> None:
        self._per_thread.value.plan = plan


class _Merged:
    """Whether the running call of a sub-layer had its input merged (one per thread)."""

    def __init__(self) -> None:
        self.merged = False


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> tuple[Tensor | None, bool]:
    if args and isinstance(args[0], Tensor):
        return args[0], True
    value = kwargs.get(name)
    return (value, False) if isinstance(value, Tensor) else (None, False)


class _MergeAround:
    """The two hooks of `merge_around` (an object, so a deep copy of the model copies it)."""

    def __init__(self, slot: PlanSlot, mode: MergeMode, input_name: str) -> None:
        self.slot, self.mode, self.input_name = slot, mode, input_name
        self._per_thread = PerThread(_Merged)  # modules are not re-entered within one thread

    @property
    def call(self) -> _Merged:
        """The calling thread's flag."""
        return self._per_thread.value

    def merge_input(
        self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        plan = self.slot.plan
        call = self.call
        call.merged = False
        x, positional = _first_tensor(args, kwargs, self.input_name)
        if plan is None or x is None or x.dim() != 3 or x.shape[:2] != (plan.batch, plan.num_in):
            return None
        call.merged = True
        merged = plan.merge(x, mode=self.mode)  # (B, N - r, C)
        if positional:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, self.input_name: merged}

    def unmerge_output(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        plan = self.slot.plan
        call = self.call
        if plan is None or not call.merged:
            return None
        call.merged = False
        if isinstance(output, Tensor):
            return plan.unmerge(output) if output.dim() == 3 and output.shape[1] == plan.num_out else None
        if (
            isinstance(output, tuple)
            and output
            and isinstance(output[0], Tensor)
            and output[0].shape[1] == plan.num_out
        ):
            return (plan.unmerge(output[0]), *output[1:])  # (B, N, C) first
        return None


def merge_around(
    hooks: HookSet,
    module: nn.Module,
    slot: PlanSlot,
    mode: MergeMode = "mean",
    input_name: str = "hidden_states",
) -> None:
    """Merge ``module``'s token input with ``slot.plan`` and unmerge its output.

    The input is the first positional argument, or the keyword ``input_name``. The
    output (or the first element of a tuple output) is unmerged back to N tokens, by a
    forward hook that runs before the module's other forward hooks (so the user's see
    the unmerged output). A module called while ``slot.plan`` is None, or with an input
    the plan does not fit (another batch size or token count, e.g. a chunked
    feed-forward), runs unchanged, and only an output whose input was merged is unmerged.
    """
    around = _MergeAround(slot, mode, input_name)
    hooks.pre(module, around.merge_input)
    hooks.post(module, around.unmerge_output, prepend=True)
