"""Checks of what a user's own policy returns, where the library receives it.

A custom `Matcher`, `ThresholdPolicy` or `PairCache` can return anything: int32 or
out-of-range indices, a source that is also a destination, a ``best`` of -1, a score
of the wrong shape, a count of ``2.0`` or ``None``, or indices read from
uninitialised memory (``torch.empty``). Used as they come, these crash deep inside
`tokenmerge.plan` or, worse, merge the wrong tokens silently. The functions here turn
each into a `TokenMergeError` naming the policy class and what was wrong.

The library's own policies (every class defined in the ``tokenmerge`` package) are
never checked: `needs_check` is False for them, so the hot path of the presets pays
nothing. For a user's policy a check costs the shape and dtype tests (host metadata
only) and, for the index values, a few reductions and **one host read per plan**
(a device synchronisation on a GPU). The value part is skipped while `torch.compile`
traces and on the ``meta`` device. A policy that is known good can opt out with `trust`.

Nothing here imports `tokenmerge.policies.base` (only `tokenmerge.plan` and `tokenmerge.errors`),
so `base` may import this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import TokenMergeError, _got, is_int
from ..plan import MergePlan

if TYPE_CHECKING:
    from .base import Matching

__all__ = ["needs_check", "trust", "check_matching", "check_merge_count", "check_plan_from_cache"]

#: Per class: True when its results are checked (cached; see `needs_check`).
_NEEDS_CHECK: dict[type, bool] = {}


def needs_check(policy: object) -> bool:
    """Whether ``policy``'s results must be checked: True unless its class is the library's own.

    A class defined in the ``tokenmerge`` package (the built-in matchers, thresholds and
    caches) is trusted; any other class is checked, a user's subclass of a built-in
    included (it may override what it returns). `trust` marks a class as trusted. The
    answer is cached per class: a dictionary look-up per call.
    """
    cls = type(policy)
    answer = _NEEDS_CHECK.get(cls)
    if answer is None:
        module = getattr(cls, "__module__", "") or ""
        answer = not (module == "tokenmerge" or module.startswith("tokenmerge."))
        _NEEDS_CHECK[cls] = answer
    return answer


def trust(cls: type) -> type:
    """Mark a policy class as known good: its results are no longer checked. Returns ``cls``.

    Usable as a class decorator. Only for a policy that is tested, where the one host
    read per plan of the checks matters (a small model on a GPU).
    """
    if not isinstance(cls, type):
        raise TokenMergeError(f"trust takes a policy class; got {_got(cls)}")
    _NEEDS_CHECK[cls] = False
    return cls


def _name(policy: object) -> str:
    return type(policy).__name__


def _values_checkable(device: torch.device) -> bool:
    """Whether index values can be read: not while tracing, not on the meta device."""
    return not torch.compiler.is_compiling() and device.type != "meta"


def check_matching(
    matching: Matching,
    num_tokens: int,
    policy: object,
    *,
    batch: int | None = None,
    device: torch.device | str | None = None,
    values: bool | None = None,
) -> None:
    """Check a `Matching` a custom `Matcher.match` returned for ``num_tokens`` mergeable tokens.

    Checks that ``src_idx`` ``(B, Ns)``, ``dst_idx`` ``(B, Nd)``, ``best`` ``(B, Ns)`` and
    ``score`` ``(B, Ns)`` are tensors of these ranks, of one batch size (``batch`` when
    given) and one device (``device`` when given); that the three index tensors are int64
    and ``score`` floating point; that ``Ns + Nd == num_tokens``. With ``values`` (the
    default, except while tracing and on ``meta``) also that every ``best`` lies in
    ``[0, Nd)``, that the sources and destinations of every batch element together hold
    each position of ``[0, num_tokens)`` exactly once, and that no score is NaN: one
    scatter-count and one host read, whatever the batch size.

    Raises:
        TokenMergeError: naming ``type(policy).__name__`` and what was wrong.
    """
    who = f"{_name(policy)}.match"
    fields = ("src_idx", "dst_idx", "best", "score")
    if not all(isinstance(getattr(matching, f, None), Tensor) for f in fields):
        raise TokenMergeError(
            f"{who} must return a tokenmerge.policies.Matching of four tensors "
            f"(src_idx, dst_idx, best, score); got {_got(matching)}"
        )
    src, dst, best, score = (getattr(matching, f) for f in fields)
    for field, tensor, shape in (("src_idx", src, "(B, Ns)"), ("dst_idx", dst, "(B, Nd)")):
        if tensor.dim() != 2:
            raise TokenMergeError(f"{who} returned {field} of shape {tuple(tensor.shape)}; it must be 2-D {shape}")
    size, num_src, num_dst = src.shape[0], src.shape[1], dst.shape[1]
    if batch is not None and size != batch:
        raise TokenMergeError(f"{who} returned src_idx for a batch of {size}; the tokens have a batch of {batch}")
    if dst.shape[0] != size:
        raise TokenMergeError(f"{who} returned dst_idx for a batch of {dst.shape[0]} and src_idx for {size}")
    for field, tensor in (("best", best), ("score", score)):
        if tuple(tensor.shape) != (size, num_src):
            raise TokenMergeError(
                f"{who} returned {field} of shape {tuple(tensor.shape)}; it must be (B, Ns) = {(size, num_src)}"
            )
    for field, tensor in (("src_idx", src), ("dst_idx", dst), ("best", best)):
        if tensor.dtype != torch.int64:
            raise TokenMergeError(f"{who} returned {field} of dtype {tensor.dtype}; it must be torch.int64 (long)")
    if not score.dtype.is_floating_point:
        raise TokenMergeError(f"{who} returned score of dtype {score.dtype}; it must be floating point")
    if num_src + num_dst != num_tokens:
        raise TokenMergeError(
            f"{who} returned {num_src} sources and {num_dst} destinations for {num_tokens} tokens; "
            "every mergeable token must be one or the other (Ns + Nd == N)"
        )
    where = {t.device for t in (src, dst, best, score)}
    if len(where) != 1 or (device is not None and torch.device(device) not in where):
        expected = f" (the tokens are on {torch.device(device)})" if device is not None else ""
        raise TokenMergeError(f"{who} returned tensors on {sorted(map(str, where))}{expected}; all must be on one")
    if values is None:
        values = _values_checkable(src.device)
    if not values or num_tokens == 0 or size == 0:
        return
    _check_matching_values(who, src, dst, best, score, num_tokens)


def _check_matching_values(who: str, src: Tensor, dst: Tensor, best: Tensor, score: Tensor, num_tokens: int) -> None:
    num_dst = dst.shape[1]
    if src.stride(0) == 0 and dst.stride(0) == 0:  # one partition shared by the batch (expanded): check it once
        src, dst = src[:1], dst[:1]
    positions = torch.cat([src, dst], dim=1)  # (B', N)
    clamped = positions.clamp(0, num_tokens - 1)  # (B', N) in range, so the scatter below cannot fault
    counts = torch.zeros_like(positions).scatter_add_(1, clamped, torch.ones_like(positions))  # (B', N)
    stats = [
        (clamped != positions).sum(),  # positions outside [0, N)
        (counts != 1).sum(),  # positions named twice or never
        torch.isnan(score).sum(),
    ]
    if num_dst > 0:
        stats.append((best.clamp(0, num_dst - 1) != best).sum())  # best outside [0, Nd)
    found = torch.stack(stats).tolist()  # the one host read (a second one only to word an error)
    if found[0]:
        low, high = positions.min().item(), positions.max().item()
        raise TokenMergeError(
            f"{who} returned token positions from {low} to {high}; src_idx and dst_idx must lie in "
            f"[0, {num_tokens}) (counted from the first mergeable token)"
        )
    if found[1]:
        raise TokenMergeError(
            f"{who} returned sources and destinations that do not partition the {num_tokens} tokens "
            f"({found[1]} positions named twice or never): every token must be exactly one source or destination"
        )
    if len(found) > 3 and found[3]:
        low, high = best.min().item(), best.max().item()
        raise TokenMergeError(
            f"{who} returned best from {low} to {high}; best is an index into dst_idx, in [0, {num_dst})"
        )
    if found[2]:
        raise TokenMergeError(f"{who} returned a score with {found[2]} NaN values; scores must be numbers")


def check_merge_count(r: Any, matching: Matching, policy: object) -> int:
    """Check the count a custom `ThresholdPolicy.num_merged` returned; returns it as an ``int``.

    It must be an int (a Python or NumPy int; not a `bool`, a float, None or a tensor)
    in ``[0, matching.max_merge]``. Host-only: no tensor is read.

    Raises:
        TokenMergeError: naming ``type(policy).__name__`` and what was wrong.
    """
    who = f"{_name(policy)}.num_merged"
    high = matching.max_merge
    if not is_int(r):
        hint = " (convert a tensor with int(...))" if isinstance(r, Tensor) else ""
        raise TokenMergeError(f"{who} must return an int in [0, {high}]{hint}; got {_got(r)}")
    if not 0 <= r <= high:
        raise TokenMergeError(f"{who} must return an int in [0, {high}] (0 to the matching's max_merge); got {_got(r)}")
    return int(r)


def check_plan_from_cache(
    plan: Any, metric: Tensor, cache: object, protected: int = 0, *, values: bool | None = None
) -> None:
    """Check the plan a custom `PairCache.lookup` returned for ``metric`` ``(B, N, C)``.

    None (recompute) passes. Otherwise it must be a `tokenmerge.MergePlan` for this
    batch size and token count on the metric's device: ``slot`` ``(B, N)``, ``keep_idx``
    ``(B, N - r)``, ``merged_idx`` and ``merged_slot`` ``(B, r)``, all int64. With
    ``values`` (the default, except while tracing and on ``meta``) also that the kept
    and merged tokens partition ``[0, N)``, that no protected prefix token is merged,
    that every merged token goes to a kept slot and that ``slot`` maps each kept token
    to its own output position: one host read.

    Raises:
        TokenMergeError: naming ``type(cache).__name__`` and what was wrong.
    """
    if plan is None:
        return
    who = f"{_name(cache)}.lookup"
    if not isinstance(plan, MergePlan):
        raise TokenMergeError(f"{who} must return a tokenmerge.MergePlan or None; got {_got(plan)}")
    batch, num_tokens = metric.shape[0], metric.shape[1]
    fields = ("slot", "keep_idx", "merged_idx", "merged_slot")
    tensors = [getattr(plan, f) for f in fields]
    for field, tensor in zip(fields, tensors):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[0] != batch:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else _got(tensor)
            raise TokenMergeError(f"{who} returned a plan whose {field} is {shape}; it must be (B={batch}, ...)")
        if tensor.dtype != torch.int64 or tensor.device != metric.device:
            raise TokenMergeError(
                f"{who} returned a plan whose {field} is {tensor.dtype} on {tensor.device}; "
                f"it must be torch.int64 on {metric.device}"
            )
    slot, keep, merged, merged_slot = tensors
    num_out, r = keep.shape[1], merged.shape[1]
    if slot.shape[1] != num_tokens or num_out + r != num_tokens or merged_slot.shape[1] != r:
        raise TokenMergeError(
            f"{who} returned a plan for {slot.shape[1]} tokens (keeping {num_out}, merging {r}, "
            f"{merged_slot.shape[1]} merged slots); the layer has {num_tokens} tokens"
        )
    if values is None:
        values = _values_checkable(metric.device)
    if not values or num_tokens == 0 or batch == 0:
        return
    positions = torch.cat([keep, merged], dim=1)  # (B, N)
    counts = torch.zeros_like(positions).scatter_add_(
        1, positions.clamp(0, num_tokens - 1), torch.ones_like(positions)
    )  # (B, N)
    bad_positions = ((positions < 0) | (positions >= num_tokens)).sum() + (counts != 1).sum()
    bad_merged = (merged < protected).sum() + ((merged_slot < protected) | (merged_slot >= num_out)).sum()
    own_slot = slot.gather(1, keep.clamp(0, num_tokens - 1))  # (B, N - r) the slot of each kept token
    bad_slot = ((slot < 0) | (slot >= num_out)).sum() + (own_slot != torch.arange(num_out, device=slot.device)).sum()
    found = torch.stack([bad_positions, bad_merged, bad_slot]).tolist()  # the one host read
    if found[0]:
        raise TokenMergeError(f"{who} returned a plan whose keep_idx and merged_idx do not partition the tokens")
    if found[1]:
        raise TokenMergeError(
            f"{who} returned a plan that merges a protected token or into no kept slot "
            f"(merged_idx must be >= {protected}, merged_slot in [{protected}, {num_out}))"
        )
    if found[2]:
        raise TokenMergeError(
            f"{who} returned a plan whose slot does not map the kept tokens to their outputs (slot in [0, {num_out}))"
        )
