"""The one error type tokenmerge raises for bad input."""

from __future__ import annotations

__all__ = ["TokenMergeError"]


class TokenMergeError(ValueError):
    """Bad input to tokenmerge: the message names the argument and what is allowed.

    A subclass of `ValueError`, so code that already catches `ValueError` keeps working.
    Whenever `apply` raises it, the model it was given is left exactly as it was.
    """


def check(condition: bool, message: str) -> None:
    """Raise `TokenMergeError(message)` unless `condition` holds."""
    if not condition:
        raise TokenMergeError(message)
