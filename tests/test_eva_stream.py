"""timm Eva (EVA-02, DINOv3, Perception Encoder, rope ViTs): ToMe through the shared residual stream.

Every tiny model is checked in float64 against a reference written here: ToMe's merge (`reference_merge` of
test_timm_vit, independent of `tokenmerge.plan`) around the model's own sub-modules on an unpatched copy, with
each merged token's rotary rows taken from its destination (indexing the table, not `MergePlan.select`), and
``log(size)`` added to the attention logits through the attention's own ``attn_mask``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_timm_vit import assert_partition, assert_same_snapshot, reference_merge, snapshot, unmerge_tokens
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.adapters.stream import merge_record, select_rope
from tokenmerge.placements import TokenStream

timm = pytest.importorskip("timm")

IMAGE = 32  # 4 px patches: an 8 x 8 grid, 64 patch tokens


@dataclass
class EvaCase:
    name: str
    arch: str
    r: int = 8
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = [
    EvaCase("eva02_swiglu_rope", "eva02_tiny_patch14_224"),
    EvaCase("dinov3_registers_layerscale", "vit_small_patch16_dinov3", r=10),
    EvaCase("pe_core_attention_rope_map_pool", "vit_pe_core_tiny_patch16_384"),
    EvaCase("rope_mixed_token_pool", "vit_small_patch16_rope_mixed_224", r=12),
    EvaCase("rope_register_avg", "vit_base_patch16_rope_reg1_gap_256", kwargs=dict(qk_norm=True)),
]


def tiny_eva(arch: str, **overrides: Any) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=IMAGE, patch_size=4, depth=3, embed_dim=32, num_heads=2, num_classes=5)
    model = timm.create_model(arch, pretrained=False, **{**kwargs, **overrides}).eval().double().requires_grad_(False)
    for param in model.parameters():  # timm's init leaves tiny logits that hardly depend on the image
        param.add_(torch.randn_like(param) * 0.2)
    return model


def alternating_seeds(position: Tensor, protected: int, num: int) -> Tensor:
    """(B, n') the old token each new token keeps its rotary row from: its group's destination (odd patch)."""
    batch = position.shape[0]
    seeds = torch.empty(batch, int(position.max()) + 1, dtype=torch.long)
    for b in range(batch):
        for old in range(num):
            new = int(position[b, old])
            is_dst = old >= protected and (old - protected) % 2 == 1
            alone = int((position[b] == new).sum()) == 1
            if is_dst or alone:
                seeds[b, new] = old
    return seeds


def rope_rows(rope: Tensor, patch_seeds: Tensor) -> Tensor:
    """The rotary rows of the current patch tokens, indexed per image."""
    if rope.dim() == 2:  # (P, d)
        return torch.stack([rope[s] for s in patch_seeds])[:, None]  # (B, 1, P', d)
    return torch.stack([rope[:, s] for s in patch_seeds])  # (H, P, d) -> (B, H, P', d)


def reference_forward(model: nn.Module, images: Tensor, r: int) -> tuple[Tensor, list[int], Tensor]:
    """ToMe on an Eva: logits, tokens after each block, final token map."""
    protected = model.num_prefix_tokens
    x, rope = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(x)
    batch, num, _ = x.shape
    size = torch.ones(batch, num, dtype=x.dtype)
    token_map = torch.arange(num).repeat(batch, 1)
    seeds = torch.arange(num).repeat(batch, 1)  # (B, n) old input position of every token's rotary row
    counts = []
    for index, block in enumerate(model.blocks):
        table = rope[index] if getattr(model, "rope_mixed", False) else rope
        merged = num < token_map.shape[1]
        rows = rope_rows(table, seeds[:, protected:] - protected) if merged else table
        bias = size.log()[:, None, None, :] if merged else None
        keys: list[Tensor] = []
        grab = block.attn.k_norm.register_forward_hook(lambda _m, _a, out, keys=keys: keys.append(out))
        a = block.attn(block.norm1(x), rope=rows, attn_mask=bias)
        grab.remove()
        x = x + (block.gamma_1 * a if block.gamma_1 is not None else a)
        x_new, size_new, _, position = reference_merge(
            x,
            keys[0].mean(1),
            size,
            None,
            protected,
            lambda n: (torch.arange(0, n, 2), torch.arange(1, n, 2)),
            lambda s: min(r, s.shape[1]),
        )
        if x_new.shape[1] < num:
            new_seeds = alternating_seeds(position, protected, num)
            seeds = seeds.gather(1, new_seeds)
            x, size = x_new, size_new
            token_map = position.gather(1, token_map)
            num = x.shape[1]
        m = block.mlp(block.norm2(x))
        x = x + (block.gamma_2 * m if block.gamma_2 is not None else m)
        counts.append(num)
    dense = unmerge_tokens(model.norm(x), token_map)  # a mean over it is the size-weighted mean
    return model.forward_head(dense), counts, token_map


def flops(model: nn.Module, images: Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_eva_case(case: EvaCase) -> None:
    model = tiny_eva(case.arch, **case.kwargs)
    unpatched = copy.deepcopy(model)
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        baseline = model(images)
    before = snapshot(model)
    plain_flops = flops(model, images)

    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)), torch.no_grad():  # r = 0: the plain model, bit for bit
        assert torch.equal(model(images), baseline)

    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=case.r, trace_source=True))
    with torch.no_grad():
        merged = model(images)
    record = merge_record(model)
    assert record is not None and record.num_prefix == model.num_prefix_tokens and record.grid == (8, 8)
    assert record.num_tokens < record.num_input
    assert_partition(record, batch=2)
    assert flops(model, images) < plain_flops  # merging happens: fewer FLOPs
    assert (merged - baseline).abs().max() > 1e-6 * baseline.abs().max()  # merging changed the logits

    with torch.no_grad():
        expected, counts, token_map = reference_forward(unpatched, images, case.r)
    assert record.num_tokens == counts[-1]
    assert torch.equal(record.token_map, token_map)
    torch.testing.assert_close(merged, expected, atol=1e-8, rtol=1e-6)  # sizes (and log(size)) are float32

    handle.remove()  # bit for bit the plain model again
    with torch.no_grad():
        assert torch.equal(model(images), baseline)
    assert_same_snapshot(before, snapshot(model))


def test_rope_rows_follow_the_tokens() -> None:
    """The rotary table a block receives holds, for every token, the row of one of the patches it covers."""
    model = tiny_eva("eva02_tiny_patch14_224")
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    seen: list[Tensor] = []
    last = model.blocks[-1].attn
    watch = last.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["rope"]), with_kwargs=True)
    config = tokenmerge.ToMe(r=12).replace(placement=TokenStream(blocks=(0, 1), trace_source=True))
    with tokenmerge.apply(model, config), torch.no_grad():  # the last block sees the final tokens
        model(images)
        record = merge_record(model)
    watch.remove()
    with torch.no_grad():
        _, table = model._pos_embed(model.patch_embed(images))  # (P, d)
    rows = seen[0]  # (B, 1, P', d)
    groups = record.patch_groups(2)  # (B, P)
    assert rows.shape == (2, 1, record.num_tokens - record.num_prefix, table.shape[-1])
    for b in range(2):
        for token in range(rows.shape[2]):
            members = (groups[b] == token).nonzero().flatten()
            assert any(torch.equal(rows[b, 0, token], table[p]) for p in members)


def test_select_rope_shapes() -> None:
    seeds = torch.tensor([[0, 2], [1, 1]])
    table = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(select_rope(table, seeds)[:, 0], torch.stack([table[[0, 2]], table[[1, 1]]]))
    mixed = torch.arange(24.0).reshape(2, 3, 4)  # (H, P, d)
    assert torch.equal(select_rope(mixed, seeds), torch.stack([mixed[:, [0, 2]], mixed[:, [1, 1]]]))
    batched = torch.arange(24.0).reshape(2, 1, 3, 4)  # (B, 1, P, d)
    assert torch.equal(select_rope(batched, seeds), torch.stack([batched[0, :, [0, 2]], batched[1, :, [1, 1]]]))


def test_forward_features_and_intermediates_are_dense_and_exact() -> None:
    model = tiny_eva("vit_small_patch16_dinov3")
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)  # blocks one by one: dense between blocks
        final, intermediates = model.forward_intermediates(images, output_fmt="NLC")
    assert features.shape == (2, 64 + model.num_prefix_tokens, 32)
    torch.testing.assert_close(model.forward_head(features), logits, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(final, features, atol=1e-12, rtol=1e-10)
    assert all(t.shape == (2, 64, 32) for t in intermediates)


def test_merged_features_on_request_and_post_norm_refused() -> None:
    model = tiny_eva("eva02_tiny_patch14_224", global_pool="token")
    images = torch.randn(1, 3, IMAGE, IMAGE, dtype=torch.float64)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8).replace(placement=TokenStream(dense=False))), torch.no_grad():
        model(images)
        assert merge_record(model).num_tokens == 65 - 3 * 8
    post = timm.create_model(
        "eva02_tiny_patch14_224",
        pretrained=False,
        img_size=IMAGE,
        patch_size=4,
        depth=2,
        embed_dim=32,
        num_heads=2,
        use_post_norm=True,
    )
    with pytest.raises(TokenMergeError, match="EvaBlockPostNorm"):
        tokenmerge.apply(post, tokenmerge.ToMe(r=4))


def test_eva_compiles_fullgraph() -> None:
    import torch._dynamo

    model = tiny_eva("eva02_tiny_patch14_224").float()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    torch._dynamo.reset()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(images), expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_custom_composition_on_eva() -> None:
    """A Matcher / ThresholdPolicy composition merges on an Eva too, and remove() restores it."""
    from tokenmerge import MergeConfig
    from tokenmerge.policies import AlternatingBipartite, SimilarityThreshold

    model = tiny_eva("vit_small_patch16_dinov3")
    images = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(images)
    config = MergeConfig(matcher=AlternatingBipartite(), threshold=SimilarityThreshold(-1.0), mode="mean")
    with tokenmerge.apply(model, config), torch.no_grad():
        model(images)
        record = merge_record(model)
        assert record.num_tokens == record.num_prefix + 8  # every source merged at each block: 64 -> 32 -> 16 -> 8
    with torch.no_grad():
        assert torch.equal(model(images), plain)


@pytest.mark.parametrize("mode", ["weighted", "mean"])
@pytest.mark.parametrize("with_sizes", [True, False])
def test_stream_merge_equals_the_plan_merge(mode: str, with_sizes: bool) -> None:
    """The stream's merge (copy, then move each destination towards its sources) is `MergePlan.merge_with_size`."""
    from tokenmerge.adapters.stream import merge_stream
    from tokenmerge.plan import MergePlan
    from tokenmerge.policies import Matching

    gen = torch.Generator().manual_seed(5)
    batch, num, channels = 3, 21, 8
    metric = torch.randn(batch, num - 1, 4, dtype=torch.float64, generator=gen)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    src, dst = torch.arange(0, num - 1, 2), torch.arange(1, num - 1, 2)
    plan = MergePlan.from_matching(Matching.by_features(unit[:, 0::2], unit[:, 1::2], src, dst), 6, protected=1)
    x = torch.randn(batch, num, channels, dtype=torch.float64, generator=gen)
    sizes = torch.randint(1, 5, (batch, num), generator=gen).float() if with_sizes else None
    ours, our_sizes = merge_stream(plan, x, mode, sizes)
    theirs, their_sizes = plan.merge_with_size(x, mode, sizes)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert torch.equal(our_sizes, their_sizes)
    kept = plan.keep_idx[:, : 1 + 10 - 6]  # prefix and unmerged sources: exact copies
    assert torch.equal(ours[:, : kept.shape[1]], x.gather(1, kept[..., None].expand(-1, -1, channels)))
