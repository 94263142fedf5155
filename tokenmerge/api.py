"""`apply` and `remove`: the one entry point of tokenmerge."""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .adapters import find_adapter
from .adapters.base import Adapter
from .config import MergeConfig
from .errors import TokenMergeError
from .hooks import HookSet, hook_sets_in
from .state import MergeState

__all__ = ["apply", "remove", "MergeHandle", "get_handle", "build_state"]

# target -> its handle. Weak both ways: a handle refers to its target weakly, so a model
# applied to and dropped without remove() is freed with its hooks and state.
_HANDLES: weakref.WeakKeyDictionary[Any, MergeHandle] = weakref.WeakKeyDictionary()


class MergeHandle:
    """What `apply` returns: the applied config, its runtime state and its hooks.

    The handle owns the persistent state (`state`: config, seed, bounded caches,
    counters); state of a forward call lives in per-thread objects of the hooks. It
    refers to its target weakly: nothing in tokenmerge keeps a model alive, and a
    dropped model takes its hooks and state with it (`target` is None then).

    Attributes:
        config: the applied `MergeConfig`.
        state: the `MergeState` (caches, generator, step counters; per-thread views).
        adapter: the adapter that attached the hooks.
    """

    def __init__(self, target: Any, config: MergeConfig, state: MergeState, adapter: Adapter, hooks: HookSet) -> None:
        self._target = weakref.ref(target)
        self.config = config
        self.state = state
        self.adapter = adapter
        self._hooks = hooks
        hooks.handle = weakref.ref(self)

    @property
    def target(self) -> Any:
        """The object `apply` was called with, or None once it has been garbage-collected."""
        return self._target()

    @property
    def active(self) -> bool:
        """True until `remove` is called (or the config is replaced)."""
        return len(self._hooks) > 0

    def reset(self) -> None:
        """Forget the calling thread's cached plans and re-seed its merging RNG (done at every generation anyway)."""
        self.state.reset()

    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it did before `apply`.

        Removing the last active config also puts back the process-wide dynamo setting
        `apply` changed (see `tokenmerge.hooks.guard_hooks_under_compile`).
        """
        self._hooks.remove()
        target = self.target
        if target is not None and _HANDLES.get(target) is self:
            del _HANDLES[target]

    def __enter__(self) -> MergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MergeHandle(adapter={self.adapter.name!r}, active={self.active}, {self.state!r})"


def _model_of(target: Any) -> nn.Module | None:
    try:
        model = find_adapter(target).model_of(target)
    except TokenMergeError:
        return None
    return model if isinstance(model, nn.Module) else None


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
            the target is then left exactly as it was.

    One config per model tree: applying to a target that already has a config
    *replaces* it, and so does applying to a model whose sub-modules or ancestors hold
    one (a ViT and then its ``.blocks``, a pipeline and then its ``unet``, or the other
    way round): every config with a hook in the target's module tree is removed first.

    What holds afterwards:

    * threads: one merged model may be called from several threads at once; each call
      gets exactly its serial result (forward-call and generation state are per thread);
    * nothing in tokenmerge keeps the target alive (the handle refers to it weakly);
    * ``copy.deepcopy`` of a merged model gives an independent merged copy, removable
      with ``tokenmerge.remove(copy)``; pickling a merged model raises
      `TokenMergeError` (remove the config first);
    * ``torch._dynamo.config.skip_nnmodule_hook_guards`` is turned off while any config
      is applied and put back when the last one is removed.
    """
    # 1. Everything that can be refused is refused before the model is touched: the
    #    config, the target, the config against the target, and the runtime state.
    if not isinstance(config, MergeConfig):
        raise TokenMergeError(f"config must be a tokenmerge.MergeConfig (e.g. tokenmerge.ToMeSD()); got {config!r}")
    config.validate()
    adapter = find_adapter(target)
    adapter.check(target, config)
    state = build_state(config)
    # 2. The configs this one replaces: the target's own, and any in its module tree.
    replaced: list[HookSet] = []
    previous = _HANDLES.get(target)
    if previous is not None:
        replaced.append(previous._hooks)
    model = adapter.model_of(target)
    if isinstance(model, nn.Module):
        replaced += [other for other in hook_sets_in(model) if all(other is not r for r in replaced)]
    # 3. The new hooks go on first; a failure takes them off again and leaves the earlier
    #    config active, exactly as it was.
    hooks = HookSet()
    hooks.meta = (config, state, adapter)
    try:
        adapter.attach(target, config, state, hooks)
    except BaseException:
        hooks.remove()
        raise
    # 4. Only now the earlier configs go (their handles turn inactive).
    if previous is not None:
        previous.remove()
    for other in replaced:
        other.remove()
    handle = MergeHandle(target, config, state, adapter, hooks)
    _HANDLES[target] = handle
    return handle


def build_state(config: MergeConfig) -> MergeState:
    """The `MergeState` of ``config``, with the calling thread's runtime built (at `apply`, not at the first forward).

    Building it makes a fresh copy of the pair cache (`MergeConfig.fresh_cache`: a deep
    copy, then ``reset()``) and seeds the generator, so a cache that cannot be copied or
    reset is refused here, by name, before the model is touched.

    Raises:
        TokenMergeError: naming the cache class when copying or resetting it fails.
    """
    try:
        # PerThread builds the calling thread's generation right away: the cache's copy, the seeded generator.
        return MergeState(config)
    except TokenMergeError:
        raise
    except Exception as error:
        name = type(config.cache).__name__
        raise TokenMergeError(
            f"cache {name} cannot be used: tokenmerge gives every model (and thread) a fresh copy made with "
            f"copy.deepcopy and reset(), which raised {type(error).__name__}: {error}; make {name} deep-copyable "
            "(e.g. define __deepcopy__) or hold unpicklable resources outside it"
        ) from error


def remove(target: Any) -> bool:
    """Undo `apply` on ``target`` (or on a deep copy of a merged model); returns False when nothing was applied."""
    handle = _HANDLES.get(target) or get_handle(target)  # a replaced handle goes quietly
    if handle is None:
        return False
    handle.remove()
    return True


def get_handle(target: Any) -> MergeHandle | None:
    """The active `MergeHandle` of ``target``, or None.

    A deep copy of a merged model gets a handle of its own here, on first asking.
    """
    handle = _HANDLES.get(target)
    if handle is not None:
        return handle if handle.active else None
    model = _model_of(target)
    if model is None:
        return None
    for hooks in hook_sets_in(model):
        if hooks.handle is None and hooks.meta is not None:  # the hooks of a copy: no handle yet
            config, state, adapter = hooks.meta
            handle = MergeHandle(target, config, state, adapter, hooks)
            _HANDLES[target] = handle
            return handle
    return None
