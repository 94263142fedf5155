"""Token layouts: which part of a ``(B, N, C)`` token sequence merges, and on what grid.

A `TokenLayout` splits the token axis into three spans::

    [ protected prefix | mergeable span (a grid of rank 1-3) | protected suffix ]
      0 .. prefix-1      merge_start .. merge_stop-1            merge_stop .. N-1

* the **prefix**: class, distillation or register tokens (ViTs), text tokens placed
  before the image (Flux's joint stream);
* the **mergeable span**: image or video tokens, laid out row-major on a grid
  ``(n,)``, ``(h, w)`` or ``(t, h, w)`` (frames, rows, columns);
* the **suffix**: tokens placed after the image (SD3's joint stream puts its text
  tokens last).

Plans built with a layout merge only the mergeable span; both protected spans keep
their positions and values bitwise (a `MergePlan`'s output order is ``[prefix |
unmerged sources | destinations | suffix]``). After a merge the span no longer forms a
grid: `TokenLayout.after_merge` gives the layout of the merged tokens (a sequence of
``num_mergeable - r`` tokens between the same prefix and suffix), so a ViT stream can
chain its blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TokenMergeError

if TYPE_CHECKING:
    from .plan import MergePlan

__all__ = ["TokenLayout", "num_mergeable"]


def _is_int(value: object) -> bool:
    """A real int (``True``/``False`` are not token counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TokenLayout:
    """The token axis of a ``(B, N, C)`` sequence: protected prefix, mergeable grid, protected suffix.

    Build one with `sequence`, `image` or `video`; it is immutable and hashable (a cache
    may key on it).

    Attributes:
        grid: shape of the mergeable span, row-major: ``(n,)``, ``(h, w)`` or
            ``(t, h, w)``; every entry an int >= 1.
        prefix: tokens before the span that are never merged (int >= 0).
        suffix: tokens after the span that are never merged (int >= 0).

    Raises:
        TokenMergeError: naming the field, when a count is not an int (bools are
            refused), is negative, or the grid's rank is not 1, 2 or 3.
    """

    grid: tuple[int, ...]
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        grid = self.grid
        if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
            raise TokenMergeError(f"grid must be a tuple (n,), (h, w) or (t, h, w); got {grid!r}")
        if not all(_is_int(g) and g >= 1 for g in grid):
            raise TokenMergeError(f"grid entries must be ints >= 1; got grid={tuple(grid)!r}")
        object.__setattr__(self, "grid", tuple(grid))  # a list given is stored as a tuple (hashable)
        for name in ("prefix", "suffix"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 0):
                raise TokenMergeError(f"{name} must be an int >= 0; got {value!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def sequence(cls, n: int, prefix: int = 0, suffix: int = 0) -> TokenLayout:
        """``n`` mergeable tokens with no spatial structure (grid ``(n,)``)."""
        _check_count("n", n)
        return cls((n,), prefix, suffix)

    @classmethod
    def image(cls, h: int, w: int, prefix: int = 0, suffix: int = 0) -> TokenLayout:
        """An ``h x w`` patch grid (row-major) between ``prefix`` and ``suffix`` protected tokens."""
        _check_count("h", h)
        _check_count("w", w)
        return cls((h, w), prefix, suffix)

    @classmethod
    def video(cls, t: int, h: int, w: int, prefix: int = 0, suffix: int = 0) -> TokenLayout:
        """``t`` frames of ``h x w`` patches (frame-major, then row-major) between the protected spans."""
        _check_count("t", t)
        _check_count("h", h)
        _check_count("w", w)
        return cls((t, h, w), prefix, suffix)

    # ------------------------------------------------------------------ sizes
    @property
    def rank(self) -> int:
        """Rank of the grid: 1 (sequence), 2 (image) or 3 (video)."""
        return len(self.grid)

    @property
    def num_mergeable(self) -> int:
        """Tokens in the mergeable span: the product of the grid."""
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        """All tokens N: ``prefix + num_mergeable + suffix``."""
        return self.prefix + self.num_mergeable + self.suffix

    @property
    def merge_start(self) -> int:
        """Position of the first mergeable token (``prefix``)."""
        return self.prefix

    @property
    def merge_stop(self) -> int:
        """Position one past the last mergeable token (``prefix + num_mergeable``)."""
        return self.prefix + self.num_mergeable

    @property
    def grid3d(self) -> tuple[int, int, int]:
        """The grid as ``(t, h, w)``: a sequence ``(n,)`` is ``(1, 1, n)``, an image ``(h, w)`` is ``(1, h, w)``."""
        return (1,) * (3 - len(self.grid)) + self.grid  # type: ignore[return-value]

    # ------------------------------------------------------------------ chaining
    def after_merge(self, r: int | MergePlan) -> TokenLayout:
        """The layout after a plan removed ``r`` tokens (an int, or the `MergePlan` itself).

        The merged span is ``[unmerged sources | destinations]``, no longer a grid: a
        sequence of ``num_mergeable - r`` tokens between the same prefix and suffix.
        """
        removed = r if _is_int(r) else getattr(r, "r", r)
        if not (_is_int(removed) and 0 <= removed < self.num_mergeable):  # type: ignore[operator]
            raise TokenMergeError(
                f"r must be an int in [0, {self.num_mergeable}) (the mergeable tokens of {self}); got {r!r}"
            )
        return TokenLayout((self.num_mergeable - removed,), self.prefix, self.suffix)  # type: ignore[operator]

    def check_tokens(self, num_tokens: int, what: str = "metric") -> None:
        """Raise `TokenMergeError` unless the layout covers exactly ``num_tokens`` tokens."""
        if num_tokens != self.num_tokens:
            raise TokenMergeError(
                f"layout {self} covers {self.num_tokens} tokens but the {what} has {num_tokens}; "
                "prefix + prod(grid) + suffix must equal N"
            )


def _check_count(name: str, value: object) -> None:
    if not (_is_int(value) and value >= 1):  # type: ignore[operator]
        raise TokenMergeError(f"{name} must be an int >= 1; got {value!r}")


def num_mergeable(protected: int | TokenLayout, num_tokens: int) -> int:
    """Mergeable tokens among ``num_tokens``: all but a protected prefix (an int), or a layout's span."""
    return protected.num_mergeable if isinstance(protected, TokenLayout) else num_tokens - protected
