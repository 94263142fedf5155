"""Merge plans: the pure tensor core of tokenmerge.

A `MergePlan` is computed once from a `Matching` and a merge count ``r``; it then
merges any tensor with the same token layout ``(B, N, ...)`` down to ``N - r`` tokens
and unmerges ``(B, N - r, ...)`` back to ``N``. Everything here is index arithmetic
on tensors: no `nn.Module`, no host-device synchronisation, no data-dependent shapes
(``r`` is a Python int), so it traces cleanly under `torch.compile`.

Output layout of a merge: ``[protected prefix | unmerged sources | destinations |
protected suffix]``. The protected spans (a `tokenmerge.layout.TokenLayout`'s prefix and
suffix: class and register tokens, text tokens before or after the image) keep their
positions, and `merge` and `unmerge` return their values bitwise.

Per-token side data follows a merge through the same plan, so an adapter never
re-derives it. For every output position ``j`` the plan knows its *seed*
``keep_idx[:, j]``: the token itself when it was kept (a protected token, an unmerged
source, a destination); for a destination, the group it now stands for is itself plus
the sources merged into it.

* **Hidden states** ``(B, N, C)``: `merge` (mean, size-weighted mean or sum over each
  group), `unmerge` back (every merged source receives its destination's value).
* **Token sizes** ``(B, N)``: `merge_size` sums them over each group (the total is
  conserved; ToMe's proportional attention adds their log).
* **Sources** (which original tokens each token covers): `merge_token_map` follows a
  ``(B, N0)`` map of original tokens to current positions; `source_matrix` expands it.
* **Rotary cos/sin, position ids** and other per-token tables: `select` takes, for every
  output position, the value of its seed. A kept token keeps its own; a merged group
  takes its destination's (it attends from the destination's place, as in ToMeSD,
  where the merged value is written back at the destination); the merged sources'
  entries are dropped, and after `unmerge` they get their own again simply by using the
  unmerged table. Tables with a batch axis (B or 1) and shared ones without (``(N,
  D)``) both work; the result has a batch axis of B whenever the plan merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .errors import TokenMergeError

if TYPE_CHECKING:
    from .layout import TokenLayout
    from .policies.base import Matching

__all__ = [
    "MATRIX_MERGE_MAX_TOKENS",
    "MergeForm",
    "MergeMode",
    "MergePlan",
    "proportional_attention_bias",
    "source_matrix",
    "identity_token_map",
]

MergeMode = Literal["mean", "weighted", "sum"]
MERGE_MODES: tuple[str, ...] = ("mean", "weighted", "sum")
MergeForm = Literal["auto", "index", "matrix"]
MERGE_FORMS: tuple[str, ...] = ("auto", "index", "matrix")

#: Largest token count N for which an eager ``form="auto"`` weighted merge of ``(B, N, C)``
#: uses the matrix form, per device type (other devices: never). Its product costs
#: ``2 (N - r) N C`` FLOPs per image against about six memory passes over ``x`` for the
#: index form. ``python benchmarks/merge_forms.py --threads 2`` on the 2-core CPU (torch
#: 2.14.1, float32): at ViT-B/16's 197 tokens (r = 13) the matrix merge took 0.62 of the
#: index one's time at batch 64 and 0.89 at batch 16; at 1025 tokens of width 1152 (batch
#: 16, r = 512) 0.98. A GPU's tensor cores should move the break-even point further out;
#: the GPU figures are open (the same script with ``--device cuda --dtype float16``).
MATRIX_MERGE_MAX_TOKENS: dict[str, int] = {"cpu": 256, "cuda": 1024}


def _expand_index(index: Tensor, x: Tensor) -> Tensor:
    """Broadcast a token index (B, K) over the trailing feature dims of x (B, N, *F)."""
    # (B, K) -> (B, K, *F)
    view = index.reshape(*index.shape, *([1] * (x.dim() - 2)))
    return view.expand(index.shape[0], index.shape[1], *x.shape[2:])


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Which tokens merge into which, as index tensors only.

    Output order: ``[protected prefix | unmerged sources | destinations | protected
    suffix]``; protected tokens are never merged and keep their values bitwise.

    Attributes:
        slot: ``(B, N)`` output position of every input token; merged sources share
            the slot of their destination. `unmerge` is a single gather with it.
        keep_idx: ``(B, N - r)`` the input token that seeds each output position.
        merged_idx: ``(B, r)`` input positions of the merged source tokens.
        merged_slot: ``(B, r)`` output position each merged source is reduced into.
        count: ``(B, N - r)`` float32 number of input tokens in each output position, or
            None (`from_matching` leaves it out): `group_count` then computes it when a
            compiled ``"mean"`` merge needs it (an eager one is a mean scatter-reduce).
    """

    slot: Tensor
    keep_idx: Tensor
    merged_idx: Tensor
    merged_slot: Tensor
    count: Tensor | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def identity(cls, batch: int, num_tokens: int, device: torch.device | str | None = None) -> MergePlan:
        """A plan that merges nothing: ``merge`` and ``unmerge`` return their input."""
        arange = torch.arange(num_tokens, device=device).expand(batch, num_tokens)  # (B, N)
        empty = torch.zeros(batch, 0, dtype=torch.long, device=device)  # (B, 0)
        return cls(slot=arange, keep_idx=arange, merged_idx=empty, merged_slot=empty)

    @classmethod
    def from_matching(
        cls,
        matching: Matching,
        r: int,
        protected: int = 0,
        *,
        suffix: int = 0,
        layout: TokenLayout | None = None,
    ) -> MergePlan:
        """Merge the ``r`` best-scoring sources of ``matching`` into their destinations.

        Args:
            matching: sources, destinations and best pairs over the mergeable tokens
                (token positions counted from the first mergeable token).
            r: how many source tokens to merge, ``0 <= r <= matching.max_merge``.
            protected: number of prefix tokens (class, distillation, registers) that
                are never merged; they keep output positions ``0 .. protected - 1``.
            suffix: number of tokens after the mergeable span that are never merged
                (SD3's text tokens); they become the last ``suffix`` output positions.
            layout: the whole token layout instead of ``protected`` and ``suffix``
                (give one or the other); its span must hold exactly the matching's tokens.

        The output order is ``[prefix | unmerged sources | destinations | suffix]``.
        """
        if layout is not None:
            if protected or suffix:
                raise TokenMergeError(
                    f"give layout or protected/suffix, not both; got layout={layout}, "
                    f"protected={protected!r}, suffix={suffix!r}"
                )
            if matching.num_src + matching.num_dst != layout.num_mergeable:
                raise TokenMergeError(
                    f"layout {layout} has {layout.num_mergeable} mergeable tokens but the matching "
                    f"covers {matching.num_src + matching.num_dst}"
                )
            protected, suffix = layout.prefix, layout.suffix
        if protected < 0 or suffix < 0:
            raise TokenMergeError(f"protected and suffix must be >= 0; got protected={protected}, suffix={suffix}")
        src_idx, dst_idx = matching.src_idx, matching.dst_idx  # (B, Ns), (B, Nd)
        batch, num_src = src_idx.shape
        num_dst = dst_idx.shape[1]
        if not 0 <= r <= matching.max_merge:
            raise TokenMergeError(
                f"r must be between 0 and the number of mergeable sources ({matching.max_merge}); got {r}"
            )
        device = src_idx.device
        span_stop = protected + num_src + num_dst  # one past the last mergeable token
        num_tokens = span_stop + suffix
        if r == 0:  # nothing merges: keep the original order, so merge/unmerge are the identity
            return cls.identity(batch, num_tokens, device)
        num_out = num_tokens - r

        order = matching.score.argsort(dim=-1, descending=True)  # (B, Ns) best first
        merged_src, unmerged_src = order[:, :r], order[:, r:]  # (B, r), (B, Ns - r)
        unmerged_idx = src_idx.gather(1, unmerged_src)  # (B, Ns - r)
        merged_idx = src_idx.gather(1, merged_src)  # (B, r)
        if protected:  # positions were counted after the prefix (skipped when there is none: fewer kernels)
            prefix = torch.arange(protected, device=device).expand(batch, protected)  # (B, P)
            unmerged_idx, merged_idx = unmerged_idx + protected, merged_idx + protected
            parts = [prefix, unmerged_idx, dst_idx + protected]
        else:
            parts = [unmerged_idx, dst_idx]
        if suffix:  # the suffix keeps its tokens, after the destinations
            parts.append(torch.arange(span_stop, num_tokens, device=device).expand(batch, suffix))  # (B, S)
        keep_idx = torch.cat(parts, dim=1)  # (B, N - r)
        first_dst_slot = protected + num_src - r
        merged_slot = matching.best.gather(1, merged_src) + first_dst_slot  # (B, r)

        out_positions = torch.arange(num_out, device=device).expand(batch, num_out)  # (B, N - r)
        slot = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        slot = slot.scatter(1, keep_idx, out_positions).scatter(1, merged_idx, merged_slot)  # (B, N)
        # `count` is left to `group_count`, when a merge needs it (an eager "mean" merge does not).
        return cls(slot=slot, keep_idx=keep_idx, merged_idx=merged_idx, merged_slot=merged_slot)

    # ------------------------------------------------------------------ sizes
    @property
    def batch(self) -> int:
        """Batch size B the plan was built for."""
        return self.slot.shape[0]

    @property
    def num_in(self) -> int:
        """Number of tokens N before merging."""
        return self.slot.shape[1]

    @property
    def num_out(self) -> int:
        """Number of tokens ``N - r`` after merging."""
        return self.keep_idx.shape[1]

    @property
    def r(self) -> int:
        """Number of tokens removed by the merge."""
        return self.merged_idx.shape[1]

    def to(self, device: torch.device | str) -> MergePlan:
        """The same plan with its index tensors on ``device``."""
        count = None if self.count is None else self.count.to(device)
        indices = (self.slot, self.keep_idx, self.merged_idx, self.merged_slot)
        return MergePlan(*(t.to(device) for t in indices), count=count)

    def group_count(self) -> Tensor:
        """``(B, N - r)`` float32: how many input tokens each output position gathers (at least 1)."""
        if self.count is not None:
            return self.count
        ones = torch.ones(self.batch, self.r, device=self.slot.device)  # (B, r)
        return torch.ones(self.batch, self.num_out, device=self.slot.device).scatter_add(1, self.merged_slot, ones)

    # ------------------------------------------------------------------ applying
    def _check_input(self, x: Tensor, num: int, what: str) -> None:
        if x.dim() < 2 or x.shape[1] != num or x.shape[0] not in (self.batch, 1):
            raise TokenMergeError(f"{what} must have shape (B={self.batch}, N={num}, ...); got {tuple(x.shape)}")

    def _sum(self, x: Tensor) -> Tensor:
        # x: (B, N, *F) -> (B, N - r, *F). A gather and a scatter-add (sum), never a "mean"
        # scatter_reduce: inductor lowers scatter-add to fused atomic adds but falls back to
        # a separate ATen kernel (which also recounts the groups) for "mean".
        out = x.gather(1, _expand_index(self.keep_idx, x))  # (B, N - r, *F)
        if self.r == 0:
            return out
        merged = x.gather(1, _expand_index(self.merged_idx, x))  # (B, r, *F)
        return out.scatter_add(1, _expand_index(self.merged_slot, x), merged)

    def _mean(self, x: Tensor) -> Tensor:
        if self.count is None and not torch.compiler.is_compiling():
            # Eager: one mean scatter-reduce (destination included) instead of counting the groups,
            # a scatter-add and a division: fewer Python dispatches for the same means (inside,
            # ATen still counts and divides: about as many kernels).
            out = x.gather(1, _expand_index(self.keep_idx, x))  # (B, N - r, *F)
            merged = x.gather(1, _expand_index(self.merged_idx, x))  # (B, r, *F)
            return out.scatter_reduce(1, _expand_index(self.merged_slot, x), merged, "mean", include_self=True)
        count = _as_column(self.group_count(), x)  # (B, N - r, 1...)
        return self._sum(x) / count

    def _use_matrix(self, x: Tensor, form: MergeForm) -> bool:
        if form == "index" or x.dim() != 3 or not x.is_floating_point():
            return False
        if form == "matrix":
            return True
        limit = MATRIX_MERGE_MAX_TOKENS.get(x.device.type, 0)
        return self.num_in <= limit and not torch.compiler.is_compiling()

    def _matrix_sum(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        # x: (B, N, C) -> (B, N - r, C) as one batched matrix product with the (B, N - r, N)
        # membership matrix (``weight`` of each input token, or 1, in the row of its output
        # slot): x is read once and the output written once, instead of the gathers, the
        # scatter and the elementwise passes of the index form. Accumulates in float32.
        matrix = x.new_zeros(self.batch, self.num_out, self.num_in)  # (B, N - r, N)
        slot = self.slot[:, None, :]  # (B, 1, N)
        if weight is None:
            matrix.scatter_(1, slot, 1.0)
        else:
            matrix.scatter_(1, slot, weight.to(x.dtype)[:, None, :])
        return torch.bmm(matrix, x)  # (B, N - r, C)

    def _weighted(self, x: Tensor, size: Tensor, total: Tensor, form: MergeForm) -> Tensor:
        # size: (B, N) input sizes; total: (B, N - r) their sums per output position.
        if self._use_matrix(x, form):
            return self._matrix_sum(x, size) / total[..., None].to(x.dtype)
        return self._sum(x * _as_column(size, x)) / _as_column(total, x)

    def merge(
        self, x: Tensor, mode: MergeMode = "mean", size: Tensor | None = None, *, form: MergeForm = "auto"
    ) -> Tensor:
        """Merge ``x`` of shape ``(B, N, ...)`` to ``(B, N - r, ...)``.

        Args:
            x: tokens to merge, laid out like the metric the plan was built from.
            mode: ``"mean"`` (tomesd: each output is the plain mean of its group, the
                destination counted once), ``"weighted"`` (ToMe: the mean weighted by
                ``size``) or ``"sum"``.
            size: ``(B, N)`` or ``(B, N, 1)`` token sizes for ``"weighted"``; ones when
                omitted. Merge the sizes themselves with `merge_size`, or both at once
                with `merge_with_size`.
            form: how it is computed (same result up to rounding): ``"index"`` (gathers and
                a scatter), ``"matrix"`` (one batched matrix product with the ``(B, N - r,
                N)`` membership matrix; ``(B, N, C)`` floating inputs only) or ``"auto"``:
                for a ``"weighted"`` merge with sizes, the matrix in eager mode when N is at
                most `MATRIX_MERGE_MAX_TOKENS` for the device (it reads ``x`` once where the
                index form makes about six passes over it; its own cost grows with N); the
                index form otherwise (``"mean"`` and ``"sum"`` take three passes as it is)
                and under `torch.compile` (which fuses it).
        """
        self._check_input(x, self.num_in, "x")
        _check_mode_and_form(mode, form)
        if self.r == 0:
            return x
        if x.shape[0] != self.batch:
            x = x.expand(self.batch, *x.shape[1:])
        if mode == "weighted" and size is not None:
            return self.merge_with_size(x, mode, size, form=form)[0]
        if form == "matrix" and self._use_matrix(x, form):  # "auto" keeps the index form here: as few passes
            total = self._matrix_sum(x)  # (B, N - r, C)
            return total if mode == "sum" else total / self.group_count()[..., None].to(x.dtype)
        return self._sum(x) if mode == "sum" else self._mean(x)

    def merge_with_size(
        self, x: Tensor, mode: MergeMode = "weighted", size: Tensor | None = None, *, form: MergeForm = "auto"
    ) -> tuple[Tensor, Tensor]:
        """`merge` ``x`` and `merge_size` ``size`` in one call: ``(B, N - r, ...)`` and ``(B, N - r)``.

        A ``"weighted"`` merge divides by the merged sizes; this returns them instead of
        computing them a second time (the ViT adapter carries sizes from block to block).
        """
        if mode != "weighted" or size is None:
            return self.merge(x, mode, size, form=form), self.merge_size(size)
        self._check_input(x, self.num_in, "x")
        self._check_input(_flat_size(size), self.num_in, "size")
        _check_mode_and_form(mode, form)
        flat = _flat_size(size).expand(self.batch, -1)  # (B, N)
        total = self.merge_size(flat)  # (B, N - r)
        merged = x if self.r == 0 else self._weighted(x.expand(self.batch, *x.shape[1:]), flat, total, form)
        return merged, (total.unsqueeze(-1) if size.dim() == 3 else total)

    def unmerge(self, y: Tensor) -> Tensor:
        """Unmerge ``y`` of shape ``(B, N - r, ...)`` back to ``(B, N, ...)``.

        Every merged source receives its destination's value; one gather.
        """
        self._check_input(y, self.num_out, "y")
        if self.r == 0:
            return y
        if y.shape[0] != self.batch:
            y = y.expand(self.batch, *y.shape[1:])
        return y.gather(1, _expand_index(self.slot, y))  # (B, N, *F)

    def merge_size(self, size: Tensor | None = None) -> Tensor:
        """Token sizes after the merge: ``(B, N)`` -> ``(B, N - r)``; they still sum to the same total.

        ``size=None`` stands for all ones (every token covers one original token).
        """
        if size is None:
            size = torch.ones(self.batch, self.num_in, device=self.slot.device)
        squeeze = size.dim() == 3
        flat = size.squeeze(-1) if squeeze else size  # (B, N)
        self._check_input(flat, self.num_in, "size")
        if flat.shape[0] != self.batch:
            flat = flat.expand(self.batch, -1)
        out = flat.new_zeros(self.batch, self.num_out).scatter_add(1, self.slot, flat)  # (B, N - r)
        return out.unsqueeze(-1) if squeeze else out

    def merge_token_map(self, token_map: Tensor) -> Tensor:
        """Follow original tokens through this merge.

        ``token_map`` ``(B, N0)`` gives the current position (``< N``) of each of the N0
        original tokens; the result gives their position after this merge (``< N - r``).
        """
        if token_map.shape[0] != self.batch:
            token_map = token_map.expand(self.batch, -1)
        return self.slot.gather(1, token_map)  # (B, N0)

    def select(self, x: Tensor, dim: int = 1) -> Tensor:
        """Per-token side data for the merged tokens: the value of each output position's seed token.

        For output position ``j`` this takes ``x`` at input token ``keep_idx[:, j]``: a
        kept token's own value, and for a merged group its destination's (so a merged
        token attends with its destination's rotary position). The merged sources'
        values are dropped. Nothing is averaged: use it for rotary cos/sin, position
        ids, masks, anything indexed by token rather than summed.

        Args:
            x: a tensor whose axis ``dim`` is the token axis (size N). With ``dim >= 1``
                axis 0 is a batch axis of size B or 1: ``(B, N)`` position ids, ``(B, N,
                D)`` or ``(1, H, N, D)`` rotary tables. With ``dim == 0`` it is a table
                shared by the batch, ``(N, *F)`` such as rotary cos/sin ``(N, D)``.
            dim: the token axis (negative counts from the end).

        Returns:
            ``x`` with its token axis of size ``N - r`` and its batch axis of size B
            (the plan's choice may differ per batch element); a shared table ``(N, *F)``
            becomes ``(B, N - r, *F)``. When the plan merges nothing, ``x`` itself (a
            shared table: a broadcast view ``(B, N, *F)``).
        """
        axis = dim + x.dim() if dim < 0 else dim
        if not 0 <= axis < x.dim() or x.shape[axis] != self.num_in:
            raise TokenMergeError(f"x must have its {self.num_in} tokens on axis dim={dim}; got shape {tuple(x.shape)}")
        if axis == 0:  # a table shared by the batch: (N, *F) -> (B, N - r, *F)
            if self.r == 0:
                return x.unsqueeze(0).expand(self.batch, *x.shape)
            return x[self.keep_idx]  # (B, N - r, *F)
        if x.shape[0] not in (self.batch, 1):
            raise TokenMergeError(
                f"x must have a batch axis of size {self.batch} or 1 before its token axis dim={dim}; "
                f"got shape {tuple(x.shape)}"
            )
        if self.r == 0:
            return x
        lead, trail = axis - 1, x.dim() - axis - 1
        index = self.keep_idx.reshape(self.batch, *([1] * lead), self.num_out, *([1] * trail))  # (B, 1.., N - r, 1..)
        index = index.expand(self.batch, *x.shape[1:axis], self.num_out, *x.shape[axis + 1 :])
        return x.expand(self.batch, *x.shape[1:]).gather(axis, index)  # (B, ..., N - r, ...)


def _check_mode_and_form(mode: str, form: str) -> None:
    if mode not in MERGE_MODES:
        raise TokenMergeError(f"mode must be one of {MERGE_MODES}; got {mode!r}")
    if form not in MERGE_FORMS:
        raise TokenMergeError(f"form must be one of {MERGE_FORMS}; got {form!r}")


def _flat_size(size: Tensor) -> Tensor:
    """Sizes (B, N) or (B, N, 1) as (B, N)."""
    return size.reshape(size.shape[0], -1) if size.dim() > 2 else size


def _as_column(size: Tensor, x: Tensor) -> Tensor:
    """Sizes (B, N) or (B, N, 1) as a weight that broadcasts over x (B, N, *F)."""
    if size.dim() == 3:
        size = size.squeeze(-1)
    return size.reshape(*size.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def identity_token_map(batch: int, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """The token map before any merge: original token i sits at position i. Shape ``(B, N0)``."""
    return torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()


def source_matrix(token_map: Tensor, num_tokens: int) -> Tensor:
    """Which original tokens each current token covers, as a ``(B, N, N0)`` bool matrix.

    Every column has exactly one ``True``: the sources partition the original tokens.
    """
    positions = torch.arange(num_tokens, device=token_map.device)  # (N,)
    return token_map[:, None, :] == positions[None, :, None]  # (B, N, N0)


def proportional_attention_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """ToMe's proportional attention: ``log(size)`` added to the attention logits.

    Args:
        size: token sizes ``(B, N)`` or ``(B, N, 1)``.
        dtype: dtype of the result (the attention's dtype); defaults to ``size.dtype``.

    Returns:
        ``(B, 1, 1, N)``: an additive mask for `torch.nn.functional.scaled_dot_product_attention`,
        broadcast over heads and queries, so fused attention kernels stay usable.
    """
    if size.dim() == 3:
        size = size.squeeze(-1)
    if dtype is not None and dtype.is_floating_point:
        size = size.to(torch.promote_types(size.dtype, dtype))  # float64 attention: the log in float64
    bias = size.log()[:, None, None, :]  # (B, 1, 1, N)
    return bias if dtype is None else bias.to(dtype)
