"""The zero-overhead reference: the token counts of a merge at none of its cost.

`IdealMatcher` builds an `IdealPlan` whose merge is a slice (keep the first ``N - r``
tokens) and whose unmerge is a repeat (the dropped positions copy kept tokens): no
similarity, no sort, no index tensors, no scatter. Run through the same adapter hooks
as a real method, with the same token count in every layer (`TokenCounts`), it times
what merging could at best save; a method's *overhead* is how far it stays from it:
``(time - ideal) / (plain - ideal)``. Its outputs are meaningless (tokens are dropped,
not merged); it exists for benchmarks (`tokenmerge.tools.bench`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import TokenMergeError, check
from ..layout import TokenLayout
from ..plan import MergeForm, MergeMode, MergePlan
from ..policies.base import Matcher, Matching, MergeContext, ThresholdPolicy

__all__ = ["IdealMatcher", "IdealPlan", "TokenCounts"]


class IdealPlan(MergePlan):
    """Merge by slicing, unmerge by repeating; sizes only, no index tensors until asked for.

    The output of a merge is the first ``N - r`` tokens (the protected prefix first, so
    it is kept); unmerging puts every output back and fills the ``r`` dropped positions
    with copies of the mergeable outputs, in order. `slot`, `keep_idx`, `merged_idx`
    and `merged_slot` describe exactly that mapping; they are built only when read
    (token maps, masks), never on the merge path.

    Args:
        batch: batch size B.
        num_in: tokens N before the merge.
        r: tokens removed, ``0 <= r < N - protected``.
        protected: prefix tokens that are never dropped.
        device: where lazily built index tensors go.
    """

    def __init__(self, batch: int, num_in: int, r: int, protected: int = 0, device: Any = None) -> None:
        if not 0 <= r < max(num_in - protected, 1):
            raise TokenMergeError(f"r must be between 0 and N - protected - 1 ({num_in - protected - 1}); got {r}")
        object.__setattr__(self, "_shape", (batch, num_in, r, protected))
        object.__setattr__(self, "_device", device)

    # ------------------------------------------------------------------ sizes
    @property
    def batch(self) -> int:  # type: ignore[override]
        """Batch size B."""
        return self._shape[0]

    @property
    def num_in(self) -> int:  # type: ignore[override]
        """Tokens N before the merge."""
        return self._shape[1]

    @property
    def num_out(self) -> int:  # type: ignore[override]
        """Tokens ``N - r`` after the merge."""
        return self._shape[1] - self._shape[2]

    @property
    def r(self) -> int:  # type: ignore[override]
        """Tokens removed."""
        return self._shape[2]

    # ------------------------------------------------------------------ lazily built indices
    @property
    def slot(self) -> Tensor:  # type: ignore[override]
        """``(B, N)`` output position of every input token."""
        batch, num_in, r, protected = self._shape
        kept = torch.arange(num_in - r, device=self._device)  # (N - r,)
        filled = protected + torch.arange(r, device=self._device) % max(num_in - r - protected, 1)  # (r,)
        return torch.cat([kept, filled]).expand(batch, num_in)

    @property
    def keep_idx(self) -> Tensor:  # type: ignore[override]
        """``(B, N - r)`` input token of each output position."""
        return torch.arange(self.num_out, device=self._device).expand(self.batch, self.num_out)

    @property
    def merged_idx(self) -> Tensor:  # type: ignore[override]
        """``(B, r)`` input positions of the dropped tokens."""
        return torch.arange(self.num_out, self.num_in, device=self._device).expand(self.batch, self.r)

    @property
    def merged_slot(self) -> Tensor:  # type: ignore[override]
        """``(B, r)`` output position each dropped token is unmerged from."""
        return self.slot[:, self.num_out :]

    def to(self, device: torch.device | str) -> IdealPlan:
        """The same plan, building its indices on ``device``."""
        batch, num_in, r, protected = self._shape
        return IdealPlan(batch, num_in, r, protected, device)

    # ------------------------------------------------------------------ applying
    def merge(
        self, x: Tensor, mode: MergeMode = "mean", size: Tensor | None = None, *, form: MergeForm = "auto"
    ) -> Tensor:
        """Keep the first ``N - r`` tokens of ``x`` ``(B, N, ...)`` (``mode``, ``size``, ``form`` are ignored)."""
        self._check_input(x, self.num_in, "x")
        if self.r == 0:
            return x
        if x.shape[0] != self.batch:
            x = x.expand(self.batch, *x.shape[1:])
        return x[:, : self.num_out]  # (B, N - r, *F)

    def merge_with_size(
        self, x: Tensor, mode: MergeMode = "weighted", size: Tensor | None = None, *, form: MergeForm = "auto"
    ) -> tuple[Tensor, Tensor]:
        """`merge` and `merge_size`: two slices."""
        return self.merge(x), self.merge_size(size)

    def unmerge(self, y: Tensor) -> Tensor:
        """Back to N tokens: ``y`` followed by copies of its mergeable tokens; one copy kernel."""
        self._check_input(y, self.num_out, "y")
        if self.r == 0:
            return y
        if y.shape[0] != self.batch:
            y = y.expand(self.batch, *y.shape[1:])
        protected, r = self._shape[3], self.r
        body = y[:, protected:]  # (B, N - r - P, *F)
        if body.shape[1] >= r:
            return torch.cat([y, body[:, :r]], dim=1)  # (B, N, *F)
        repeats = -(-r // body.shape[1])
        return torch.cat([y, body.repeat(1, repeats, *([1] * (y.dim() - 2)))[:, :r]], dim=1)  # (B, N, *F)

    def merge_size(self, size: Tensor | None = None) -> Tensor:
        """Sizes of the kept tokens (ones when ``size`` is None); the total is not conserved."""
        if size is None:
            return torch.ones(self.batch, self.num_out, device=self._device)
        if size.shape[0] != self.batch:
            size = size.expand(self.batch, *size.shape[1:])
        return size[:, : self.num_out]

    def __repr__(self) -> str:
        batch, num_in, r, protected = self._shape
        return f"IdealPlan(batch={batch}, num_in={num_in}, r={r}, protected={protected})"


class _Counts:
    """What a threshold policy may read of a matching, without a matching: its sizes."""

    def __init__(self, num_tokens: int) -> None:
        self.num_src = max(num_tokens - 1, 0)
        self.num_dst = min(num_tokens, 1)
        self.max_merge = self.num_src


class IdealMatcher(Matcher):
    """Builds `IdealPlan`: no similarity, no sort; ``r`` from the threshold policy.

    The threshold policy sees a stand-in for the matching that holds only its sizes
    (every token but one may merge), so shape-only policies (`FixedRatio`,
    `FixedCount`, `TokenCounts`) give their usual count; value-based ones
    (`SimilarityThreshold`) cannot be used: record a method's counts with
    `TokenCounts` instead.
    """

    max_ratio = 0.999
    traceable = True

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Not used: the ideal has no matching (raises `TokenMergeError`)."""
        raise TokenMergeError("IdealMatcher has no matching; it builds its plan directly (build_plan)")

    def build_plan(
        self, metric: Tensor, ctx: MergeContext, threshold: ThresholdPolicy, protected: int | TokenLayout = 0
    ) -> MergePlan:
        """An `IdealPlan` for ``metric`` ``(B, N, C)`` with the count ``threshold`` gives (no protected suffix)."""
        if isinstance(protected, TokenLayout):
            check(protected.suffix == 0, f"IdealMatcher takes no protected suffix; got layout {protected}")
            protected = protected.prefix
        batch, num_tokens = metric.shape[0], metric.shape[1]
        r = threshold.num_merged(_Counts(num_tokens - protected), ctx)  # type: ignore[arg-type]
        r = min(r, max(num_tokens - protected - 1, 0))
        return IdealPlan(batch, num_tokens, r, protected, metric.device)


class TokenCounts(ThresholdPolicy):
    """Merge a recorded number of tokens in each layer: ``counts[ctx.layer]`` (else ``default``).

    Used to replay the token counts a method produced (as `MergeState.merged_tokens`
    records them) with another matcher, e.g. the zero-overhead `IdealMatcher`.

    Args:
        counts: layer key -> tokens removed, each >= 0.
        default: count for a layer not in ``counts``.
    """

    traceable = True

    def __init__(self, counts: Mapping[str, int], default: int = 0) -> None:
        check(
            all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()),
            f"counts must map layer keys to ints >= 0; got {dict(counts)!r}",
        )
        check(isinstance(default, int) and default >= 0, f"default must be an int >= 0; got {default!r}")
        self.counts = dict(counts)
        self.default = default

    @classmethod
    def from_merged_tokens(cls, merged_tokens: Mapping[str, tuple[int, int]]) -> TokenCounts:
        """From `MergeState.merged_tokens` (layer -> ``(num_in, num_out)``)."""
        return cls({layer: num_in - num_out for layer, (num_in, num_out) in merged_tokens.items()})

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """The recorded count of ``ctx.layer``, capped by ``matching.max_merge``."""
        return min(self.counts.get(ctx.layer, self.default), matching.max_merge)
