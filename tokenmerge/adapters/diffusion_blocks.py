"""The merge hooks on diffusers transformer blocks.

Two ways of merging, both through forward hooks only:

* `SubLayerMerge` (tomesd, ToDo): a pre-hook on a transformer block computes the
  block's plan from its input; self-attention, cross-attention and the feed-forward
  layer each run on merged tokens and are unmerged right after (`merge_around`;
  placement `SubLayers`), or self-attention keeps every query and attends to merged
  keys and values (the merged tokens are passed as its ``encoder_hidden_states``;
  placement `KeyValues`).
* `RangeMerge` (ToMe-style, DiT/PixArt; placement `ResidualRange`): the residual stream
  is merged before block ``first``, stays merged through block ``last`` (self-attention
  gets ``log(size)`` as an additive attention mask: proportional attention) and is
  unmerged after it.

Which argument of a block carries the tokens and the mask, which output is the image
stream and which sub-modules merge is read from the block's `BlockSpec`
(``site.call``), not guessed from positions. The tokens of each block call are
described to the runtime by their `~tokenmerge.layout.TokenLayout`
(`DenoiserLayout.token_layout`: ``TokenLayout.image(h, w)`` on the block's grid,
nothing protected), which `MergeState.plan` takes as ``layout=``.

The plans between hooks are per call and per thread (`tokenmerge.hooks.PlanSlot`, the
range's `PerThread` call state), so threads can share one merged denoiser.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..config import MergeConfig
from ..errors import TokenMergeError
from ..hooks import HookSet, PerThread, PlanSlot, merge_around
from ..layout import TokenLayout
from ..placements import KeyValues, SubLayers, min_tokens_for
from ..plan import MergePlan, proportional_attention_bias
from ..policies.matchers import RandomGrid
from ..state import MergeState
from .diffusion_caches import merge_around_reusable
from .diffusion_joint import JointAttention, SpanMergeAround, join_text, split_text
from .diffusion_layout import BlockSite, DenoiserLayout
from .diffusion_steps import StepTracker
from .specs import BlockCall

__all__ = ["SubLayerMerge", "RangeMerge", "check_cell_fits", "fused_self_attention", "KV_ONLY_FUSED_MESSAGE"]

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


def _has_mask(call: BlockCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a block call passed a self-attention mask (which would not fit merged tokens)."""
    return call.mask is not None and call.mask.get(args, kwargs) is not None


def check_cell_fits(matcher: Any, layout: TokenLayout, denoiser: DenoiserLayout, site: BlockSite) -> None:
    """Refuse a grid matcher whose cell does not fit the model's finest token grid.

    Coarser levels are smaller still, so on such a grid nothing would merge anywhere in
    the model (each cell needs a destination): a `TokenMergeError` naming the cell and the
    grid, at the first denoiser call, instead of a silent no-op. A coarser level (UNets,
    ``max_downsample`` > 1) smaller than the cell merges nothing in that layer, as in tomesd.
    """
    if not isinstance(matcher, RandomGrid) or denoiser.relative_downsample(site) != 1 or matcher.fits(layout.grid):
        return
    grid = " x ".join(str(n) for n in layout.grid)
    raise TokenMergeError(
        f"{type(matcher).__name__}(sx={matcher.sx}, sy={matcher.sy}, st={matcher.st}) does not fit the {grid} "
        f"token grid of {site.name} (the model's finest): no cell would be full and nothing would merge; "
        "use a smaller sx/sy or a larger image"
    )


class _Text:
    """Text tokens of the running block call (one per thread)."""

    def __init__(self) -> None:
        self.count = 0


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
        # Joint attention (MM-DiT) or a self-attention with rotary embeddings (Wan): tokenmerge's attention hooks.
        self.joint = JointAttention(site) if site.spec.attention_hooks else None
        self.second: JointAttention | None = None  # SD3.5's image-only attn2 under KeyValues
        placement = config.placement_for(SubLayers)
        self.keys_values = isinstance(placement, KeyValues)
        self.min_tokens: int | None = getattr(placement, "min_tokens", None)
        self._text = PerThread(_Text)  # text tokens of the running call (joint blocks)

    def attach(self, hooks: HookSet) -> None:
        """Register the block's plan hook and the hooks around the sub-layers the placement chooses."""
        site, config = self.site, self.config
        placement = config.placement_for(SubLayers)
        name = site.spec.sublayer_input
        hooks.pre(site.block, self._plan)
        hooks.post(site.block, self._clear, always_call=True)
        if self.joint is not None:
            self._attach_joint(hooks, placement)
            return
        if isinstance(placement, KeyValues):
            hooks.pre(site.sublayer("self_attention"), self._merge_keys_values)
            return
        assert isinstance(placement, SubLayers)
        for wanted, role, slot in (
            (placement.attn, "self_attention", self.attn),
            (placement.cross_attn, "cross_attention", self.cross),
            (placement.mlp, "feed_forward", self.mlp),
        ):
            if wanted:
                around = merge_around if role == "feed_forward" else merge_around_reusable  # attention: PAB may skip
                around(hooks, site.sublayer(role), slot, config.mode, input_name=name)

    def _attach_joint(self, hooks: HookSet, placement: Any) -> None:
        """Joint attention (MM-DiT): image tokens merged around it, text untouched, rotary selected."""
        site, joint = self.site, self.joint
        assert joint is not None
        keys_values = isinstance(placement, KeyValues)
        attn = site.sublayer("self_attention")
        if keys_values or placement.attn:
            # _enter_joint runs first: it sees the unmerged tokens and may keep the call unmerged (a mask
            # that does not cover them); merge_around's pre-hook then merges the image tokens.
            hooks.pre(attn, self._enter_joint)
            if not keys_values:
                merge_around_reusable(hooks, attn, self.attn, self.config.mode, input_name=site.spec.sublayer_input)
            joint.attach(hooks, keys_values)
        if not keys_values and placement.mlp:
            ff = site.sublayer("feed_forward")
            if site.spec.joint_feed_forward:  # CogVideoX: the feed-forward sees [text | image]
                SpanMergeAround(self.mlp, site.spec.text_order != "after", self.config.mode).attach(hooks, ff)
            else:
                merge_around(hooks, ff, self.mlp, self.config.mode)
        if not keys_values and placement.cross_attn:  # Wan: queries of the cross-attention to the text
            merge_around_reusable(hooks, site.sublayer("cross_attention"), self.cross, self.config.mode)
        second = getattr(site.block, site.spec.image_attention or "", None)
        if isinstance(second, nn.Module):  # SD3.5's attn2: a self-attention over the image tokens alone
            if keys_values:
                self.second = JointAttention(site, second)
                hooks.pre(second, self._enter_image_attention)
                self.second.attach(hooks, keys_values=True)
            elif placement.attn:
                merge_around_reusable(hooks, second, self.attn, self.config.mode)

    def _enter_image_attention(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan = self.kv.plan
        x = args[0] if args else kwargs.get(self.site.spec.sublayer_input)  # (B, N, C): the image tokens
        if plan is None or not isinstance(x, Tensor) or x.shape[:2] != (plan.batch, plan.num_in):
            return None
        assert self.second is not None
        return self.second.prepare(args, kwargs, plan=plan, text=0, select="none", keys_values=True)

    def _enter_joint(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self.joint is not None
        spec = self.site.spec
        keys_values = self.keys_values
        plan = self.kv.plan if keys_values else self.attn.plan
        if plan is None:
            return None
        x = args[0] if args else kwargs.get(spec.sublayer_input)  # the attention's (image or joint) tokens
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[:2] != (plan.batch, plan.num_in):
            return None  # another token count: merge_around leaves it too
        if spec.concatenated:
            text = self._text.value.count
        else:
            context = kwargs.get(spec.attention_context) if spec.attention_context else None
            text = context.shape[1] if isinstance(context, Tensor) else 0
        select = "none" if keys_values else ("joint" if spec.concatenated else "image")
        prepared = self.joint.prepare(args, kwargs, plan=plan, text=text, select=select, keys_values=keys_values)
        if prepared is None and not keys_values:
            self.attn.plan = None  # e.g. a mask that does not cover the tokens: this attention runs unmerged
        return prepared

    def _clear(self, *_: Any) -> None:
        self.attn.plan = self.cross.plan = self.mlp.plan = self.kv.plan = None

    def _plan(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._clear()
        call = self.site.call
        x = call.hidden.get(args, kwargs)  # (B, N, C)
        if not isinstance(x, Tensor) or x.dim() != 3:
            return
        text = 0
        if self.site.spec.concatenated:
            # Single-stream block: its attention and feed-forward see [text | image]; the text is protected.
            context = call.context.get(args, kwargs) if call.context is not None else None
            if context is None:  # Flux.2: the model passes the joint sequence itself
                image = self.layout.num_image_tokens(self.tracker.latent_hw)
                if image is None or x.shape[1] <= image:
                    return
                text = self._text.value.count = x.shape[1] - image
            elif not isinstance(context, Tensor) or context.shape[0] != x.shape[0]:
                return
            else:
                text = self._text.value.count = context.shape[1]
                x = join_text(context, x, self.site.spec.text_order != "after", dim=1)  # (B, T + N, C)
        layout = self.layout.token_layout(self.tracker.latent_hw, self.site, x.shape[1], text)  # image or video
        if layout is None or layout.num_mergeable < min_tokens_for(self.min_tokens, x.device.type, self.layout.kind):
            return  # too few tokens for merging to pay (the placement's min_tokens): the block runs unmerged
        check_cell_fits(self.config.matcher, layout, self.layout, self.site)
        plan = self.state.plan(
            self.site.name, x, layout=layout, layer_index=self.layer_index, num_layers=self.num_layers
        )
        if plan.r == 0:
            return
        # A self-attention mask over the N image tokens would not fit N - r merged tokens; joint
        # attention adjusts the key mask itself (`JointAttention.prepare`).
        self_attention_ok = self.site.spec.attention_hooks or not _has_mask(call, args, kwargs)
        self.attn.plan = plan if self_attention_ok else None
        self.kv.plan = plan if self_attention_ok else None
        self.cross.plan = plan
        self.mlp.plan = plan

    def _merge_keys_values(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan, keys_values_name = self.kv.plan, self.site.spec.key_value_argument
        if plan is None or keys_values_name is None or kwargs.get(keys_values_name) is not None:
            return None
        x = args[0] if args else kwargs.get(self.site.spec.sublayer_input)  # (B, N, C): the attention's tokens
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[:2] != (plan.batch, plan.num_in):
            return None
        if fused_self_attention(attn):
            raise TokenMergeError(KV_ONLY_FUSED_MESSAGE)
        keys_values = plan.merge(x, mode=self.config.mode)  # (B, N - r, C): keys and values only
        return args, {**kwargs, keys_values_name: keys_values}


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
    def current(self) -> _RangeCall:
        """The calling thread's plan, sizes and bias."""
        return self._per_thread.value

    @property
    def key(self) -> str:
        """The layer key of the range's plan."""
        return f"{self.layout.sites[self.first].name}-{self.last}"  # e.g. transformer_blocks.4-23

    def clear(self) -> None:
        """Forget the plan of the previous call (done at the start of every denoiser call)."""
        current = self.current
        current.plan = current.size = current.bias = None

    def attach(self, hooks: HookSet) -> None:
        """Hook the blocks of the range."""
        sites = self.layout.sites
        self._calls = {site.block: site.call for site in sites[self.first : self.last + 1]}
        hooks.pre(sites[self.first].block, self._merge)
        self._joint: dict[nn.Module, JointAttention] = {}
        for site in sites[self.first : self.last + 1]:
            hooks.pre(site.block, self._add_bias)
            if site.spec.attention_hooks:
                # MM-DiT, Wan: rotary tables follow the merged image tokens, proportional attention as a mask.
                joint = JointAttention(site)
                self._joint[joint.attn] = joint
                hooks.pre(joint.attn, self._enter_joint)
                joint.attach(hooks, keys_values=False)
        hooks.post(sites[self.last].block, self._unmerge, always_call=True, prepend=True)

    def _merge(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.clear()
        site = self.layout.sites[self.first]
        call = site.call
        x = call.hidden.get(args, kwargs)  # (B, N, C)
        if not isinstance(x, Tensor) or x.dim() != 3:
            return None
        if _has_mask(call, args, kwargs) and not site.spec.attention_hooks:  # joint attention adjusts its mask
            return None
        text, text_first = 0, site.spec.text_order != "after"
        if site.spec.concatenated and (call.context is None or call.context.get(args, kwargs) is None):
            # Flux.2's single-stream blocks take [text | image] as one argument: plan the image span.
            image = self.layout.num_image_tokens(self.tracker.latent_hw)
            if image is None or x.shape[1] <= image:
                return None
            text = x.shape[1] - image
            head, x = split_text(x, text, text_first, dim=1)
        layout = self.layout.token_layout(self.tracker.latent_hw, site, x.shape[1])  # image (H/p, W/p)
        if layout is None:
            return None
        check_cell_fits(self.config.matcher, layout, self.layout, site)
        plan = self.state.plan(self.key, x, layout=layout, layer_index=0, num_layers=1)
        if plan.r == 0:
            return None
        current = self.current
        current.plan = plan
        current.size = plan.merge_size()  # (B, N - r): original tokens each merged token covers
        if self.config.prop_attn:
            current.bias = proportional_attention_bias(current.size, x.dtype)[:, 0]  # (B, 1, N - r)
        merged = plan.merge(x, mode=self.config.mode)  # (B, N - r, C)
        if text:
            merged = join_text(head, merged, text_first, dim=1)  # (B, T + N - r, C)
        return call.hidden.replace(args, kwargs, merged)

    def _add_bias(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        plan, bias = self.current.plan, self.current.bias
        call = self._calls[block]
        if plan is None or bias is None or call.mask is None or call.spec.attention_hooks:
            return None  # joint attention gets the bias through JointAttention.prepare
        x = call.hidden.get(args, kwargs)  # (B, N - r, C) inside the range
        if not isinstance(x, Tensor) or x.shape[:2] != (plan.batch, plan.num_out):
            return None
        return call.mask.replace(args, kwargs, bias)

    def _enter_joint(self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        current, joint = self.current, self._joint[attn]
        plan, spec = current.plan, joint.spec
        if plan is None:
            return None
        x = args[0] if args else kwargs.get(spec.sublayer_input)  # (B, N', C) image, or (B, T + N', C) joint
        if not isinstance(x, Tensor) or x.dim() != 3:
            return None
        if spec.concatenated:
            text = x.shape[1] - plan.num_out
        else:
            context = kwargs.get(spec.attention_context) if spec.attention_context else None
            text = context.shape[1] if isinstance(context, Tensor) else 0
            if x.shape[1] != plan.num_out:
                return None
        if text < 0:
            return None
        prepared = joint.prepare(args, kwargs, plan=plan, text=text, select="image", bias=current.bias)
        if prepared is None:
            raise TokenMergeError(
                f"the attention mask of {joint.site.name} does not cover its merged tokens "
                f"({plan.num_in} image tokens and {text} text tokens); use SubLayers, which runs such calls unmerged"
            )
        return prepared

    def _unmerge(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        # The plan is kept until the next denoiser call: gradient checkpointing re-runs the
        # blocks of the range (and these hooks) during the backward pass.
        plan, call = self.current.plan, self.layout.sites[self.last].call
        image = call.image_output(output)  # (B, N - r, C): the image stream, where the spec says it is
        if plan is None or image is None or image.shape[0] != plan.batch:
            return None
        if image.shape[1] == plan.num_out:
            return call.with_image_output(output, plan.unmerge(image))  # (B, N, C)
        text = image.shape[1] - plan.num_out
        if call.spec.concatenated and text > 0:  # Flux.2's single-stream blocks return [text | image]
            text_first = call.spec.text_order != "after"
            head, merged = split_text(image, text, text_first, dim=1)
            return call.with_image_output(output, join_text(head, plan.unmerge(merged), text_first, dim=1))
        return None
