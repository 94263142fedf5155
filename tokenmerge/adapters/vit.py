"""timm Vision Transformers: ToMe in the residual stream, attached with hooks only.

How a timm 1.0 ``Block`` computes, and where the hooks sit (none of timm's code is
copied or replaced; its ``forward`` runs as written)::

    x = x + drop_path1(ls1(attn(norm1(x), attn_mask=...)))   # N tokens
    x = x + drop_path2(ls2(mlp(norm2(x))))                   # N tokens (timm) / N - r (ToMe)

* ``attn`` pre-hook: proportional attention. ``log(size)`` ``(B, 1, 1, N)`` is added to
  the ``attn_mask`` keyword timm already forwards to ``scaled_dot_product_attention``,
  so attention stays one fused kernel (on CUDA the memory-efficient or cuDNN one: flash
  attention takes no mask; for N not a multiple of 16 SDPA first pads the mask into a
  full ``(B, H, N, N + pad)`` copy). Nothing is added before the first merge.
* ``attn.k_norm`` post-hook: the matching metric, the keys attention really uses
  (after qk-norm when the model has it; ``k_norm`` is an ``nn.Identity`` otherwise,
  which makes the metric exactly ToMe's ``k.mean(heads)``).
* ``norm2`` pre-hook: the plan (``state.plan`` with the stream's current
  `~tokenmerge.layout.TokenLayout`, see below) and the merge of the residual stream,
  size-weighted: the MLP runs on ``N - r`` tokens. The merged residual is kept for the
  block's post-hook.
* ``drop_path2`` post-hook: keep the MLP branch ``ls2(mlp(norm2(x_merged)))`` (``N - r``
  tokens) and hand timm a zero in its place, so timm's own residual add is a plain copy
  of ``x`` (no unmerge, no second merge).
* ``Block`` post-hook: return ``x_merged + branch``, exactly ToMe's block output, in place
  of timm's (which is ``x`` unchanged by then). Sizes and sources then advance. This
  relies on timm's ``Block.forward`` being the two lines above, which is why the adapter
  accepts `vision_transformer.Block` itself and no subclass. It is registered first
  among the block's forward hooks (``prepend``), so forward hooks the user registers on
  a block, before or after `apply`, see the block's true output.

Model-level hooks: ``patch_embed`` records the patch grid; ``blocks`` (the
``nn.Sequential``) marks the blocks as running as one stream, as ``forward_features``
runs them; block 0's pre-hook starts a new forward (sizes, sources, masks reset; this
also covers direct calls of ``forward_features`` or ``forward_intermediates``); the final ``norm`` post-hook
unmerges the tokens back to the full input layout through the source map (one gather),
so ``forward_features`` keeps the unpatched model's shape: dense outputs by default.
With ``TokenStream(dense=False)`` it returns the merged tokens instead, except when the
pooling reads more than the class token (``avg``, ``avgmax``, ``max``, ``map``, ``''``).
A plain mean over the unmerged tokens *is* the size-weighted mean over the merged ones,
so ``global_pool='avg'`` is weighted by token size without touching timm's
``forward_head``.

Token layouts: the stream describes its tokens to the runtime by a
`~tokenmerge.layout.TokenLayout` per block call. Until the first merge it is
``TokenLayout.image(h, w, prefix=num_prefix_tokens)``: the class, distillation and
register tokens protected, the patch tokens on the patch grid (a sequence ``(n,)`` when
they do not form it, e.g. under patch dropout). Every merge chains it with
`TokenLayout.after_merge`: the same prefix, then a sequence of the merged tokens, which
form no grid.

Rules:

* ``r`` above what a block can merge is clamped by the threshold policy to the block's
  number of source tokens (`Matching.max_merge`; ``ceil(n / 2)`` of the ``n`` patch
  tokens for `AlternatingBipartite`), so every block keeps at least ``floor(n / 2)``
  patch tokens and all prefix tokens. (ToMe's own clamp is ``floor(n / 2)``.)
* A user ``attn_mask`` given to the model (SDPA layout, broadcast to ``(B, H, N, N)``)
  follows the merges: along keys a group gets ``log(weighted mean(exp(mask)))`` of its
  members (so an unmasked group gets 0 and proportional attention adds ``log(size)``),
  along queries the weighted mean of its members' rows. ``is_causal=True`` cannot be
  combined with merging (``TokenMergeError``).
* Grid matchers (`RandomGrid`, `StridedGrid` and the presets built on them) need the
  patch grid, which only the first merging block sees: `apply` refuses them when the
  `TokenStream` placement spans more than one block; ``placement=TokenStream(blocks=(i,
  i))`` merges in block ``i`` alone.
* Blocks called one by one (``forward_intermediates``, or ``forward_features`` with an
  ``attn_mask``/``is_causal``, or a loop of the user's own): every block returns its
  tokens dense, unmerged to the input layout through the token map (prefix first, then
  the patches in order), and the next block takes them back to the merged layout by
  gathering one input position of every merged token (exact copies: the blocks compute
  bit for bit what the stream computes). So ``forward_intermediates`` returns dense
  features for every intermediate, with ``norm=True`` or ``False`` and
  ``output_fmt='NCHW'`` or ``'NLC'``; the final features are dense as well, also with
  ``TokenStream(dense=False)``. The cost is one gather in and out per block, only on
  this path.
* Gradient checkpointing is refused while tokens merge (the recomputation would run
  the stateful hooks twice).

State: what a forward computes between hooks (sizes, token map, mask, the plan and
branch of the running block) is per call and per thread (`tokenmerge.hooks.PerThread`),
so a merged ViT may be called from several threads at once, each call getting exactly
its serial result; `merge_record` reads the calling thread's last forward.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..hooks import HookSet, ModuleHook, PerThread, copied_ref
from ..layout import TokenLayout
from ..placements import TokenStream
from ..plan import MergeMode, MergePlan, identity_token_map, proportional_attention_bias, source_matrix
from ..policies.matchers import RandomGrid
from ..state import MergeState
from .base import Adapter, check_layer_counts

__all__ = ["TimmViTAdapter", "ViTMergeRecord", "merge_record", "unmerge_to_patches", "SUPPORTED_FAMILIES"]

#: The model families this adapter handles, as shown in error messages.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "timm VisionTransformer whose blocks are vision_transformer.Block with timm.layers.Attention "
    "(vit_*, deit_*, deit3_*, register-token and LayerScale/qk-norm variants)",
    "timm VisionTransformerDistilled (deit_*_distilled_*)",
)

#: Keys of the deprecated ``MergeConfig.options`` this adapter reads (now `TokenStream.dense`).
OPTIONS: tuple[str, ...] = ("dense",)

#: The family's name in error messages.
_FAMILY = "a ViT (timm VisionTransformer)"

#: ``global_pool`` values that read only the class token, so merged tokens need no unmerge.
_TOKEN_POOLS: tuple[str, ...] = ("token",)


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
            unless sources were tracked (`TokenStream.dense`, the default, ``trace_source``
            or a pooling that reads every token) and something merged.
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
    """The `_Run` of the config applied to ``model`` (found through its patch-embedding hook)."""
    patch_embed = getattr(model, "patch_embed", None)
    if not isinstance(patch_embed, nn.Module):
        return None
    for hook in patch_embed._forward_hooks.values():
        if isinstance(hook, ModuleHook) and isinstance(hook.fn, _PatchEmbedPost):
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
            ``forward_features``), or ``(B, N0, C)`` tokens already in input layout.
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


# ---------------------------------------------------------------------------- runtime
def _attn_dtype(x: Tensor) -> torch.dtype:
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


class _RunCall:
    """The state of one forward of a ViT (one per thread): layout, sizes, sources, mask."""

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
        self.in_stream = False  # inside ``model.blocks(x)``; False when blocks are called one by one
        self.sizes: Tensor | None = None  # (B, N) float32 once something merged
        self.token_map: Tensor | None = None  # (B, N0) once something merged and tracked
        self.first_of: Tensor | None = None  # (B, N) an input position of every token, for dense block outputs
        self.user_mask: Tensor | None = None
        self.mask: Tensor | None = None  # the user mask in the current layout, additive
        self.dtype: torch.dtype = torch.float32


class _Run:
    """One applied model: what the config says (shared) and its forward calls (`call`, per thread)."""

    def __init__(self, model: nn.Module, config: MergeConfig, placement: TokenStream) -> None:
        self.model = weakref.ref(model)
        self.mode: MergeMode = config.mode
        self.dense = placement.dense
        self.trace_source = placement.trace_source
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))  # protected in every layout
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
        if model is None:
            return False
        pool = getattr(model, "global_pool", "token")
        return getattr(model, "attn_pool", None) is not None or pool not in _TOKEN_POOLS

    def begin(self, x: Tensor) -> None:
        """Start a new forward with block input ``x`` ``(B, N0, C)``."""
        model = self.model()
        if model is not None and getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise TokenMergeError(
                "grad_checkpointing must be off while tokens merge: the recomputed blocks would merge twice "
                "(call model.set_grad_checkpointing(False))"
            )
        call = self.call
        call.batch, call.num_input = x.shape[0], x.shape[1]
        call.num_tokens = call.num_input
        call.layout = call.input_layout = self.input_layout(call.num_input, call.patch_grid)
        call.merged = False
        # Blocks called one by one (forward_intermediates) return dense outputs: that needs the sources.
        call.track = self.trace_source or self.dense or not call.in_stream or self.pool_reads_all()
        call.is_causal = False
        call.sizes = call.token_map = call.first_of = call.user_mask = call.mask = None
        call.dtype = _attn_dtype(x)

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
        call.sizes = plan.merge_size(call.sizes) if sizes is None else sizes  # (B, N - r)
        call.num_tokens = plan.num_out
        if call.layout is not None:
            call.layout = call.layout.after_merge(plan)  # the same prefix, then a sequence of N - r - prefix
        call.first_of = None
        call.merged = True

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
    """Hooks on ``model.blocks``: whether the blocks run as one stream (``forward_features``)."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def enter(self, *_: Any) -> None:
        self.run.call.in_stream = True

    def leave(self, *_: Any) -> None:
        self.run.call.in_stream = False


def _mask_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    if "attn_mask" in kwargs:
        return kwargs["attn_mask"]
    return args[1] if len(args) > 1 else None


def _with_mask(args: tuple[Any, ...], kwargs: dict[str, Any], mask: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "attn_mask" in kwargs or len(args) <= 1:
        return args, {**kwargs, "attn_mask": mask}
    return (args[0], mask, *args[2:]), kwargs


class _BlockCall:
    """Between the hooks of one block call (one per thread)."""

    def __init__(self) -> None:
        self.metric: Tensor | None = None
        self.plan: MergePlan | None = None
        self.residual: Tensor | None = None  # (B, N - r, C) the merged residual stream
        self.sizes: Tensor | None = None  # (B, N - r) token sizes after the merge
        self.branch: Tensor | None = None  # (B, N - r, C) the MLP branch on merged tokens


class _BlockHooks:
    """The hooks of one ``Block``; ``layer`` is None for a block that does not merge."""

    def __init__(self, run: _Run, state: MergeState, index: int, layer: tuple[int, int] | None) -> None:
        self.run = run
        self.state = state
        self.index = index
        self.layer = layer  # (index among merging blocks, number of merging blocks)
        self.key = f"blocks.{index}"
        self._per_thread = PerThread(_BlockCall)

    @property
    def call(self) -> _BlockCall:
        """The calling thread's block call."""
        return self._per_thread.value

    def attach(self, hooks: HookSet, block: nn.Module, prop_attn: bool) -> None:
        hooks.pre(block, self.block_pre)
        # First among the block's forward hooks: the user's, registered before or after, see its true output.
        hooks.post(block, self.block_post, prepend=True)
        if prop_attn:
            hooks.pre(block.attn, self.attn_pre)
        if self.layer is None:
            return
        hooks.post(block.attn.k_norm, self.keys_post)
        hooks.pre(block.norm2, self.norm2_pre)
        hooks.post(block.drop_path2, self.branch_post)

    def block_pre(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs["x"]  # (B, N, C)
        run = self.run
        merged_in = run.merged_in(x) if self.index != 0 else None  # a dense output of the block before
        if merged_in is not None:
            x = merged_in  # (B, N, C)
            args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})
        elif self.index == 0 or not run.follows(x):
            run.begin(x)
        call = run.call
        call.is_causal = bool(kwargs.get("is_causal", args[2] if len(args) > 2 else False))
        mask = _mask_arg(args, kwargs)
        if mask is None or not call.merged:
            if mask is not None:
                call.user_mask = mask
            return (args, kwargs) if merged_in is not None else None
        return _with_mask(args, kwargs, call.mask)

    def attn_pre(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sizes = self.run.call.sizes
        x = args[0] if args else kwargs["x"]  # (B, N, C)
        if sizes is None or sizes.shape[1] != x.shape[1]:
            return None
        bias = proportional_attention_bias(sizes, dtype=_attn_dtype(x))  # (B, 1, 1, N)
        mask = _mask_arg(args, kwargs)
        if mask is not None:
            bias = _additive(mask, bias.dtype) + bias  # broadcast to (B, H, N, N) at most
        return _with_mask(args, kwargs, bias)

    def keys_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], keys: Tensor) -> None:
        self.call.metric = keys.detach().mean(dim=1)  # (B, H, N, d) -> (B, N, d)

    def norm2_pre(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        run, call = self.run, self.call
        metric = call.metric
        call.metric, call.plan, call.residual, call.branch, call.sizes = None, None, None, None, None
        x = args[0]  # (B, N, C)
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
        call.residual, call.sizes = plan.merge_with_size(x, run.mode, run.call.sizes)  # (B, N - r, C), (B, N - r)
        return (call.residual, *args[1:]), kwargs

    def branch_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        plan = self.call.plan
        if plan is None or out.shape[1] != plan.num_out:
            return None
        self.call.branch = out  # (B, N - r, C)
        return out.new_zeros(())  # timm adds this to x (N tokens): x comes out unchanged, and is discarded

    def block_post(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        run, call = self.run, self.call
        plan, residual, branch, sizes = call.plan, call.residual, call.branch, call.sizes
        call.plan, call.residual, call.branch, call.sizes = None, None, None, None
        if plan is not None:
            if residual is None or branch is None:  # pragma: no cover - timm's Block.forward is checked to be Block's
                raise TokenMergeError(f"{self.key}: the block did not run norm2 and drop_path2 as timm's Block does")
            run.advance(plan, sizes)
            out = residual + branch  # (B, N - r, C): ToMe's x_merged + ls2(mlp(norm2(x_merged)))
        dense = run.dense_out(out)  # blocks called one by one: every output dense, in input order
        if dense is not None:
            return dense  # (B, N0, C)
        return out if plan is not None else None


class _NormPost:
    """The final norm's forward hook: unmerge the tokens back to the input layout."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Any:
        run = self.run
        call = run.call
        if call.token_map is None or out.dim() != 3 or not run.follows(out):
            return None
        if run.dense or run.pool_reads_all():
            return unmerge_tokens(out, call.token_map)  # (B, N0, C)
        return None


class _PatchEmbedPost:
    """The patch embedding's forward hook: record the patch grid of this forward."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        call = self.run.call
        if isinstance(out, Tensor) and out.dim() == 4:  # NHWC (dynamic image size)
            call.patch_grid = (int(out.shape[1]), int(out.shape[2]))
            return
        grid = getattr(module, "grid_size", None)
        call.patch_grid = (int(grid[0]), int(grid[1])) if grid is not None else None


def _norm_post(run: _Run) -> Any:
    return _NormPost(run)


def _patch_embed_post(run: _Run) -> Any:
    return _PatchEmbedPost(run)


# ---------------------------------------------------------------------------- adapter
def _unsupported(target: Any) -> str | None:
    """Why ``target`` cannot be merged, or None when it can."""
    if not isinstance(target, VisionTransformer):
        return f"got {type(target).__module__}.{type(target).__qualname__}"
    for index, block in enumerate(target.blocks):
        if type(block) is not Block:
            return f"blocks.{index} is a {type(block).__qualname__}, not a vision_transformer.Block"
        if type(block.attn) is not Attention:
            return f"blocks.{index}.attn is a {type(block.attn).__qualname__}, not a timm.layers.Attention"
    return None


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


def _merging_blocks(placement: TokenStream, depth: int) -> range:
    first, last = placement.blocks if placement.blocks is not None else (0, depth - 1)
    return range(first, last + 1)


class TimmViTAdapter(Adapter):
    """ToMe merging for timm Vision Transformers (`VisionTransformer` and its distilled variant).

    The one placement it takes is `TokenStream` (the default): every block in
    ``TokenStream.blocks`` (all blocks by default) merges its residual stream between
    attention and MLP, with any `Matcher`/`ThresholdPolicy`; the module docstring of
    `tokenmerge.adapters.vit` describes the hooks and the rules (clamping of ``r``,
    masks, pooling).

    Reads from the config: ``matcher``, ``threshold``, ``cache``, ``mode``
    (``"weighted"`` for ToMe, or ``"mean"``), ``seed``, and the placement's
    ``blocks``, ``prop_attn``, ``trace_source`` and ``dense`` (default True:
    ``forward_features`` returns every input token, unmerged; False: the merged tokens,
    for token-pooling models). Other placements and ``mode="sum"`` are rejected; of
    the deprecated fields, ``merge_attn``, ``merge_mlp`` and ``max_downsample`` are
    diffusion settings and are ignored.
    """

    name = "timm-vit"
    supported = SUPPORTED_FAMILIES
    placements = (TokenStream,)

    def accepts(self, target: Any) -> bool:
        """True for any timm module: `check` names the supported families for the others."""
        return isinstance(target, nn.Module)

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject unsupported models and settings; changes nothing."""
        reason = _unsupported(target)
        if reason is not None:
            raise TokenMergeError(
                f"target must be one of: {'; '.join(SUPPORTED_FAMILIES)}; {reason}. Not supported: EVA (rotary "
                "embeddings), BEiT (relative position bias), Swin (windowed attention) and other timm models"
            )
        check(config.mode != "sum", "mode must be 'weighted' or 'mean' on a ViT: summed tokens would grow each block")
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        depth = len(target.blocks)
        if placement.blocks is not None:
            check(
                placement.blocks[1] < depth,
                f"TokenStream.blocks must lie within the model's {depth} blocks; got {placement.blocks}",
            )
        merging = _merging_blocks(placement, depth)
        refuse_grid_matchers_after_merges(config, placement, merging)
        check_layer_counts(config, len(merging), f"the ViT merges in {len(merging)} blocks (TokenStream.blocks)")

    def family(self, target: Any) -> str:
        """``"a ViT (timm VisionTransformer)"``, for error messages."""
        return _FAMILY

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook the patch embedding, every block and the final norm of ``target``."""
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        merging = _merging_blocks(placement, len(target.blocks))
        run = _Run(target, config, placement)
        hooks.post(target.patch_embed, _patch_embed_post(run))
        for index, block in enumerate(target.blocks):
            layer = (merging.index(index), len(merging)) if index in merging else None
            _BlockHooks(run, state, index, layer).attach(hooks, block, placement.prop_attn)
        hooks.post(target.norm, _norm_post(run), prepend=True)
        stream = _Stream(run)
        hooks.pre(target.blocks, stream.enter)
        hooks.post(target.blocks, stream.leave, always_call=True)
