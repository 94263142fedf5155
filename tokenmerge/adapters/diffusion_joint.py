"""Merging around joint attention (MM-DiT: Flux, SD3, ...): rotary tables, keys and values, masks.

In an MM-DiT block, text and image tokens attend together. Text tokens never merge: a
plan covers the image tokens only (dual-stream blocks, whose attention takes the image
stream as ``hidden_states`` and the text as ``encoder_hidden_states``), or the image
span of the joint sequence with the text as a protected prefix or suffix
(`~tokenmerge.layout.TokenLayout`; single-stream blocks, which concatenate the two).

The image tokens themselves are merged and unmerged around the attention by
`tokenmerge.hooks.merge_around`. What the attention does with them besides is
`JointAttention`'s job, one object per attention module, through forward hooks only:

* **rotary embeddings follow the tokens**: the attention's rotary table (its
  ``BlockSpec.attention_rotary`` keyword) is taken out of the call, its image part is
  selected with the plan (`MergePlan.select`: a merged token takes its destination's
  position), its text part is kept, and both are applied to the queries and keys where
  the processor has them per token: the outputs of ``norm_q``/``norm_k`` (image or joint
  sequence) and ``norm_added_q``/``norm_added_k`` (text stream). A per-sample plan makes
  the table per sample, ``(B, S, D)``, which the model's own processor does not accept,
  hence applying it here; the arithmetic is the processor's, per token.
* **ToDo's keys and values** (placement `KeyValues`): queries keep every token and their
  positions; the image keys and values are merged with the plan at the key and value
  projections (``to_k``/``to_v``, ``(B, N, C)``), a merged key takes its destination's
  rotary position; the text keys and values are untouched.
* **proportional attention** (`ResidualRange` with ``prop_attn``): an additive
  ``(B, 1, 1, S)`` mask, ``log(size)`` on the merged image tokens and 0 on the text,
  passed as the attention's ``attention_mask``.

A call that brings its own attention mask keeps it and runs without proportional
attention. When the plan merges nothing, no hook changes anything (ratio 0 is the plain
model bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TokenMergeError
from ..hooks import HookSet, PerThread
from ..plan import MergePlan
from .diffusion_layout import BlockSite
from .specs import argument_of

__all__ = [
    "JointAttention",
    "apply_rotary",
    "apply_rotary_wan",
    "apply_rotary_qwen",
    "apply_rotary_cogvideox",
    "SpanMergeAround",
    "split_text",
    "join_text",
    "check_joint_attention",
    "FUSED_MESSAGE",
    "TOKEN_AXIS",
]

FUSED_MESSAGE = (
    "placement KeyValues (ToDo) merges the image keys and values of a joint attention at its key norm and "
    "value projection, which fused QKV projections (fuse_qkv_projections) skip; call unfuse_qkv_projections() first"
)

Table = tuple[Tensor, Tensor]  # rotary (cos, sin): (S, D) shared, or (B, S, D) per sample


def split_text(x: Tensor, text: int, text_first: bool, dim: int) -> tuple[Tensor, Tensor]:
    """``(text part, image part)`` of ``x`` along ``dim``, the text ``text`` tokens first or last."""
    n = x.shape[dim]
    if text_first:
        return x.narrow(dim, 0, text), x.narrow(dim, text, n - text)
    return x.narrow(dim, n - text, text), x.narrow(dim, 0, n - text)


def join_text(text: Tensor, image: Tensor, text_first: bool, dim: int) -> Tensor:
    """``[text | image]`` or ``[image | text]`` along ``dim``; a shared text table gets the image's batch axis."""
    if text.dim() < image.dim():
        text = text.unsqueeze(0).expand(image.shape[0], *text.shape)
    elif image.dim() < text.dim():
        image = image.unsqueeze(0).expand(text.shape[0], *image.shape)
    parts = (text, image) if text_first else (image, text)
    return torch.cat(parts, dim=dim)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Flux-style rotary embedding of ``x`` ``(B, S, heads, D)`` with ``cos``/``sin`` ``(S, D)`` or ``(B, S, D)``.

    Interleaved pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``, computed in
    float32 and cast back, as diffusers' ``apply_rotary_emb(..., sequence_dim=1)``.
    """
    cos = cos.to(x.device)
    sin = sin.to(x.device)
    cos = cos[None, :, None, :] if cos.dim() == 2 else cos[:, :, None, :]  # (1 or B, S, 1, D)
    sin = sin[None, :, None, :] if sin.dim() == 2 else sin[:, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, D/2) each
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)  # (B, S, H, D)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def apply_rotary_wan(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """Wan-style rotary embedding of ``x`` ``(B, S, heads * D)`` with ``cos``/``sin`` ``(1 or B, S, 1, D)``.

    Wan applies it after its query/key norms, which see ``(B, S, heads * D)``: the
    tokens are split into heads, rotated in interleaved pairs as ``WanAttnProcessor``
    does, and flattened back.
    """
    heads_view = x.unflatten(2, (heads, -1))  # (B, S, H, D)
    x1, x2 = heads_view.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(heads_view)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(heads_view).flatten(2)  # (B, S, H * D)


def apply_rotary_qwen(x: Tensor, freqs: Tensor) -> Tensor:
    """Qwen-Image-style rotary embedding of ``x`` ``(B, S, heads, D)``, complex ``freqs`` ``(S or B x S, D/2)``.

    As diffusers' ``apply_rotary_emb_qwen(..., use_real=False)``: pairs as complex numbers
    times the complex table, in float32, cast back.
    """
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, S, H, D/2)
    return torch.view_as_real(rotated * freqs.unsqueeze(-2)).flatten(3).type_as(x)


def apply_rotary_cogvideox(x: Tensor, cos: Tensor, sin: Tensor, text: int) -> Tensor:
    """CogVideoX-style rotary embedding: ``x`` ``(B, heads, S, D)`` is ``[text | video]``, only the video part turns.

    ``cos``/``sin`` are ``(N, D)`` or ``(B, N, D)`` over the video tokens; the arithmetic is
    diffusers' ``apply_rotary_emb`` (interleaved pairs, float32), written into a copy.
    """
    video = x[:, :, text:]  # (B, H, N, D)
    cos = cos.to(x.device)
    sin = sin.to(x.device)
    cos = cos[None, None] if cos.dim() == 2 else cos[:, None]  # (1 or B, 1, N, D)
    sin = sin[None, None] if sin.dim() == 2 else sin[:, None]
    x_real, x_imag = video.reshape(*video.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    out = x.clone()
    out[:, :, text:] = (video.float() * cos + x_rotated.float() * sin).to(x.dtype)
    return out


#: The token axis of each rotary style's tables (`BlockSpec.rotary_style`): Flux ``(S, D)``, Wan ``(1, S, 1, D)``.
TOKEN_AXIS = {"flux": 0, "wan": 1, "qwen": 0, "cogvideox": 0, "hunyuan": 0}


def check_joint_attention(site: BlockSite, keys_values: bool) -> None:
    """Refuse, at apply time, a joint attention whose queries and keys tokenmerge cannot reach.

    Rotary tables are applied at the attention's ``norm_q``/``norm_k`` modules and ToDo
    merges keys and values at ``to_k``/``to_v``: they must exist, and ToDo needs unfused
    projections.
    """
    attn = site.sublayer("self_attention")
    name = f"{type(site.block).__name__} at {site.name}"
    if attn is None:
        raise TokenMergeError(f"{name} has no self-attention ({site.spec.self_attention!r}) to merge around")
    needed = []
    if site.spec.attention_rotary is not None:
        needed += ["norm_q", "norm_k"]
    if keys_values:
        needed += ["to_k", "to_v"]
    missing = [n for n in needed if not isinstance(getattr(attn, n, None), nn.Module)]
    if missing:
        hint = (
            "build it with query/key norms (qk_norm)"
            if "norm_q" in missing or "norm_k" in missing
            else "its key and value projections are fused (a parallel attention such as Flux.2's single-stream "
            "blocks): use SubLayers or ResidualRange"
        )
        raise TokenMergeError(
            f"{name}: its attention has no {', '.join(missing)} module, where tokenmerge reads queries, keys and "
            f"values per token (rotary embeddings follow merged tokens; ToDo merges keys and values); {hint}"
        )
    if keys_values and bool(getattr(attn, "fused_projections", False)):
        raise TokenMergeError(FUSED_MESSAGE)


class _Call:
    """What the running attention call does (one per thread)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.tables: Table | None = None  # queries at norm_q: image stream, or the joint sequence
        self.key_tables: Table | None = None  # keys at norm_k (ToDo: the merged keys' positions)
        self.text_tables: Table | None = None  # norm_added_q / norm_added_k (dual-stream text)
        self.kv: MergePlan | None = None  # keys and values merged with this plan at to_k / to_v (ToDo)
        self.text = 0  # text tokens of the attention's sequence
        self.text_first = True


class JointAttention:
    """The hooks of one joint attention module: rotary tables, ToDo keys and values, proportional attention.

    The block-level code (`tokenmerge.adapters.diffusion_blocks`) calls `prepare` in a
    pre-hook of the attention with what this call needs; the hooks of the attention's
    projections and norms then do it, and the attention's post-hook forgets it.

    Args:
        site: the block whose self-attention this is (its `BlockSpec` says where the
            text is, the rotary keyword, whether the block concatenates the streams).
        attn: the attention module, if not the block's self-attention (SD3.5's
            image-only ``attn2``).
    """

    def __init__(self, site: BlockSite, attn: nn.Module | None = None) -> None:
        self.site = site
        self.spec = site.spec
        self.attn = attn if attn is not None else site.sublayer("self_attention")
        assert self.attn is not None
        self._per_thread = PerThread(_Call)
        rotary = self.spec.attention_rotary
        self.rotary_argument = argument_of(type(self.attn), rotary) if rotary is not None else None
        self.mask_argument = argument_of(type(self.attn), "attention_mask")
        self.axis = TOKEN_AXIS[self.spec.rotary_style]

    @property
    def call(self) -> _Call:
        """The calling thread's running call."""
        return self._per_thread.value

    # ------------------------------------------------------------------ wiring
    def attach(self, hooks: HookSet, keys_values: bool) -> None:
        """Hook the attention's norms (rotary), and with ``keys_values`` its key and value projections (ToDo)."""
        attn = self.attn
        if self.spec.attention_rotary is not None:
            hooks.post(attn.norm_q, self._queries, prepend=True)
            hooks.post(attn.norm_k, self._keys, prepend=True)
            for name in ("norm_added_q", "norm_added_k"):
                module = getattr(attn, name, None)
                if isinstance(module, nn.Module):
                    hooks.post(module, self._text, prepend=True)
        if keys_values:
            hooks.post(attn.to_k, self._merge_projection, prepend=True)
            hooks.post(attn.to_v, self._merge_projection, prepend=True)
        hooks.post(attn, self._leave, always_call=True)

    def fused(self) -> bool:
        """Whether the attention runs fused QKV projections (``to_k``/``to_v`` would not be called)."""
        return bool(getattr(self.attn, "fused_projections", False))

    # ------------------------------------------------------------------ per call
    def prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        plan: MergePlan | None,
        text: int,
        select: str,
        keys_values: bool = False,
        bias: Tensor | None = None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Set up the running call; returns the attention's new ``(args, kwargs)`` or None to leave them.

        Args:
            args, kwargs: the attention's call.
            plan: the merge plan of the image tokens (or of the joint sequence, with the
                text protected); None: nothing to do.
            text: text tokens in the attention's sequence (single-stream blocks) or in
                its text stream (dual-stream blocks).
            select: how the rotary table follows ``plan``: ``"joint"`` (the plan covers
                the joint sequence: select all of it), ``"image"`` (the plan covers the
                image tokens: select the image part, keep the text part), ``"none"``
                (queries and keys keep every token: the table as it is).
            keys_values: merge the image keys and values with ``plan`` (ToDo).
            bias: ``(B, 1, N')`` log-size bias of the merged image tokens (proportional
                attention), or None.
        """
        call = self.call
        call.clear()
        if plan is None or plan.r == 0:
            return None
        spec = self.spec
        text_first = spec.text_order != "after"
        call.text, call.text_first = text, text_first
        if keys_values:
            if self.fused():
                raise TokenMergeError(FUSED_MESSAGE)
            text_mask = kwargs.get(spec.context_mask) if spec.context_mask is not None else None
            if isinstance(text_mask, Tensor):
                # Qwen-Image builds its key mask from the image queries' count: a mask that masks
                # nothing is dropped (the same attention); a padded text runs this call unmerged.
                if not bool(text_mask.all()):
                    return None
                kwargs = {**kwargs, spec.context_mask: None}
            call.kv = plan
        rotary = self.rotary_argument
        table = rotary.get(args, kwargs) if rotary is not None else None
        if isinstance(table, tuple) and len(table) == 2 and all(isinstance(t, Tensor) for t in table):
            queries = self._tables(call, table, plan, text, select, text_first)  # type: ignore[arg-type]
            # ToDo: queries keep every token and position; the merged keys take their destinations'.
            keys = queries
            if keys_values:
                keys = self._tables(call, table, plan, text, "joint" if spec.concatenated else "image", text_first)
            call.tables, call.key_tables = queries, keys
            assert rotary is not None
            args, kwargs = rotary.replace(args, kwargs, None)
        mask_argument = self.mask_argument
        mask = mask_argument.get(args, kwargs) if mask_argument is not None else None
        if isinstance(mask, Tensor):
            # HunyuanVideo masks padded text keys: the image keys' part follows the merge.
            mask = self._merged_mask(mask, plan, text, text_first)
            if mask is None:
                call.clear()
                return None
            assert mask_argument is not None
            args, kwargs = mask_argument.replace(args, kwargs, mask)
        if bias is not None and mask_argument is not None:
            zeros = bias.new_zeros(bias.shape[0], 1, text)  # (B, 1, T): text tokens have size 1
            additive = join_text(zeros, bias, text_first, dim=-1)[:, None]  # (B, 1, 1, S'): over heads, queries
            if isinstance(mask, Tensor):
                if mask.dtype == torch.bool:
                    additive = additive.masked_fill(~mask, float("-inf"))
                else:
                    additive = additive + mask
            args, kwargs = mask_argument.replace(args, kwargs, additive)
        return args, kwargs

    @staticmethod
    def _merged_mask(mask: Tensor, plan: MergePlan, text: int, text_first: bool) -> Tensor | None:
        """The key mask ``(..., S)`` of the merged keys (a merged key keeps its destination's); None if unfit."""
        if mask.dim() < 2 or mask.shape[0] not in (1, plan.batch):
            return None
        keys = mask.shape[-1]
        if keys == plan.num_in:  # the plan covers the joint sequence (text protected)
            return plan.select(mask, dim=-1)
        if keys != plan.num_in + text:
            return None
        head, image = split_text(mask, text, text_first, dim=-1)
        image = plan.select(image, dim=-1)  # (B, ..., N')
        head = head.expand(image.shape[0], *head.shape[1:])
        return torch.cat((head, image) if text_first else (image, head), dim=-1)

    def _tables(self, call: _Call, table: Table, plan: MergePlan, text: int, select: str, text_first: bool) -> Table:
        """The table for the queries or keys at ``norm_q``/``norm_k`` (and the text stream's, `_Call.text_tables`)."""
        spec, axis = self.spec, self.axis
        if spec.rotary_style == "qwen":
            # Qwen-Image: (image freqs (N, D/2), text freqs (T, D/2)), complex; the text's kept.
            image, text_freqs = table
            call.text_tables = (text_freqs,)
            return (image,) if select == "none" else (plan.select(image, dim=0),)  # (B, N', D/2)
        cos, sin = table  # Flux (S, D), Wan (1, S, 1, D)
        if select != "none" and (select == "joint" or not spec.rotary_text):
            # The table covers exactly the tokens the plan covers (the joint sequence, or the image only).
            return plan.select(cos, dim=axis), plan.select(sin, dim=axis)  # Flux (B, S', D), Wan (B, S', 1, D)
        if not spec.rotary_text or (select == "none" and spec.concatenated):
            return table
        text_cos, image_cos = split_text(cos, text, text_first, dim=axis)  # (T, D), (N, D)
        text_sin, image_sin = split_text(sin, text, text_first, dim=axis)
        if select == "image":
            image_cos, image_sin = plan.select(image_cos, dim=axis), plan.select(image_sin, dim=axis)  # (B, N', D)
        if spec.concatenated:
            # Single-stream block: queries and keys of [text | image] come through norm_q / norm_k together.
            join = axis - 2 if axis == 0 else axis
            return join_text(text_cos, image_cos, text_first, join), join_text(text_sin, image_sin, text_first, join)
        call.text_tables = (text_cos, text_sin)
        return image_cos, image_sin

    def _rotate(self, x: Tensor, tables: tuple[Tensor, ...]) -> Tensor:
        if self.spec.rotary_style == "hunyuan":
            # Tables over the video tokens; a joint projection (single-stream blocks) has the text too.
            video = tables[0].shape[-2]
            if x.shape[1] == video:
                return apply_rotary(x, *tables)  # (B, N, H, D)
            call = self.call
            head, image = split_text(x, x.shape[1] - video, call.text_first, dim=1)
            return join_text(head, apply_rotary(image, *tables), call.text_first, dim=1)  # (B, N + T, H, D)
        if self.spec.rotary_style == "cogvideox":
            return apply_rotary_cogvideox(x, *tables, text=self.call.text)  # (B, H, T + N, D)
        if self.spec.rotary_style == "qwen":
            return apply_rotary_qwen(x, *tables)  # (B, S, H, D)
        if self.spec.rotary_style == "wan":
            return apply_rotary_wan(x, *tables, heads=self.attn.heads)  # (B, S, H * D)
        return apply_rotary(x, *tables)  # (B, S, H, D)

    # ------------------------------------------------------------------ hooks
    def _queries(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Any:
        tables = self.call.tables
        if tables is None:
            return None
        return self._rotate(output, tables)

    def _keys(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Any:
        tables = self.call.key_tables
        if tables is None:
            return None
        return self._rotate(output, tables)

    def _text(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Any:
        tables = self.call.text_tables
        if tables is None:
            return None
        return self._rotate(output, tables)  # (B, T, ...)

    def _merge_projection(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Any:
        call = self.call
        plan = call.kv
        if plan is None or output.dim() != 3 or output.shape[0] != plan.batch:
            return None
        if output.shape[1] == plan.num_in:
            return plan.merge(output)  # (B, S - r, C): image keys or values merged (and a protected text)
        if call.text and output.shape[1] == plan.num_in + call.text:
            # CogVideoX projects [text | image] at once: the image span merged, the text kept.
            text, image = split_text(output, call.text, call.text_first, dim=1)
            return join_text(text, plan.merge(image), call.text_first, dim=1)  # (B, T + N - r, C)
        return None

    def _leave(self, *_: Any) -> None:
        self.call.clear()


class _SpanCall:
    def __init__(self) -> None:
        self.text = -1


class SpanMergeAround:
    """Merge the image span of a module's joint ``[text | image]`` input and unmerge its output's.

    For a feed-forward that a block runs on the concatenated streams (CogVideoX) while its
    plan covers the image tokens only: the text rows pass through unchanged.

    Args:
        slot: holds the block's image plan (`tokenmerge.hooks.PlanSlot`).
        text_first: whether the text comes first in the joint sequence.
        mode: how merged tokens combine.
    """

    def __init__(self, slot: Any, text_first: bool, mode: Any) -> None:
        self.slot, self.text_first, self.mode = slot, text_first, mode
        self._per_thread = PerThread(_SpanCall)

    def attach(self, hooks: HookSet, module: nn.Module) -> None:
        """Hook ``module``: merge before, unmerge after (before the user's forward hooks)."""
        hooks.pre(module, self.merge_input)
        hooks.post(module, self.unmerge_output, prepend=True)

    def merge_input(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Pre-hook: ``[text | image]`` with the image span merged (unchanged when the plan does not fit)."""
        call = self._per_thread.value
        call.text = -1
        plan = self.slot.plan
        x = args[0] if args else kwargs.get("hidden_states")  # (B, T + N, C)
        if plan is None or not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != plan.batch:
            return None
        text = x.shape[1] - plan.num_in
        if text < 0:
            return None
        call.text = text
        head, image = split_text(x, text, self.text_first, dim=1)
        merged = join_text(head, plan.merge(image, mode=self.mode), self.text_first, dim=1)  # (B, T + N - r, C)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    def unmerge_output(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Forward hook: the output's image span unmerged back to all image tokens."""
        call = self._per_thread.value
        plan, text = self.slot.plan, call.text
        call.text = -1
        if plan is None or text < 0 or not isinstance(output, Tensor) or output.shape[1] != text + plan.num_out:
            return None
        head, image = split_text(output, text, self.text_first, dim=1)
        return join_text(head, plan.unmerge(image), self.text_first, dim=1)  # (B, T + N, C)
