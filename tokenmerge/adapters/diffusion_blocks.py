"""The merge hooks on diffusers transformer blocks.

Two ways of merging, both through forward hooks only:

* `SubLayerMerge` (tomesd, ToDo): a pre-hook on a `BasicTransformerBlock` computes the
  block's plan from its input; self-attention, cross-attention and the feed-forward
  layer each run on merged tokens and are unmerged right after (`merge_around`), or,
  with ``kv_only`` (ToDo), self-attention keeps every query and attends to merged keys
  and values (the merged tokens are passed as its ``encoder_hidden_states``).
* `RangeMerge` (ToMe-style, DiT/PixArt): the residual stream is merged before block
  ``first``, stays merged through block ``last`` (self-attention gets ``log(size)`` as an
  additive attention mask: proportional attention) and is unmerged after it.

The plans between hooks are per call and per thread (`tokenmerge.hooks.PlanSlot`, the
range's `PerThread` call state), so threads can share one merged denoiser.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..config import MergeConfig
from ..errors import TokenMergeError
from ..hooks import HookSet, PerThread, PlanSlot, merge_around
from ..plan import MergePlan, proportional_attention_bias
from ..state import MergeState
from .diffusion_layout import BlockSite, DenoiserLayout
from .diffusion_steps import StepTracker, get_argument

__all__ = ["SubLayerMerge", "RangeMerge", "fused_self_attention", "KV_ONLY_FUSED_MESSAGE"]

# BasicTransformerBlock.forward(hidden_states, attention_mask, ...): positions of the arguments read here.
_HIDDEN = (0, "hidden_states")
_MASK = (1, "attention_mask")

KV_ONLY_FUSED_MESSAGE = (
    "kv_only (ToDo) cannot run on a self-attention with fused QKV projections (fuse_qkv_projections): "
    "its processor has no separate key/value projection; call unfuse_qkv_projections() first"
)


def fused_self_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` runs a fused-projection processor (``FusedAttnProcessor2_0`` and kin) without a ``to_kv``.

    Such a processor projects separate keys and values through ``attn.to_kv``, which a
    fused self-attention does not have.
    """
    processor = getattr(attn, "processor", None)
    return type(processor).__name__.startswith("Fused") and getattr(attn, "to_kv", None) is None


def _replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if len(args) > index:
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


class SubLayerMerge:
    """Per-sub-layer merging in one transformer block (tomesd's scheme; ToDo with ``kv_only``).

    Args:
        config: the merging policy (``merge_attn``, ``merge_crossattn``, ``merge_mlp``,
            ``kv_only``, ``mode``).
        state: the merging state that computes and caches plans.
        tracker: the denoiser's step tracker (latent size of the current call).
        layout: the denoiser's layout.
        site: the block.
        layer_index, num_layers: the block's place among the merging blocks.
    """

    def __init__(
        self,
        config: MergeConfig,
        state: MergeState,
        tracker: StepTracker,
        layout: DenoiserLayout,
        site: BlockSite,
        layer_index: int,
        num_layers: int,
    ) -> None:
        self.config, self.state, self.tracker, self.layout, self.site = config, state, tracker, layout, site
        self.layer_index, self.num_layers = layer_index, num_layers
        self.attn, self.cross, self.mlp, self.kv = PlanSlot(), PlanSlot(), PlanSlot(), PlanSlot()

    def attach(self, hooks: HookSet) -> None:
        """Register the block's plan hook and the hooks around its chosen sub-layers."""
        block, config = self.site.block, self.config
        hooks.pre(block, self._plan)
        hooks.post(block, self._clear, always_call=True)
        if config.merge_attn and config.kv_only:
            hooks.pre(block.attn1, self._merge_keys_values)
        elif config.merge_attn:
            merge_around(hooks, block.attn1, self.attn, config.mode)
        if config.merge_crossattn:
            merge_around(hooks, block.attn2, self.cross, config.mode)
        if config.merge_mlp:
            merge_around(hooks, block.ff, self.mlp, config.mode)

    def _clear(self, *_: Any) -> None:
        self.attn.plan = self.cross.plan = self.mlp.plan = self.kv.plan = None

    def _plan(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._clear()
        x = get_argument(args, kwargs, *_HIDDEN)  # (B, N, C)
        if not isinstance(x, Tensor) or x.dim() != 3:
            return
        grid = self.layout.grid(self.tracker.latent_hw, self.site, x.shape[1])
        if grid is None:
            return
        plan = self.state.plan(self.site.name, x, layer_index=self.layer_index, num_layers=self.num_layers, grid=grid)
        if plan.r == 0:
            return
        # A self-attention mask over the N image tokens would not fit N - r merged tokens.
        self_attention_ok = get_argument(args, kwargs, *_MASK) is None
        self.attn.plan = plan if self_attention_ok else None
        self.kv.plan = plan if self_attention_ok else None
        self.cross.plan = plan
        self.mlp.plan = plan

    def _merge_keys_values(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self.kv.plan
        if plan is None or kwargs.get("encoder_hidden_states") is not None:
            return None
        x = get_argument(args, kwargs, *_HIDDEN)  # (B, N, C)
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[:2] != (plan.batch, plan.num_in):
            return None
        if fused_self_attention(attn):
            raise TokenMergeError(KV_ONLY_FUSED_MESSAGE)
        keys_values = plan.merge(x, mode=self.config.mode)  # (B, N - r, C): keys and values only
        return args, {**kwargs, "encoder_hidden_states": keys_values}


class _RangeCall:
    """The range's plan for the running denoiser call (one per thread)."""

    def __init__(self) -> None:
        self.plan: MergePlan | None = None
        self.size: Tensor | None = None  # (B, N - r)
        self.bias: Tensor | None = None  # (B, 1, N - r)


class RangeMerge:
    """ToMe-style merging of the residual stream over a range of blocks of a patch transformer.

    A pre-hook on block ``first`` matches its input tokens, merges them (``config.mode``,
    sizes tracked) and hands the merged stream on; every block in the range gets
    ``log(size)`` as its self-attention mask when ``config.prop_attn`` (a ``(B, 1, N')``
    additive bias that diffusers' attention processors broadcast over heads and queries,
    so SDPA stays fused); a post-hook on block ``last`` unmerges the output to all tokens.
    Timestep and class/caption conditioning are per sample and broadcast over tokens.

    A call whose blocks receive an attention mask of their own runs unmerged.

    Args:
        config: the merging policy (``blocks``, ``mode``, ``prop_attn``).
        state: the merging state.
        tracker: the denoiser's step tracker.
        layout: the denoiser's layout.
    """

    def __init__(self, config: MergeConfig, state: MergeState, tracker: StepTracker, layout: DenoiserLayout) -> None:
        assert config.blocks is not None
        self.config, self.state, self.tracker, self.layout = config, state, tracker, layout
        self.first, self.last = config.blocks
        self._per_thread = PerThread(_RangeCall)  # plan, sizes and bias of the running call
        tracker.on_call(self.clear)

    @property
    def call(self) -> _RangeCall:
        """The calling thread's plan, sizes and bias."""
        return self._per_thread.value

    @property
    def key(self) -> str:
        """The layer key of the range's plan."""
        return f"transformer_blocks.{self.first}-{self.last}"

    def clear(self) -> None:
        """Forget the plan of the previous call (done at the start of every denoiser call)."""
        call = self.call
        call.plan = call.size = call.bias = None

    def attach(self, hooks: HookSet) -> None:
        """Hook the blocks of the range."""
        sites = self.layout.sites
        hooks.pre(sites[self.first].block, self._merge)
        for site in sites[self.first : self.last + 1]:
            hooks.pre(site.block, self._add_bias)
        hooks.post(sites[self.last].block, self._unmerge, always_call=True, prepend=True)

    def _merge(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.clear()
        x = get_argument(args, kwargs, *_HIDDEN)  # (B, N, C)
        if not isinstance(x, Tensor) or x.dim() != 3 or get_argument(args, kwargs, *_MASK) is not None:
            return None
        site = self.layout.sites[self.first]
        grid = self.layout.grid(self.tracker.latent_hw, site, x.shape[1])
        if grid is None:
            return None
        plan = self.state.plan(self.key, x, layer_index=0, num_layers=1, grid=grid)
        if plan.r == 0:
            return None
        call = self.call
        call.plan = plan
        call.size = plan.merge_size()  # (B, N - r): original tokens each merged token covers
        if self.config.prop_attn:
            call.bias = proportional_attention_bias(call.size, x.dtype)[:, 0]  # (B, 1, N - r)
        merged = plan.merge(x, mode=self.config.mode)  # (B, N - r, C)
        return _replace_argument(args, kwargs, *_HIDDEN, merged)

    def _add_bias(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan, bias = self.call.plan, self.call.bias
        if plan is None or bias is None:
            return None
        x = get_argument(args, kwargs, *_HIDDEN)  # (B, N - r, C) inside the range
        if not isinstance(x, Tensor) or x.shape[:2] != (plan.batch, plan.num_out):
            return None
        return _replace_argument(args, kwargs, *_MASK, bias)

    def _unmerge(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        # The plan is kept until the next denoiser call: gradient checkpointing re-runs the
        # blocks of the range (and these hooks) during the backward pass.
        plan = self.call.plan
        if plan is None or not isinstance(output, Tensor) or output.shape[:2] != (plan.batch, plan.num_out):
            return None
        return plan.unmerge(output)  # (B, N, C)
