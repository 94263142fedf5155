"""ToMe in the residual stream of a pre-norm transformer encoder, for any library.

One implementation serves timm's ``VisionTransformer`` and ``Eva`` and the Hugging Face
``transformers`` vision encoders: an adapter describes its model by a `StreamSpec`
(small facts: the blocks and, in each, the attention, the module whose output are the
keys, the MLP branch's norm and last module; how a block takes its tokens, mask and
rotary table; the prefix tokens; where the patch grid, the stream and the final
features are) and `attach_stream` hooks it. No library code is copied or replaced;
every ``forward`` runs as written. A pre-norm block computes::

    x = x + attn_branch(norm1(x))        # N tokens
    x = x + mlp_branch(norm2(x))         # N tokens (library) / N - r (ToMe)

and the hooks are:

* ``attn`` pre-hook: proportional attention. ``log(size)`` ``(B, 1, 1, N)`` is added to
  the attention's mask argument (`StreamSpec.attn_mask`), which every supported
  attention forwards to ``scaled_dot_product_attention`` or adds to its logits, so
  attention stays one fused kernel. Nothing is added before the first merge. Where a
  mask would cost the kernel (CUDA, where flash attention takes no mask:
  `tokenmerge.attention.auto_form`) and the family describes its attention's
  computation (`StreamSpec.attention`: timm's ``Attention``, ``EvaAttention`` and
  ``AttentionRope``), the attention instead gets an instance-level forward
  (`tokenmerge.hooks.HookSet.forward`) that computes the same with the value-weighted
  form (`tokenmerge.attention.proportional_attention`, no mask) for merged calls, and
  calls the library's forward for all others.
* ``keys`` post-hook: the matching metric, the keys attention really uses, before any
  rotary embedding (after qk-norm when the model has it): ToMe's ``k.mean(heads)``,
  from ``(B, H, N, d)`` keys or from a key projection's ``(B, N, H * d)`` output.
* ``mlp_norm`` pre-hook: the plan (``state.plan`` with the stream's current
  `~tokenmerge.layout.TokenLayout`) and the size-weighted merge of the residual stream:
  the MLP runs on ``N - r`` tokens. The merged residual is kept for the block's post-hook.
* ``branch_end`` post-hook (the MLP branch's last module: drop-path, dropout, LayerScale
  or the MLP itself): keep the branch (``N - r`` tokens) and hand the library a zero in
  its place, so its own residual add is a plain copy of ``x``. A module the block also
  calls before the MLP (a dropout shared by both branches) is ignored there: no plan
  is pending yet.
* block post-hook: return ``x_merged + branch``, exactly ToMe's block output, in place of
  the library's. Sizes, the token map and the rotary seeds then advance. It is
  registered first among the block's forward hooks (``prepend``), so forward hooks the
  user registers on a block see the block's true output.
* block pre-hook: block 0 starts a new forward (sizes, sources, masks reset); the user's
  attention mask follows the merges; a rotary table (`StreamSpec.rope`, patch tokens
  only, token axis ``-2``) is replaced by the rows of the merged tokens' seeds: every
  merged token attends at its destination's rotary position (`MergePlan.select` keeps
  the seed of every output token; a destination is its group's seed).

Model-level hooks: ``grid`` records the patch grid; ``stream`` marks the blocks as
running as one stream (the module whose call runs them all); ``output`` (the final norm,
or the encoder) unmerges the tokens back to the input layout through the token map
(one gather) when `TokenStream.dense` asks for it or the pooling reads every token. A
plain mean over the unmerged tokens *is* the size-weighted mean over the merged ones.
``pool_attn`` (an ``nn.MultiheadAttention`` pooling head, SigLIP's) gets ``log(size)``
as its mask over merged tokens: attention pooling weighted by token size.

Token layouts: until the first merge ``TokenLayout.image(h, w, prefix=num_prefix)`` (a
sequence when the patches do not form the grid); every merge chains it with
`TokenLayout.after_merge`.

Rules (the adapters' docstrings name the family-specific ones):

* ``r`` above what a block can merge is clamped by the threshold policy to the block's
  number of source tokens, so every block keeps at least ``floor(n / 2)`` patch tokens
  and all prefix tokens.
* A user attention mask (SDPA layout, broadcast to ``(B, H, N, N)``) follows the
  merges: along keys a group gets ``log(weighted mean(exp(mask)))`` of its members,
  along queries the weighted mean of its members' rows. ``is_causal=True`` cannot be
  combined with merging (``TokenMergeError``).
* Blocks called one by one, outside the stream module (``forward_intermediates``, or a
  loop of the user's own): every block returns its tokens dense, unmerged to the input
  layout through the token map, and the next block takes them back to the merged
  layout by gathering one input position of every merged token (exact copies).
* Gradient checkpointing is refused while tokens merge (the recomputation would run
  the stateful hooks twice).

State: what a forward computes between hooks is per call and per thread
(`tokenmerge.hooks.PerThread`), so a merged model may be called from several threads
at once; `merge_record` reads the calling thread's last forward.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import attention as _attention
from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet, ModuleHook, PerThread, copied_ref
from ..layout import TokenLayout
from ..placements import TokenStream
from ..plan import MergeMode, MergePlan, identity_token_map, proportional_attention_bias, source_matrix
from ..policies.matchers import RandomGrid
from ..state import MergeState
from .specs import Argument

__all__ = [
    "StreamBlock",
    "StreamSpec",
    "attach_stream",
    "merging_blocks",
    "refuse_grid_matchers_after_merges",
    "ViTMergeRecord",
    "merge_record",
    "unmerge_tokens",
    "unmerge_to_patches",
    "carry_mask",
    "select_rope",
    "merge_stream",
]


# ---------------------------------------------------------------------------- description
@dataclass(frozen=True)
class StreamBlock:
    """The sub-modules of one pre-norm block that the stream hooks.

    Attributes:
        module: the block; called with the tokens (`StreamSpec.tokens`).
        attn: the self-attention; its pre-hook adds proportional attention to
            `StreamSpec.attn_mask`.
        keys: the module whose output are the keys: ``(B, H, N, d)`` (``heads`` None) or
            ``(B, N, heads * d)`` (a key projection).
        heads: number of key heads when ``keys`` outputs ``(B, N, heads * d)``.
        mlp_norm: the norm in front of the MLP; its input is merged.
        branch_end: the MLP branch's last module before the residual add.
    """

    module: nn.Module
    attn: nn.Module
    keys: nn.Module
    heads: int | None
    mlp_norm: nn.Module
    branch_end: nn.Module


def _false(_: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class StreamSpec:
    """A model described for `attach_stream`: where its blocks are and how they are called.

    Attributes:
        blocks: every block of the stream, in order.
        tokens: the block's token argument.
        mask: the block's attention-mask argument (the user's mask), or None.
        causal: the block's ``is_causal`` argument, or None.
        rope: the block's rotary table argument (patch tokens only, token axis ``-2``:
            ``(P, d)``, ``(H, P, d)`` or ``(B, H, P, d)``), or None.
        attn_tokens: the attention's token argument.
        attn_mask: the attention's additive mask argument (where the bias goes).
        num_prefix: class/distillation/register tokens in front of the patches.
        grid: the module whose forward hook reads the patch grid (``grid_of``).
        grid_of: ``(module, args, output) -> (h, w) | None``.
        stream: the module whose call runs all the blocks in order, or None.
        output: the module whose output are the final features (a tensor, or an
            object with ``last_hidden_state``); unmerged when dense.
        pool_reads_all: ``model -> bool``: the head reads more than the class token.
        checkpointing: ``model -> bool``: gradient checkpointing is on.
        pool_attn: an ``nn.MultiheadAttention`` pooling head over the final tokens, or None.
        attention: ``(attn, sizes, args, kwargs) -> output``: the attention module's
            forward computed with value-weighted proportional attention over ``sizes``
            ``(B, N)`` (`tokenmerge.adapters.stream_attention`), or None (the mask form
            only).
    """

    blocks: tuple[StreamBlock, ...]
    tokens: Argument
    mask: Argument | None
    causal: Argument | None
    rope: Argument | None
    attn_tokens: Argument
    attn_mask: Argument
    num_prefix: int
    grid: nn.Module
    grid_of: Callable[[nn.Module, tuple[Any, ...], Any], tuple[int, int] | None]
    stream: nn.Module | None
    output: nn.Module | None
    pool_reads_all: Callable[[nn.Module], bool] = _false
    checkpointing: Callable[[nn.Module], bool] = _false
    pool_attn: nn.Module | None = None
    attention: Callable[[nn.Module, Tensor, tuple[Any, ...], dict[str, Any]], Tensor] | None = None


def nchw_grid(_: nn.Module, args: tuple[Any, ...], out: Any) -> tuple[int, int] | None:
    """The grid of a patch convolution's ``(B, C, h, w)`` output."""
    if isinstance(out, Tensor) and out.dim() == 4:
        return int(out.shape[-2]), int(out.shape[-1])
    return None


# ---------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ViTMergeRecord:
    """What merging did in a model's last forward.

    Attributes:
        num_prefix: prefix tokens (class, distillation, registers); never merged.
        grid: ``(h, w)`` patch grid of the last input, None when the patch tokens did not
            form it (patch dropout).
        num_input: tokens entering the first block, prefix included (N0).
        num_tokens: tokens leaving the last block that ran, prefix included.
        sizes: ``(B, num_tokens)`` float32: how many input tokens each token covers;
            None when nothing merged.
        token_map: ``(B, N0)`` position of every input token after the last block; None
            unless sources were tracked (`TokenStream.dense`, ``trace_source`` or a
            pooling that reads every token) and something merged.
    """

    num_prefix: int
    grid: tuple[int, int] | None
    num_input: int
    num_tokens: int
    sizes: Tensor | None
    token_map: Tensor | None

    def full_token_map(self, batch: int = 1) -> Tensor:
        """``token_map``, or the identity map ``(batch, N0)`` when nothing merged."""
        if self.token_map is not None:
            return self.token_map
        check(self.num_tokens == self.num_input, "token_map was not tracked: apply with trace_source=True")
        return identity_token_map(batch, self.num_input)

    def source_matrix(self, batch: int = 1) -> Tensor:
        """``(B, num_tokens, N0)`` bool: which input tokens each token covers (a partition)."""
        return source_matrix(self.full_token_map(batch), self.num_tokens)

    def patch_groups(self, batch: int = 1) -> Tensor:
        """``(B, N0 - num_prefix)``: for every patch, the index of the merged token covering it.

        Indices count from the first non-prefix token, so they lie in
        ``[0, num_tokens - num_prefix)``.
        """
        return self.full_token_map(batch)[:, self.num_prefix :] - self.num_prefix


def _run_of(model: nn.Module) -> _Run | None:
    """The `_Run` of the config applied to ``model`` (found through its patch-grid hook)."""
    for module in model.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, ModuleHook) and isinstance(hook.fn, _GridPost):
                return hook.fn.run
    return None


def merge_record(model: nn.Module) -> ViTMergeRecord | None:
    """The `ViTMergeRecord` of ``model``'s last forward in the calling thread.

    None if no config is applied or the model has not run in this thread.
    """
    run = _run_of(model)
    call = run.call if run is not None else None
    if call is None or call.num_input == 0:
        return None
    first = call.input_layout
    return ViTMergeRecord(
        num_prefix=first.prefix if first is not None else run.num_prefix,  # type: ignore[union-attr]
        grid=first.grid if first is not None and first.rank == 2 else None,  # type: ignore[arg-type]
        num_input=call.num_input,
        num_tokens=call.num_tokens,
        sizes=call.sizes,
        token_map=call.token_map,
    )


def unmerge_tokens(tokens: Tensor, token_map: Tensor) -> Tensor:
    """Copy every merged token back to the positions of the input tokens it covers.

    Args:
        tokens: ``(B, N, C)`` merged tokens.
        token_map: ``(B, N0)`` position (``< N``) of each input token.

    Returns:
        ``(B, N0, C)`` in input order, prefix first.
    """
    index = token_map[..., None].expand(-1, -1, tokens.shape[-1])  # (B, N0, C)
    return tokens.expand(token_map.shape[0], -1, -1).gather(1, index)  # (B, N0, C)


def unmerge_to_patches(tokens: Tensor, record: ViTMergeRecord, *, as_grid: bool = False) -> Tensor:
    """Dense patch features from the final tokens of a merged forward.

    Args:
        tokens: ``(B, num_tokens, C)`` tokens of the last block's layout (e.g. from
            ``forward_features`` or a merged ``last_hidden_state``), or ``(B, N0, C)``
            tokens already in input layout.
        record: `merge_record` of the same forward.
        as_grid: return ``(B, C, h, w)`` on the patch grid instead of ``(B, h*w, C)``.

    Returns:
        ``(B, N0 - num_prefix, C)`` (or the grid): each patch gets the features of the
        merged token that covers it; prefix tokens are dropped.
    """
    check(tokens.dim() == 3, f"tokens must be (B, N, C); got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == record.num_tokens and record.num_tokens != record.num_input:
        tokens = unmerge_tokens(tokens, record.full_token_map(tokens.shape[0]))  # (B, N0, C)
    check(
        tokens.shape[1] == record.num_input,
        f"tokens must have {record.num_tokens} (merged) or {record.num_input} (input) tokens; got {tokens.shape[1]}",
    )
    patches = tokens[:, record.num_prefix :]  # (B, h*w, C)
    if not as_grid:
        return patches
    check(record.grid is not None, "as_grid needs the patch grid, which the last input did not form")
    h, w = record.grid  # type: ignore[misc]
    return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)  # (B, C, h, w)


# ---------------------------------------------------------------------------- maths
def attn_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in for input ``x`` (the autocast dtype under autocast)."""
    if x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype  # also on "meta" (shape-only runs, e.g. counting operators), which has no autocast


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An SDPA mask as an additive float bias: bool True -> 0, False -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def carry_mask(mask: Tensor, plan: MergePlan, mode: MergeMode, size: Tensor | None) -> Tensor:
    """Follow an additive attention mask through a merge of its tokens.

    Args:
        mask: additive bias broadcastable to ``(B, H, N, N)`` (queries, keys).
        plan: the merge of the N tokens.
        mode: the token merge mode; ``size`` weights as in `MergePlan.merge`.
        size: ``(B, N)`` token sizes before the merge, None for ones.

    Returns:
        ``(b, h, q, k)`` with every dim of length N merged: keys to the log of the
        mean of ``exp(mask)`` over a group, queries to the mean of the group's rows.
    """
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (b, h, q, k)
    if mask.shape[-1] == plan.num_in:
        keys = mask.movedim(-1, 1).exp()  # (b, k, h, q)
        mask = plan.merge(keys, mode, size).log().movedim(1, -1)  # (B, h, q, k - r)
    if mask.shape[-2] == plan.num_in:
        rows = mask.movedim(-2, 1)  # (b, q, h, k)
        mask = plan.merge(rows, mode, size).movedim(1, -2)  # (B, h, q - r, k)
    return mask


def select_rope(rope: Tensor, seeds: Tensor) -> Tensor:
    """The rotary rows of the current tokens: row ``seeds[b, j]`` of ``rope`` for token ``j``.

    Args:
        rope: a rotary table over the P patch tokens, token axis ``-2``: ``(P, d)``,
            ``(H, P, d)`` or ``(B or 1, H or 1, P, d)``.
        seeds: ``(B, P')`` the patch index (``< P``) of every current patch token's seed.

    Returns:
        ``(B, H or 1, P', d)``, broadcastable against ``(B, H, P', d)`` queries and keys.
    """
    batch, count = seeds.shape
    if rope.dim() == 2:
        return rope[seeds].unsqueeze(1)  # (B, 1, P', d)
    table = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape))  # (b, h, P, d)
    table = table.expand(batch, *table.shape[1:])  # (B, h, P, d)
    index = seeds[:, None, :, None].expand(batch, table.shape[1], count, table.shape[-1])  # (B, h, P', d)
    return table.gather(2, index)  # (B, h, P', d)


def merge_stream(plan: MergePlan, x: Tensor, mode: MergeMode, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
    """ToMe's merge of the residual stream: `MergePlan.merge_with_size`, weighing only the merged sources.

    The kept tokens are copied once (prefix and unmerged sources stay exact copies);
    then every destination ``d`` moves towards its merged sources ``j``:
    ``x_d + sum_j w_j (x_j - x_d) / W_d``, which is the group's weighted mean (weights
    ``w``: the sizes for ``"weighted"``, ones for ``"mean"``; ``W_d`` their sum over the
    group). Only ``r`` rows are read and written besides the copy, where the generic
    merge weighs and divides every token. Plans of other classes (the benchmarks'
    ideal) merge their own way.

    Args:
        plan: the block's plan.
        x: ``(B, N, C)`` the residual stream.
        mode: ``"weighted"`` or ``"mean"``.
        sizes: ``(B, N)`` token sizes, None for ones.

    Returns:
        ``(B, N - r, C)`` merged tokens and ``(B, N - r)`` their sizes.
    """
    if type(plan) is not MergePlan or x.dim() != 3 or x.shape[0] != plan.batch:
        return plan.merge_with_size(x, mode, sizes)
    merged_sizes = plan.merge_size(sizes)  # (B, N - r)
    slot = plan.merged_slot  # (B, r) output position of every merged source
    if mode == "weighted" and sizes is not None:
        weight, group = sizes.gather(1, plan.merged_idx), merged_sizes  # (B, r), (B, N - r)
    else:
        weight, group = None, plan.group_count()  # "mean", or weighted by unit sizes: counts
    channels = x.shape[-1]
    kept = x.gather(1, plan.keep_idx[..., None].expand(-1, -1, channels))  # (B, N - r, C)
    sources = x.gather(1, plan.merged_idx[..., None].expand(-1, -1, channels))  # (B, r, C)
    index = slot[..., None].expand(-1, -1, channels)  # (B, r, C)
    destinations = kept.gather(1, index)  # (B, r, C) before any update
    exact = x.dtype if x.dtype == torch.float64 else torch.float32  # sizes are float32
    coeff = group.gather(1, slot).to(exact).reciprocal()  # (B, r): 1 / W_d
    if weight is not None:
        coeff = coeff * weight.to(exact)
    delta = (sources - destinations) * coeff.to(x.dtype)[..., None]  # (B, r, C)
    if kept.requires_grad:  # autograd keeps kept for the gather above: no in-place update
        return kept.scatter_add(1, index, delta), merged_sizes
    return kept.scatter_add_(1, index, delta), merged_sizes  # (B, N - r, C)


# ---------------------------------------------------------------------------- runtime
class _RunCall:
    """The state of one forward (one per thread): layout, sizes, sources, seeds, mask."""

    def __init__(self) -> None:
        self.patch_grid: tuple[int, int] | None = None  # (h, w) of the last patch embedding
        self.input_layout: TokenLayout | None = None  # the tokens entering the first block
        self.layout: TokenLayout | None = None  # the stream's tokens now: prefix, then grid or merged sequence
        self.batch = 0
        self.num_input = 0
        self.num_tokens = 0
        self.merged = False
        self.track = False
        self.is_causal = False
        self.in_stream = False  # inside the stream module; False when blocks are called one by one
        self.sizes: Tensor | None = None  # (B, N) float32 once something merged
        self.token_map: Tensor | None = None  # (B, N0) once something merged and tracked
        self.seeds: Tensor | None = None  # (B, N) input position of every token's seed, with a rotary table
        self.first_of: Tensor | None = None  # (B, N) an input position of every token, for dense block outputs
        self.user_mask: Tensor | None = None
        self.mask: Tensor | None = None  # the user mask in the current layout, additive
        self.dtype: torch.dtype = torch.float32


class _Run:
    """One applied model: what the config says (shared) and its forward calls (`call`, per thread)."""

    def __init__(self, model: nn.Module, config: MergeConfig, placement: TokenStream, spec: StreamSpec) -> None:
        self.model = weakref.ref(model)
        self.mode: MergeMode = config.mode
        self.dense = bool(placement.dense)
        self.trace_source = placement.trace_source
        self.num_prefix = spec.num_prefix  # protected in every layout
        self.seeded = spec.rope is not None
        self._pool_reads_all = spec.pool_reads_all
        self._checkpointing = spec.checkpointing
        self._per_thread = PerThread(_RunCall)

    @property
    def call(self) -> _RunCall:
        """The calling thread's forward."""
        return self._per_thread.value

    def __deepcopy__(self, memo: dict[int, Any]) -> _Run:
        new = copy.copy(self)
        memo[id(self)] = new
        new.model = copied_ref(self.model, memo) or self.model
        new._per_thread = PerThread(_RunCall)
        return new

    def pool_reads_all(self) -> bool:
        """Whether the model's head reads more than the class token (so it needs every token)."""
        model = self.model()
        return model is not None and self._pool_reads_all(model)

    def begin(self, x: Tensor) -> None:
        """Start a new forward with block input ``x`` ``(B, N0, C)``."""
        model = self.model()
        if model is not None and torch.is_grad_enabled() and self._checkpointing(model):
            raise TokenMergeError(
                "gradient checkpointing must be off while tokens merge: the recomputed blocks would merge twice "
                "(timm: model.set_grad_checkpointing(False); transformers: model.gradient_checkpointing_disable())"
            )
        call = self.call
        call.batch, call.num_input = x.shape[0], x.shape[1]
        call.num_tokens = call.num_input
        call.layout = call.input_layout = self.input_layout(call.num_input, call.patch_grid)
        call.merged = False
        # Blocks called one by one (forward_intermediates) return dense outputs: that needs the sources.
        call.track = self.trace_source or self.dense or not call.in_stream or self.pool_reads_all()
        call.is_causal = False
        call.sizes = call.token_map = call.seeds = call.first_of = call.user_mask = call.mask = None
        call.dtype = attn_dtype(x)

    def input_layout(self, num_input: int, grid: tuple[int, int] | None) -> TokenLayout | None:
        """The layout of ``num_input`` tokens entering the blocks: the prefix, then the patch grid.

        A sequence when the patches do not form ``grid`` (patch dropout); None when only
        prefix tokens are left (nothing merges then).
        """
        patches = num_input - self.num_prefix
        if patches < 1:
            return None
        if grid is not None and grid[0] * grid[1] == patches:
            return TokenLayout.image(grid[0], grid[1], prefix=self.num_prefix)
        return TokenLayout.sequence(patches, prefix=self.num_prefix)

    def follows(self, x: Tensor) -> bool:
        """Whether ``x`` is laid out as the current forward expects."""
        call = self.call
        return x.shape[0] == call.batch and x.shape[1] == call.num_tokens

    def advance(self, plan: MergePlan, sizes: Tensor | None = None) -> None:
        """Account for ``plan`` having merged the tokens (call after merging with the old sizes).

        ``sizes``: the merged sizes when the merge already computed them (`MergePlan.merge_with_size`).
        """
        call = self.call
        if call.user_mask is not None:
            current = call.mask if call.mask is not None else _additive(call.user_mask, call.dtype)
            call.mask = carry_mask(current, plan, self.mode, call.sizes)
        if call.track:
            previous = call.token_map
            if previous is None:
                previous = identity_token_map(plan.batch, call.num_input, device=plan.slot.device)  # (B, N0)
            call.token_map = plan.merge_token_map(previous)  # (B, N0)
        if self.seeded:
            seeds = call.seeds
            if seeds is None:
                seeds = torch.arange(call.num_input, device=plan.slot.device)[None]  # (1, N0)
            call.seeds = plan.select(seeds, dim=1)  # (B, N - r): a merged token keeps its destination's
        call.sizes = plan.merge_size(call.sizes) if sizes is None else sizes  # (B, N - r)
        call.num_tokens = plan.num_out
        if call.layout is not None:
            call.layout = call.layout.after_merge(plan)  # the same prefix, then a sequence of N - r - prefix
        call.first_of = None
        call.merged = True

    def rope_in(self, rope: Tensor) -> Tensor | None:
        """A block's rotary table for the current tokens (None: keep it, nothing merged yet)."""
        call = self.call
        seeds = call.seeds
        if seeds is None or not call.merged or rope.shape[-2] != call.num_input - self.num_prefix:
            return None
        return select_rope(rope, seeds[:, self.num_prefix :] - self.num_prefix)  # (B, h, P', d)

    def dense_out(self, out: Tensor) -> Tensor | None:
        """A block's merged output ``(B, N, C)`` unmerged to ``(B, N0, C)`` when blocks run one by one, else None."""
        call = self.call
        if call.in_stream or not call.merged or call.token_map is None or not self.follows(out):
            return None
        return unmerge_tokens(out, call.token_map)  # (B, N0, C)

    def merged_in(self, x: Tensor) -> Tensor | None:
        """A dense block input ``(B, N0, C)`` (from `dense_out`) back in the merged layout, else None."""
        call = self.call
        token_map = call.token_map
        if call.in_stream or not call.merged or token_map is None or call.num_tokens == call.num_input:
            return None
        if x.dim() != 3 or x.shape[:2] != (call.batch, call.num_input):
            return None
        if call.first_of is None:
            positions = torch.arange(call.num_input, device=token_map.device).expand_as(token_map)  # (B, N0)
            first = torch.full((call.batch, call.num_tokens), call.num_input, device=token_map.device)
            call.first_of = first.scatter_reduce(1, token_map, positions, "amin")  # (B, N)
        return x.gather(1, call.first_of[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, C): exact copies


class _Stream:
    """Hooks on the stream module: whether the blocks run as one stream."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def enter(self, *_: Any) -> None:
        self.run.call.in_stream = True

    def leave(self, *_: Any) -> None:
        self.run.call.in_stream = False


class _BlockCall:
    """Between the hooks of one block call (one per thread)."""

    def __init__(self) -> None:
        self.metric: Tensor | None = None
        self.plan: MergePlan | None = None
        self.residual: Tensor | None = None  # (B, N - r, C) the merged residual stream
        self.sizes: Tensor | None = None  # (B, N - r) token sizes after the merge
        self.branch: Tensor | None = None  # (B, N - r, C) the MLP branch on merged tokens


@dataclass(frozen=True)
class _Calls:
    """The arguments of `StreamSpec` the block hooks read (no module references: safe to deep-copy)."""

    tokens: Argument
    mask: Argument | None
    causal: Argument | None
    rope: Argument | None
    attn_tokens: Argument
    attn_mask: Argument


class _BlockHooks:
    """The hooks of one block; ``layer`` is None for a block that does not merge."""

    def __init__(
        self,
        run: _Run,
        state: MergeState,
        calls: _Calls,
        index: int,
        layer: tuple[int, int] | None,
        heads: int | None,
        attention: Callable[[nn.Module, Tensor, tuple[Any, ...], dict[str, Any]], Tensor] | None = None,
    ) -> None:
        self.attention = attention
        self.run = run
        self.state = state
        self.calls = calls
        self.index = index
        self.layer = layer  # (index among merging blocks, number of merging blocks)
        self.heads = heads
        self.key = f"blocks.{index}"
        self._per_thread = PerThread(_BlockCall)

    @property
    def call(self) -> _BlockCall:
        """The calling thread's block call."""
        return self._per_thread.value

    def attach(self, hooks: HookSet, block: StreamBlock, prop_attn: bool) -> None:
        hooks.pre(block.module, self.block_pre)
        # First among the block's forward hooks: the user's, registered before or after, see its true output.
        hooks.post(block.module, self.block_post, prepend=True)
        if prop_attn:
            hooks.pre(block.attn, self.attn_pre)
            if self.attention is not None:
                hooks.forward(block.attn, self.attn_forward)
        if self.layer is None:
            return
        hooks.post(block.keys, self.keys_post)
        hooks.pre(block.mlp_norm, self.norm2_pre)
        hooks.post(block.branch_end, self.branch_post)

    def block_pre(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls, run = self.calls, self.run
        x = calls.tokens.get(args, kwargs)  # (B, N, C)
        changed = False
        merged_in = run.merged_in(x) if self.index != 0 else None  # a dense output of the block before
        if merged_in is not None:
            args, kwargs = calls.tokens.replace(args, kwargs, merged_in)  # (B, N, C)
            changed = True
        elif self.index == 0 or not run.follows(x):
            run.begin(x)
        call = run.call
        call.is_causal = bool(calls.causal.get(args, kwargs)) if calls.causal is not None else False
        if calls.rope is not None:
            rope = calls.rope.get(args, kwargs)
            rows = run.rope_in(rope) if isinstance(rope, Tensor) else None
            if rows is not None:
                args, kwargs = calls.rope.replace(args, kwargs, rows)  # (B, h, P', d)
                changed = True
        mask = calls.mask.get(args, kwargs) if calls.mask is not None else None
        if mask is not None and call.merged:
            return calls.mask.replace(args, kwargs, call.mask)  # type: ignore[union-attr]
        if mask is not None:
            call.user_mask = mask
        return (args, kwargs) if changed else None

    def value_weighted(self, attn: nn.Module, x: Tensor) -> bool:
        """Whether this call of ``attn`` on ``x`` takes the value-weighted form (`attn_forward`)."""
        if self.attention is None or not getattr(attn, "fused_attn", True):
            return False  # no description, or the library's unfused path (attention maps): keep the mask
        dropout = attn.attn_drop.p if attn.training else 0.0
        return _attention.auto_form(x.device, int(attn.head_dim), dropout_p=dropout) == "value"

    def attn_forward(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """The attention's instance-level forward: value-weighted for merged calls, else the library's."""
        sizes = self.run.call.sizes
        x = self.calls.attn_tokens.get(args, kwargs)  # (B, N, C)
        if sizes is None or x is None or sizes.shape[1] != x.shape[1] or not self.value_weighted(attn, x):
            return type(attn).forward(attn, *args, **kwargs)
        assert self.attention is not None
        return self.attention(attn, sizes, args, kwargs)  # (B, N, C)

    def attn_pre(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sizes = self.run.call.sizes
        x = self.calls.attn_tokens.get(args, kwargs)  # (B, N, C)
        if sizes is None or x is None or sizes.shape[1] != x.shape[1] or self.value_weighted(attn, x):
            return None
        bias = proportional_attention_bias(sizes, dtype=attn_dtype(x))  # (B, 1, 1, N)
        mask = self.calls.attn_mask.get(args, kwargs)
        if mask is not None:
            bias = _additive(mask, bias.dtype) + bias  # broadcast to (B, H, N, N) at most
        return self.calls.attn_mask.replace(args, kwargs, bias)

    def keys_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], keys: Tensor) -> None:
        if self.heads is None:
            self.call.metric = keys.detach().mean(dim=1)  # (B, H, N, d) -> (B, N, d)
            return
        batch, num = keys.shape[:2]
        self.call.metric = keys.detach().reshape(batch, num, self.heads, -1).mean(dim=2)  # (B, N, H*d) -> (B, N, d)

    def norm2_pre(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        run, call = self.run, self.call
        metric = call.metric
        call.metric, call.plan, call.residual, call.branch, call.sizes = None, None, None, None, None
        x = args[0]  # (B, N, C): every supported norm takes its input positionally
        layout = run.call.layout  # image (h, w) after the prefix before the first merge, a sequence after
        if metric is None or metric.shape[:2] != x.shape[:2] or layout is None:
            return None
        assert self.layer is not None
        index, count = self.layer
        plan = self.state.plan(self.key, metric, layout=layout, layer_index=index, num_layers=count)
        if plan.r == 0:
            return None
        if run.call.is_causal:
            raise TokenMergeError("is_causal must be False while tokens merge: merged tokens have no causal order")
        call.plan = plan
        call.residual, call.sizes = merge_stream(plan, x, run.mode, run.call.sizes)  # (B, N - r, C), (B, N - r)
        return (call.residual, *args[1:]), kwargs

    def branch_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        plan = self.call.plan
        if plan is None or self.call.branch is not None or out.shape[1] != plan.num_out:
            return None  # not the MLP branch (a dropout the attention branch shares, called before the MLP)
        self.call.branch = out  # (B, N - r, C)
        return out.new_zeros(())  # the library adds this to x (N tokens): x comes out unchanged, and is discarded

    def block_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        run, call = self.run, self.call
        plan, residual, branch, sizes = call.plan, call.residual, call.branch, call.sizes
        call.plan, call.residual, call.branch, call.sizes = None, None, None, None
        if plan is not None:
            if residual is None or branch is None:  # pragma: no cover - the block's forward is checked by its adapter
                raise TokenMergeError(f"{self.key}: the block did not run its MLP norm and branch as expected")
            run.advance(plan, sizes)
            out = residual + branch  # (B, N - r, C): ToMe's x_merged + mlp_branch(norm2(x_merged))
        dense = run.dense_out(out)  # blocks called one by one: every output dense, in input order
        if dense is not None:
            return dense  # (B, N0, C)
        return out if plan is not None else None


def _hidden(out: Any) -> Tensor | None:
    """The final features in ``out``: a tensor, or an output object's ``last_hidden_state``."""
    if isinstance(out, Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if isinstance(hidden, Tensor) else None


class _OutputPost:
    """The final features' forward hook: unmerge the tokens back to the input layout."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        run = self.run
        call = run.call
        hidden = _hidden(out)
        if call.token_map is None or hidden is None or hidden.dim() != 3 or not run.follows(hidden):
            return None
        if not (run.dense or run.pool_reads_all()):
            return None
        dense = unmerge_tokens(hidden, call.token_map)  # (B, N0, C)
        if isinstance(out, Tensor):
            return dense
        out.last_hidden_state = dense
        return out


class _PoolAttnPre:
    """An ``nn.MultiheadAttention`` pooling head's pre-hook: ``log(size)`` over merged keys."""

    def __init__(self, run: _Run, heads: int) -> None:
        self.run = run
        self.heads = heads

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sizes = self.run.call.sizes
        keys = args[1] if len(args) > 1 else kwargs.get("key")  # (B, N, C)
        if sizes is None or not isinstance(keys, Tensor) or keys.shape[:2] != sizes.shape:
            return None
        query = args[0] if args else kwargs["query"]  # (B, L, C)
        check(kwargs.get("attn_mask") is None, "the pooling head must be called without attn_mask while tokens merge")
        bias = proportional_attention_bias(sizes, dtype=attn_dtype(keys))[:, 0]  # (B, 1, N)
        bias = bias.expand(-1, query.shape[1], -1).repeat_interleave(self.heads, dim=0)  # (B * heads, L, N)
        return args, {**kwargs, "attn_mask": bias}


class _GridPost:
    """The patch embedding's forward hook: record the patch grid of this forward."""

    def __init__(self, run: _Run, grid_of: Callable[[nn.Module, tuple[Any, ...], Any], tuple[int, int] | None]) -> None:
        self.run = run
        self.grid_of = grid_of

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        self.run.call.patch_grid = self.grid_of(module, args, out)


# ---------------------------------------------------------------------------- attach
def merging_blocks(placement: TokenStream, depth: int) -> range:
    """The indices of the blocks ``placement`` merges in, among ``depth``."""
    first, last = placement.blocks if placement.blocks is not None else (0, depth - 1)
    return range(first, last + 1)


def refuse_grid_matchers_after_merges(config: MergeConfig, placement: TokenStream, merging: range) -> None:
    """Raise `TokenMergeError` when a grid matcher would see merged tokens.

    Grid matchers (`RandomGrid`, `StridedGrid`, the presets built on them) partition the
    patch grid, and only the first merging block sees it: after a merge the stream's
    layout is a sequence (`TokenLayout.after_merge`). So they may merge in one block only.
    """
    if isinstance(config.matcher, RandomGrid) and len(merging) > 1:
        matcher = type(config.matcher).__name__
        raise TokenMergeError(
            f"{matcher} is a grid matcher: on a ViT only the first merging block sees the patch grid, but "
            f"TokenStream.blocks spans {len(merging)} blocks ({merging.start}..{merging.stop - 1}); "
            f"placement=TokenStream(blocks=(i, i)) merges in block i alone"
        )


def check_stream(config: MergeConfig, placement: TokenStream, depth: int) -> range:
    """The checks every stream adapter makes at `tokenmerge.apply`; returns the merging blocks."""
    from .base import check_layer_counts

    check(config.mode != "sum", "mode must be 'weighted' or 'mean' on a ViT: summed tokens would grow each block")
    if placement.blocks is not None:
        check(
            placement.blocks[1] < depth,
            f"TokenStream.blocks must lie within the model's {depth} blocks; got {placement.blocks}",
        )
    merging = merging_blocks(placement, depth)
    refuse_grid_matchers_after_merges(config, placement, merging)
    check_layer_counts(config, len(merging), f"the ViT merges in {len(merging)} blocks (TokenStream.blocks)")
    return merging


def attach_stream(
    model: nn.Module, spec: StreamSpec, config: MergeConfig, placement: TokenStream, state: MergeState, hooks: HookSet
) -> None:
    """Hook ``model`` as ``spec`` describes it, merging in the blocks of ``placement``.

    ``placement.dense`` must be resolved to a bool by the adapter (its family's default).
    """
    merging = merging_blocks(placement, len(spec.blocks))
    run = _Run(model, config, placement, spec)
    calls = _Calls(spec.tokens, spec.mask, spec.causal, spec.rope, spec.attn_tokens, spec.attn_mask)
    hooks.post(spec.grid, _GridPost(run, spec.grid_of))
    for index, block in enumerate(spec.blocks):
        layer = (merging.index(index), len(merging)) if index in merging else None
        block_hooks = _BlockHooks(run, state, calls, index, layer, block.heads, spec.attention)
        block_hooks.attach(hooks, block, placement.prop_attn)
    if spec.output is not None:
        hooks.post(spec.output, _OutputPost(run), prepend=True)
    if spec.pool_attn is not None:  # size-weighted pooling: what the head computes over the unmerged tokens
        hooks.pre(spec.pool_attn, _PoolAttnPre(run, int(spec.pool_attn.num_heads)))
    if spec.stream is not None:
        stream = _Stream(run)
        hooks.pre(spec.stream, stream.enter)
        hooks.post(spec.stream, stream.leave, always_call=True)
