"""The one error type tokenmerge raises for bad input, and the small validators that raise it.

Every validator names the argument, repeats the value given (its ``repr``) and says what
is allowed, e.g. ``k must be an int >= 1; got True``, and returns the value normalised
(a built-in ``int``, ``float`` or ``tuple``), so a constructor reads
``self.k = check_int("k", k, lo=1)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "TokenMergeError",
    "check",
    "check_bool",
    "check_int",
    "check_float",
    "check_sequence",
    "check_instance",
    "check_ints",
    "is_int",
    "is_number",
    "MAX_TOKENS",
    "MAX_STEPS",
]

T = TypeVar("T")  # the type `check_instance` returns

#: More tokens than any model's sequence has (a 4096 x 4096 grid): bounds token counts.
MAX_TOKENS = 2**24
#: More denoising steps or calls than any generation has: bounds step indices.
MAX_STEPS = 2**20


class TokenMergeError(ValueError):
    """Bad input to tokenmerge: the message names the argument and what is allowed.

    A subclass of `ValueError`, so code that already catches `ValueError` keeps working.
    Whenever `apply` raises it, the model it was given is left exactly as it was.
    """


def check(condition: bool, message: str) -> None:
    """Raise `TokenMergeError(message)` unless `condition` holds."""
    if not condition:
        raise TokenMergeError(message)


def _got(value: Any) -> str:
    """``repr`` of a value for a message, cut short when it is long (a tensor, a big list)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(name: str, allowed: str, value: Any) -> TokenMergeError:
    return TokenMergeError(f"{name} must be {allowed}; got {_got(value)}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a `bool` (``True``/``False``; not ``1``, ``"no"`` or ``None``)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value)
    return value


def is_int(value: Any) -> bool:
    """True for an integer (a Python or NumPy int), False for a `bool` or anything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a real number (int, float, NumPy scalar), False for a `bool`, a tensor or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an int >= {lo} and <= {hi}"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


def check_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, *, allow_none: bool = False
) -> int | None:
    """``value`` as a built-in ``int`` if it is an int (not a `bool`, not a float) in ``[lo, hi]``.

    Args:
        name: the argument's name, for the message.
        value: what was given.
        lo, hi: inclusive bounds (None: unbounded on that side).
        allow_none: accept ``None`` too (returned as is).
    """
    if value is None and allow_none:
        return None
    allowed = _int_range(lo, hi)
    if allow_none:
        allowed = f"None or {allowed}"
    if not is_int(value):
        raise _fail(name, allowed, value)
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(name, allowed, value)
    return value


def _float_range(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def check_float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a ``float`` if it is a finite real number (an int or float, not a `bool`) in range.

    Args:
        name: the argument's name, for the message.
        value: what was given.
        lo, hi: bounds (None: unbounded on that side); NaN and infinities are always refused.
        lo_open, hi_open: exclude the bound itself (``(lo, hi]``, ``[lo, hi)``).
        allow_none: accept ``None`` too (returned as is).
    """
    if value is None and allow_none:
        return None
    allowed = _float_range(lo, hi, lo_open, hi_open)
    if allow_none:
        allowed = f"None or {allowed}"
    if not is_number(value):
        raise _fail(name, allowed, value)
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise _fail(name, allowed, value) from None
    if not math.isfinite(number):
        raise _fail(name, allowed, value)
    if lo is not None and (number < lo or (lo_open and number == lo)):
        raise _fail(name, allowed, value)
    if hi is not None and (number > hi or (hi_open and number == hi)):
        raise _fail(name, allowed, value)
    return number


def check_sequence(
    name: str,
    value: Any,
    *,
    min_len: int = 0,
    max_len: int | None = None,
    length: int | None = None,
    iterables: bool = False,
    what: str = "a list or tuple",
) -> tuple[Any, ...]:
    """``value`` as a tuple if it is a real sequence (list, tuple, range; not a str, bytes, dict or None).

    Args:
        name: the argument's name, for the message.
        value: what was given.
        min_len, max_len: bounds on its length.
        length: the exact length required (overrides the bounds).
        iterables: also accept any other iterable but a str, bytes or mapping (a set,
            a NumPy array, a generator), where order does not matter (step indices).
        what: how the message describes the sequence ("a list of ints", say).
    """
    ok_type = isinstance(value, Sequence) or (iterables and isinstance(value, Iterable))
    if not ok_type or isinstance(value, (str, bytes, bytearray, Mapping)):
        raise _fail(name, what, value)
    try:
        items = tuple(value)
    except TypeError:  # iterable in name only (a 0-d tensor)
        raise _fail(name, what, value) from None
    if length is not None:
        if len(items) != length:
            raise _fail(name, f"{what} (length {length})", value)
    elif len(items) < min_len or (max_len is not None and len(items) > max_len):
        bound = f"at least {min_len}" if max_len is None else f"{min_len} to {max_len}"
        raise _fail(name, f"{what} with {bound} {'entry' if bound.endswith(' 1') else 'entries'}", value)
    return items


def check_instance(name: str, value: Any, types: type[T] | tuple[type, ...], what: str) -> T:
    """``value`` if it is an instance of ``types`` (``what`` describes them in the message)."""
    if not isinstance(value, types):
        raise _fail(name, what, value)
    return value  # type: ignore[return-value]


def check_ints(name: str, values: Iterable[Any], lo: int | None = None, hi: int | None = None) -> tuple[int, ...]:
    """Every entry of ``values`` checked by `check_int` (named ``name[i]``); returned as a tuple."""
    return tuple(check_int(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(values))  # type: ignore[misc]
