"""Merging beside diffusers' caches (``CacheMixin.enable_cache``): what composes, what is refused.

diffusers' caches wrap the ``forward`` of transformer blocks or attention modules
(``HookRegistry``); tokenmerge's forward hooks run around that wrapped ``forward``. So a
merging pre-hook has merged the tokens before a cache decides to skip, and a merging
post-hook unmerges whatever the cache returns:

* **block caches** (`FirstBlockCacheConfig`, `MagCacheConfig`, `SeaCacheConfig`,
  TaylorSeer's lite mode): a block's input and output are all tokens under `SubLayers`
  and `KeyValues` (merging happens inside the block), so a skipped block returns
  full-token tensors and nothing needs unmerging. They compose.
* **attention reuse** (`PyramidAttentionBroadcastConfig`): a skipped attention returns
  the output it computed at an earlier step, on that step's *merged* tokens. `ReusedOutput`
  unmerges it with the plan it was computed with (not the current step's), so the
  attention's output is exactly its earlier output, as without merging.
* **attention prediction** (`TaylorSeerCacheConfig` on attention modules,
  `FasterCacheConfig`): the cache combines outputs of several steps, each on its own
  merged tokens, into a new one; no single plan unmerges that. Refused with
  self-/cross-attention merging (`SubLayers`); `KeyValues` (ToDo) keeps every query, so
  its attention outputs are full-token and compose.
* `ResidualRange` keeps the residual stream merged across blocks, so a cached block or
  attention output belongs to another step's plan: refused with every cache but
  `TextKVCacheConfig` (text keys and values, which never merge).

`check_cache` runs at apply time and at every denoiser call (`CacheGuard`), so a cache
enabled after merging is refused too.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn

from ..errors import TokenMergeError
from ..hooks import HookSet, PerThread, PlanSlot, copied_ref, merge_around
from ..placements import Placement, ResidualRange, SubLayers

__all__ = ["check_cache", "cache_problem", "CacheGuard", "ReusedOutput", "merge_around_reusable"]

_ATTENTION_PREDICTING = ("TaylorSeerCacheConfig", "FasterCacheConfig")
_TEXT_ONLY = ("TextKVCacheConfig",)


def _merges_attention(placement: Placement) -> bool:
    return isinstance(placement, SubLayers) and bool(placement.attn or placement.cross_attn)


def cache_problem(cache_config: Any, placement: Placement) -> str | None:
    """Why ``placement`` cannot merge beside the diffusers cache ``cache_config`` (None: it can)."""
    if cache_config is None:
        return None
    name = type(cache_config).__name__
    if isinstance(placement, ResidualRange) and name not in _TEXT_ONLY:
        return (
            f"placement {placement.describe()} keeps the residual stream merged across blocks, so the outputs "
            f"that {name} caches belong to another step's merge plan; use SubLayers (ToMeSD) or KeyValues (ToDo) "
            "beside a diffusers cache, or disable_cache() first"
        )
    lite = bool(getattr(cache_config, "use_lite_mode", False))
    if name in _ATTENTION_PREDICTING and not lite and _merges_attention(placement):
        return (
            f"{name} predicts attention outputs from those of earlier steps, each on tokens merged with its own "
            f"plan, which no plan unmerges; with placement {placement.describe()} use "
            "KeyValues (ToDo), SubLayers(attn=False, cross_attn=False) (ToMeSD(merge_attn=False, merge_mlp=True)), "
            "TaylorSeerCacheConfig(use_lite_mode=True) "
            "or another cache, or disable_cache() first"
        )
    return None


def check_cache(model: nn.Module, placement: Placement) -> None:
    """Raise `TokenMergeError` naming the cache config when ``model``'s enabled cache cannot compose."""
    problem = cache_problem(getattr(model, "_cache_config", None), placement)
    if problem is not None:
        raise TokenMergeError(f"{type(model).__name__}.enable_cache: {problem}")


class CacheGuard:
    """Called at the start of each denoiser call (`StepTracker.on_call`): `check_cache` for a cache enabled later."""

    def __init__(self, model: nn.Module, placement: Placement) -> None:
        self._model: weakref.ref[nn.Module] | None = weakref.ref(model)
        self.placement = placement

    def __deepcopy__(self, memo: dict[int, Any]) -> CacheGuard:
        # The copy guards the copied model (a weak reference would still name the original).
        new = CacheGuard.__new__(CacheGuard)
        memo[id(self)] = new
        new._model, new.placement = copied_ref(self._model, memo), self.placement
        return new

    def __call__(self) -> None:
        """Raise `TokenMergeError` when a cache enabled after merging cannot compose with it."""
        model = self._model() if self._model is not None else None
        if model is not None and getattr(model, "_cache_config", None) is not None:
            check_cache(model, self.placement)


class _Last:
    def __init__(self) -> None:
        self.output: weakref.ref[Tensor] | None = None  # the merged output the module computed last
        self.plan: Any = None  # the plan its input was merged with


def _first(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


class ReusedOutput:
    """Forward hook, run before `merge_around`'s unmerge: an output a cache hands back again is unmerged with its plan.

    Pyramid Attention Broadcast returns, for a skipped attention, the very tensor it
    returned when it last computed: tokens merged with that call's plan. This hook
    remembers (weakly) the merged output of each computed call and its plan; when the
    same tensor comes back, it returns it unmerged with that plan (all tokens, so
    `merge_around` leaves it), i.e. exactly the attention's earlier full-token output.

    Args:
        slot: the block's plan slot that `merge_around` merges the module's input with.
    """

    def __init__(self, slot: PlanSlot) -> None:
        self.slot = slot
        self._per_thread = PerThread(_Last)

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Unmerge a handed-back output with the plan it was computed with; remember a computed one."""
        first = _first(output)  # (B, N - r, C) when merged
        if first is None:
            return None
        last = self._per_thread.value
        if last.output is not None and last.output() is first and last.plan is not None:
            full = last.plan.unmerge(first)  # (B, N, C): the earlier call's output on all tokens
            return full if isinstance(output, Tensor) else (full, *output[1:])
        plan = self.slot.plan
        if plan is not None and first.dim() == 3 and first.shape[:2] == (plan.batch, plan.num_out):
            last.output, last.plan = weakref.ref(first), plan
        else:
            last.output, last.plan = None, None
        return None


def merge_around_reusable(
    hooks: HookSet, module: nn.Module, slot: PlanSlot, mode: Any, input_name: str = "hidden_states"
) -> None:
    """`merge_around` for an attention a diffusers cache may skip: `ReusedOutput` runs before the unmerge."""
    merge_around(hooks, module, slot, mode, input_name=input_name)
    hooks.post(module, ReusedOutput(slot), prepend=True)
