"""timm Vision Transformers: ToMe in the residual stream, attached with hooks only.

The hooks and the runtime are `tokenmerge.adapters.stream`'s, shared with timm ``Eva`` and
the Hugging Face encoders; this module describes a timm ``VisionTransformer`` to it
(`vit_stream_spec`). How a timm 1.0 ``Block`` computes, and where the hooks sit (none of timm's code is
copied or replaced; its ``forward`` runs as written)::

    x = x + drop_path1(ls1(attn(norm1(x), attn_mask=...)))   # N tokens
    x = x + drop_path2(ls2(mlp(norm2(x))))                   # N tokens (timm) / N - r (ToMe)

* ``attn`` pre-hook: proportional attention. On the CPU ``log(size)`` ``(B, 1, 1, N)``
  is added to the ``attn_mask`` keyword timm already forwards to
  ``scaled_dot_product_attention``, so attention stays one fused kernel. On CUDA, where
  a mask rules out flash attention (and for N not a multiple of 16 SDPA first pads it
  into a full ``(B, H, N, N + pad)`` copy), merged calls of the attention run the
  value-weighted form instead (no mask: `tokenmerge.attention`), computed by
  `tokenmerge.adapters.stream_attention.timm_attention` with the module's own weights
  from an instance-level forward that `remove` deletes. Nothing changes before the
  first merge.
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

from typing import Any

from timm.layers import Attention
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..config import MergeConfig
from ..errors import TokenMergeError
from ..hooks import HookSet
from ..placements import TokenStream
from ..state import MergeState
from .base import Adapter
from .eva_stream import SUPPORTED_FAMILIES as EVA_FAMILIES
from .eva_stream import eva_stream_spec, eva_unsupported
from .specs import Argument
from .stream import (
    StreamBlock,
    StreamSpec,
    ViTMergeRecord,
    attach_stream,
    carry_mask,
    check_stream,
    merge_record,
    refuse_grid_matchers_after_merges,
    unmerge_to_patches,
    unmerge_tokens,
)
from .stream_attention import timm_attention

__all__ = ["TimmViTAdapter", "ViTMergeRecord", "merge_record", "unmerge_to_patches", "SUPPORTED_FAMILIES"]

_REEXPORTED = (carry_mask, refuse_grid_matchers_after_merges, unmerge_tokens)  # kept importable from here

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
_EVA_FAMILY = "a ViT (timm Eva)"

#: ``global_pool`` values that read only the class token, so merged tokens need no unmerge.
_TOKEN_POOLS: tuple[str, ...] = ("token",)

#: How timm's ``Block`` and ``Attention`` take their arguments.
_TOKENS = Argument("x", 0)
_MASK = Argument("attn_mask", 1)
_CAUSAL = Argument("is_causal", 2)


def timm_pool_reads_all(model: nn.Module) -> bool:
    """Whether a timm model's head reads more than the class token (so it needs every token)."""
    pool = getattr(model, "global_pool", "token")
    return getattr(model, "attn_pool", None) is not None or pool not in _TOKEN_POOLS


def timm_checkpointing(model: nn.Module) -> bool:
    """Whether a timm model has gradient checkpointing on."""
    return bool(getattr(model, "grad_checkpointing", False))


def timm_patch_grid(module: nn.Module, args: tuple[Any, ...], out: Any) -> tuple[int, int] | None:
    """The patch grid of a timm ``PatchEmbed`` call (NHWC output under a dynamic image size)."""
    if isinstance(out, Tensor) and out.dim() == 4:
        return int(out.shape[1]), int(out.shape[2])
    grid = getattr(module, "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def timm_stream_block(block: nn.Module) -> StreamBlock:
    """The `StreamBlock` of a timm ``Block`` or ``EvaBlock``: attention, key norm, ``norm2``, ``drop_path2``."""
    return StreamBlock(block, block.attn, block.attn.k_norm, None, block.norm2, block.drop_path2)


def vit_stream_spec(model: VisionTransformer) -> StreamSpec:
    """The `StreamSpec` of a timm ``VisionTransformer``: blocks run as one ``nn.Sequential``."""
    return StreamSpec(
        blocks=tuple(timm_stream_block(block) for block in model.blocks),
        tokens=_TOKENS,
        mask=_MASK,
        causal=_CAUSAL,
        rope=None,
        attn_tokens=_TOKENS,
        attn_mask=_MASK,
        num_prefix=int(getattr(model, "num_prefix_tokens", 0)),
        grid=model.patch_embed,
        grid_of=timm_patch_grid,
        stream=model.blocks,
        output=model.norm,
        pool_reads_all=timm_pool_reads_all,
        checkpointing=timm_checkpointing,
        attention=timm_attention,
    )


def dense_placement(placement: TokenStream, default: bool) -> TokenStream:
    """``placement`` with `TokenStream.dense` resolved (None: the family's ``default``)."""
    if placement.dense is not None:
        return placement
    return TokenStream(placement.blocks, placement.prop_attn, placement.trace_source, default)


# ---------------------------------------------------------------------------- adapter
def _unsupported(target: Any) -> str | None:
    """Why ``target`` cannot be merged, or None when it can."""
    if isinstance(target, Eva):
        return eva_unsupported(target)
    if not isinstance(target, VisionTransformer):
        return f"got {type(target).__module__}.{type(target).__qualname__}"
    for index, block in enumerate(target.blocks):
        if type(block) is not Block:
            return f"blocks.{index} is a {type(block).__qualname__}, not a vision_transformer.Block"
        if type(block.attn) is not Attention:
            return f"blocks.{index}.attn is a {type(block.attn).__qualname__}, not a timm.layers.Attention"
    return None


class TimmViTAdapter(Adapter):
    """ToMe merging for timm Vision Transformers (`VisionTransformer`, its distilled variant, and ``Eva``).

    ``Eva`` models (EVA-02, DINOv3, Perception Encoder, ``vit_*rope*``) are described by
    `tokenmerge.adapters.eva_stream` (rotary tables follow the merged tokens).

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
    supported = SUPPORTED_FAMILIES + EVA_FAMILIES
    placements = (TokenStream,)

    def accepts(self, target: Any) -> bool:
        """True for any timm module: `check` names the supported families for the others."""
        return isinstance(target, nn.Module)

    def check(self, target: Any, config: MergeConfig) -> None:
        """Reject unsupported models and settings; changes nothing."""
        reason = _unsupported(target)
        if reason is not None:
            raise TokenMergeError(
                f"target must be one of: {'; '.join(SUPPORTED_FAMILIES + EVA_FAMILIES)}; {reason}. Not supported: "
                "BEiT (relative position bias), Swin (windowed attention) and other timm models"
            )
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        check_stream(config, placement, len(target.blocks))

    def family(self, target: Any) -> str:
        """``"a ViT (timm VisionTransformer)"`` (or ``Eva``), for error messages."""
        return _EVA_FAMILY if isinstance(target, Eva) else _FAMILY

    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Hook the patch embedding, every block and the final norm of ``target``."""
        placement = self.placement(target, config)
        assert isinstance(placement, TokenStream)
        spec = eva_stream_spec(target) if isinstance(target, Eva) else vit_stream_spec(target)
        attach_stream(target, spec, config, dense_placement(placement, True), state, hooks)
