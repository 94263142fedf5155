"""`apply` and `remove`: the one entry point of tokenmerge."""

from __future__ import annotations

import weakref
from typing import Any

from .adapters import find_adapter
from .adapters.base import Adapter
from .config import MergeConfig
from .errors import TokenMergeError
from .hooks import HookSet
from .state import MergeState

__all__ = ["apply", "remove", "MergeHandle", "get_handle"]

_HANDLES: weakref.WeakKeyDictionary[Any, MergeHandle] = weakref.WeakKeyDictionary()


class MergeHandle:
    """What `apply` returns: the applied config, its runtime state and its hooks.

    Attributes:
        target: the object `apply` was called with.
        config: the applied `MergeConfig`.
        state: the `MergeState` (caches, generator, step counters).
        adapter: the adapter that attached the hooks.
    """

    def __init__(self, target: Any, config: MergeConfig, state: MergeState, adapter: Adapter, hooks: HookSet) -> None:
        self.target = target
        self.config = config
        self.state = state
        self.adapter = adapter
        self._hooks = hooks

    @property
    def active(self) -> bool:
        """True until `remove` is called."""
        return len(self._hooks) > 0

    def reset(self) -> None:
        """Forget cached plans and re-seed the merging RNG (done at every new generation anyway)."""
        self.state.reset()

    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it did before `apply`."""
        self._hooks.remove()
        if _HANDLES.get(self.target) is self:
            del _HANDLES[self.target]

    def __enter__(self) -> MergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MergeHandle(adapter={self.adapter.name!r}, active={self.active}, {self.state!r})"


def apply(target: Any, config: MergeConfig) -> MergeHandle:
    """Apply a merging policy to a model or pipeline.

    Args:
        target: a diffusers pipeline or denoiser, a timm Vision Transformer, or a stack
            of transformer blocks (see `tokenmerge.adapters.supported_targets`).
        config: a `MergeConfig`, e.g. from `ToMeSD`, `CAToMe`, `ToMe` or `ToDo`.

    Returns:
        A `MergeHandle`; ``handle.remove()`` (or `remove`) undoes everything.

    Raises:
        TokenMergeError: for an unsupported target or a config the target cannot honour;
            the target is then left exactly as it was. Applying to a target that already
            has a config replaces that config.
    """
    if not isinstance(config, MergeConfig):
        raise TokenMergeError(f"config must be a tokenmerge.MergeConfig (e.g. tokenmerge.ToMeSD()); got {config!r}")
    config.validate()
    adapter = find_adapter(target)
    adapter.check(target, config)
    previous = _HANDLES.get(target)
    if previous is not None:
        previous.remove()
    state = MergeState(config)
    hooks = HookSet()
    try:
        adapter.attach(target, config, state, hooks)
    except BaseException:
        hooks.remove()
        raise
    handle = MergeHandle(target, config, state, adapter, hooks)
    _HANDLES[target] = handle
    return handle


def remove(target: Any) -> bool:
    """Undo `apply` on ``target``; returns False when nothing was applied."""
    handle = _HANDLES.get(target)
    if handle is None:
        return False
    handle.remove()
    return True


def get_handle(target: Any) -> MergeHandle | None:
    """The active `MergeHandle` of ``target``, or None."""
    return _HANDLES.get(target)
