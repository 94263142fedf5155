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


#: The token axis of each rotary style's tables (`BlockSpec.rotary_style`): Flux ``(S, D)``, Wan ``(1, S, 1, D)``.
TOKEN_AXIS = {"flux": 0, "wan": 1}


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
        raise TokenMergeError(
            f"{name}: its attention has no {', '.join(missing)} module, where tokenmerge reads queries, keys and "
            "values per token (rotary embeddings follow merged tokens; ToDo merges keys and values); "
            "build it with qk_norm (e.g. qk_norm='rms_norm') or use another placement"
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
        if keys_values:
            if self.fused():
                raise TokenMergeError(FUSED_MESSAGE)
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
        if bias is not None and mask_argument is not None and mask_argument.get(args, kwargs) is None:
            zeros = bias.new_zeros(bias.shape[0], 1, text)  # (B, 1, T): text tokens have size 1
            mask = join_text(zeros, bias, text_first, dim=-1)  # (B, 1, S')
            args, kwargs = mask_argument.replace(args, kwargs, mask[:, None])  # (B, 1, 1, S'): heads, queries
        return args, kwargs

    def _tables(self, call: _Call, table: Table, plan: MergePlan, text: int, select: str, text_first: bool) -> Table:
        """The table for the queries or keys at ``norm_q``/``norm_k`` (and the text stream's, `_Call.text_tables`)."""
        spec, axis = self.spec, self.axis
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

    def _rotate(self, x: Tensor, tables: Table) -> Tensor:
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
        plan = self.call.kv
        if plan is None or output.dim() != 3 or output.shape[:2] != (plan.batch, plan.num_in):
            return None
        return plan.merge(output)  # (B, S - r, C): image keys or values merged, text kept

    def _leave(self, *_: Any) -> None:
        self.call.clear()
