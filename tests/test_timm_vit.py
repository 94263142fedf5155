"""timm ViT adapter: a table of tiny models through one common test, checked against ToMe's maths in float32.

The reference below is written from ToMe's description, independently of `tokenmerge.plan`: explicit merge
groups per image, size-weighted means, proportional attention as a plain float32 softmax with ``log(size)``
added, size-weighted average pooling. It runs the model's own sub-modules (norms, MLPs, LayerScale, drop-path)
on an unpatched copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.adapters.vit import merge_record, unmerge_to_patches, unmerge_tokens
from tokenmerge.policies import (
    AlternatingBipartite,
    FixedCount,
    FixedRatio,
    Matcher,
    Matching,
    RandomGrid,
    SimilarityThreshold,
)

Split = Callable[[int], tuple[Tensor, Tensor]]
CountRule = Callable[[Tensor], int]  # (B, Ns) best scores -> number of sources to merge


# ---------------------------------------------------------------------------- the reference
def tome_parse_r(r: int | list[int] | tuple[int, float], num_layers: int) -> list[int]:
    """ToMe's ``parse_r``: an int, a per-layer list or ``(r, inflection)``."""
    if isinstance(r, list):
        return list(r)
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def alternating_split(num: int) -> tuple[Tensor, Tensor]:
    """Even patch tokens are sources, odd ones destinations."""
    return torch.arange(0, num, 2), torch.arange(1, num, 2)


def half_split(num: int) -> tuple[Tensor, Tensor]:
    """The first half of the patch tokens are sources, the rest destinations."""
    return torch.arange(num // 2), torch.arange(num // 2, num)


def fixed_count(r: int) -> CountRule:
    return lambda scores: min(r, scores.shape[1])


def above_threshold(threshold: float) -> CountRule:
    return lambda scores: int((scores >= threshold).sum(-1).max())


def reference_merge(
    x: Tensor,
    metric: Tensor,
    size: Tensor,
    key_mask: Tensor | None,
    protected: int,
    split: Split,
    count: CountRule,
    weighted: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Bipartite soft matching and a size-weighted (or plain) merge, one image at a time.

    Returns the merged tokens (B, n', C), sizes (B, n'), key mask (B, n') and every old token's new position (B, n).
    """
    batch, num, _ = x.shape
    src, dst = (idx + protected for idx in split(num - protected))
    if len(dst) == 0:
        return x, size, key_mask, torch.arange(num).repeat(batch, 1)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best_score, best = [], []
    for b in range(batch):
        score, choice = (unit[b, src] @ unit[b, dst].T).max(dim=-1)  # (Ns,)
        best_score.append(score)
        best.append(choice)
    r = count(torch.stack(best_score))
    tokens, sizes, masks, positions = [], [], [], []
    for b in range(batch):
        order = best_score[b].argsort(descending=True).tolist()
        merged = set(order[:r])
        groups = [[i] for i in range(protected)]
        groups += [[int(src[j])] for j in order if j not in merged]
        into = {int(d): [int(d)] for d in dst}
        for j in order[:r]:
            into[int(dst[best[b][j]])].append(int(src[j]))
        groups += [into[int(d)] for d in dst]
        weight = [size[b, g] if weighted else torch.ones(len(g)) for g in groups]
        tokens.append(torch.stack([(w[:, None] * x[b, g]).sum(0) / w.sum() for g, w in zip(groups, weight)]))
        sizes.append(torch.stack([size[b, g].sum() for g in groups]))
        if key_mask is not None:
            mean_exp = [(w * key_mask[b, g].exp()).sum() / w.sum() for g, w in zip(groups, weight)]
            masks.append(torch.stack(mean_exp).log())
        position = torch.empty(num, dtype=torch.long)
        for k, group in enumerate(groups):
            position[group] = k
        positions.append(position)
    mask = torch.stack(masks) if key_mask is not None else None
    return torch.stack(tokens), torch.stack(sizes), mask, torch.stack(positions)


@dataclass
class Reference:
    logits: Tensor
    counts: list[int]  # tokens after each block
    blocks: list[Tensor]  # each block's output unmerged to the input layout (B, N0, C)
    token_map: Tensor  # (B, N0)


def reference_forward(
    model: nn.Module,
    images: Tensor,
    counts: Sequence[CountRule],
    *,
    prop_attn: bool = True,
    key_mask: Tensor | None = None,
    split: Split = alternating_split,
    weighted: bool = True,
) -> Reference:
    """ToMe's forward of a timm ViT, with float32 softmax attention."""
    protected = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch, num, _ = x.shape
    size = torch.ones(batch, num)
    token_map = torch.arange(num).repeat(batch, 1)
    outputs, after = [], []
    merged = False
    for block, count in zip(model.blocks, counts):
        attn = block.attn
        assert attn.gate is None
        qkv = attn.qkv(block.norm1(x)).reshape(batch, num, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, n, n)
        if prop_attn and merged:
            logits = logits + size.log()[:, None, None, :]
        if key_mask is not None:
            logits = logits + key_mask[:, None, None, :]
        heads = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, num, -1)
        x = x + block.drop_path1(block.ls1(attn.proj(attn.norm(heads))))
        x_new, size_new, mask_new, position = reference_merge(
            x, k.mean(1), size, key_mask, protected, split, count, weighted
        )
        if x_new.shape[1] < num:
            x, size, key_mask = x_new, size_new, mask_new
            token_map = position.gather(1, token_map)
            num, merged = x.shape[1], True
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        after.append(num)
        outputs.append(unmerge_tokens(x, token_map))
    x = model.norm(x)
    if model.global_pool == "avg":
        weight = size[:, protected:, None]
        pooled = (x[:, protected:] * weight).sum(1) / weight.sum(1)
        logits = model.head(model.head_drop(model.fc_norm(pooled)))
    else:
        logits = model.forward_head(x)
    return Reference(logits=logits, counts=after, blocks=outputs, token_map=token_map)


# ---------------------------------------------------------------------------- helpers
def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything `remove` must restore: weights, hooks and attributes of every sub-module."""
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
    )
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": {name: tuple(len(getattr(m, d)) for d in hook_dicts) for name, m in model.named_modules()},
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


def expected_counts(start: int, protected: int, schedule: list[int]) -> list[int]:
    """Token counts after each block with r clamped to the sources, ceil(patches / 2)."""
    counts, num = [], start
    for r in schedule:
        num -= min(r, (num - protected + 1) // 2)
        counts.append(num)
    return counts


def assert_partition(record: Any, batch: int) -> None:
    """The source matrix partitions the input tokens; prefix tokens cover only themselves."""
    sources = record.source_matrix(batch)  # (B, N, N0)
    p = record.num_prefix
    assert sources.shape == (batch, record.num_tokens, record.num_input)
    assert bool((sources.sum(1) == 1).all())
    assert torch.equal(sources[:, :p, :p], torch.eye(p, dtype=torch.bool).expand(batch, p, p))
    assert not bool(sources[:, p:, :p].any()) and not bool(sources[:, :p, p:].any())
    assert bool((sources[:, p:].sum(2) >= 1).all())  # no empty patch token
    if record.sizes is not None:
        assert torch.equal(sources.sum(2).float(), record.sizes)


def forward(model: nn.Module, images: Tensor, **kwargs: Any) -> Tensor:
    torch.manual_seed(7)  # drop-path draws the same masks in every run
    with torch.no_grad():
        return model(images, **kwargs)


# ---------------------------------------------------------------------------- the table
@dataclass
class ViTCase:
    name: str
    r: int | list[int] | tuple[int, float]
    arch: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_hw: tuple[int, int] = (32, 32)
    train: bool = False


CASES = [
    ViTCase("class_token", r=6),
    ViTCase("reg_tokens", r=[8, 6, 4, 2], kwargs=dict(reg_tokens=4)),
    ViTCase("avg_pool_no_class_token", r=(6, 0.5), kwargs=dict(class_token=False, global_pool="avg")),
    ViTCase("layer_scale", r=7, kwargs=dict(init_values=0.5)),
    ViTCase("qk_norm", r=(5, 0.3), kwargs=dict(qk_norm=True)),
    ViTCase("distilled_deit", r=6, arch="deit_tiny_distilled_patch16_224"),
    ViTCase("deit3_no_embed_class", r=6, arch="deit3_small_patch16_224", kwargs=dict(init_values=0.5)),
    ViTCase("drop_path_training", r=6, kwargs=dict(drop_path_rate=0.5, init_values=0.5), train=True),
    ViTCase(
        "registers_avg_dynamic_size",
        r=10,
        kwargs=dict(class_token=False, reg_tokens=4, global_pool="avg", no_embed_class=True, dynamic_img_size=True),
        image_hw=(32, 48),
    ),
    ViTCase("r_clamped", r=1000, kwargs=dict(reg_tokens=2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_timm_vit_case(case: ViTCase, timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit(case.arch, **case.kwargs).train(case.train)
    unpatched = copy.deepcopy(model)
    images = torch.randn(2, 3, *case.image_hw, generator=torch.Generator().manual_seed(1))
    baseline = forward(model, images)
    before = snapshot(model)
    depth, protected = len(model.blocks), model.num_prefix_tokens
    num_input = protected + (case.image_hw[0] // 4) * (case.image_hw[1] // 4)

    # r = 0 is the unpatched model, bit for bit.
    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)):
        assert torch.equal(forward(model, images), baseline)

    # r > 0: the token counts of the schedule, ToMe's output, prefix tokens kept, sources partition the input.
    handle = tokenmerge.apply(model, tokenmerge.ToMe(r=case.r, trace_source=True))
    seen: list[tuple[int, Tensor]] = []

    def watch(_: nn.Module, __: Any, out: Tensor) -> None:
        record = merge_record(model)
        assert record is not None
        seen.append((out.shape[1], unmerge_tokens(out, record.full_token_map(out.shape[0]))))

    watchers = [block.register_forward_hook(watch) for block in model.blocks]
    merged = forward(model, images)
    for watcher in watchers:
        watcher.remove()
    schedule = tome_parse_r(case.r, depth)
    assert [n for n, _ in seen] == expected_counts(num_input, protected, schedule)
    assert bool(merged.isfinite().all())
    assert not torch.allclose(merged, baseline, atol=1e-4)  # merging changed something

    torch.manual_seed(7)
    with torch.no_grad():
        reference = reference_forward(unpatched, images, [fixed_count(r) for r in schedule])
    assert reference.counts == [n for n, _ in seen]
    for (_, ours), theirs in zip(seen, reference.blocks):  # every block, prefix tokens included
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(merged, reference.logits, atol=2e-5, rtol=1e-4)

    record = merge_record(model)
    assert record is not None and record.num_prefix == protected and record.num_input == num_input
    assert record.grid == (case.image_hw[0] // 4, case.image_hw[1] // 4)
    assert torch.equal(record.token_map, reference.token_map)
    assert torch.equal(record.token_map[:, :protected], torch.arange(protected).expand(2, protected))
    assert torch.equal(record.sizes[:, :protected], torch.ones(2, protected))
    assert_partition(record, batch=2)

    # remove restores the model bit for bit.
    handle.remove()
    assert merge_record(model) is None
    assert torch.equal(forward(model, images), baseline)
    assert_same_snapshot(before, snapshot(model))


# ---------------------------------------------------------------------------- other policies
class HalfSplit(Matcher):
    """A user-written matcher: the first half of the tokens are sources, the second half destinations."""

    max_ratio = 0.5

    def match(self, metric: Tensor, ctx: Any) -> Matching:
        num = metric.shape[1]
        index = torch.arange(num, device=metric.device)
        return Matching.by_similarity(metric, index[: num // 2], index[num // 2 :])


@pytest.mark.parametrize(
    ("config", "split", "count"),
    [
        (MergeConfig(matcher=HalfSplit(), threshold=FixedCount(5), mode="weighted"), half_split, fixed_count(5)),
        (
            MergeConfig(matcher=AlternatingBipartite(), threshold=SimilarityThreshold(0.9), mode="weighted"),
            alternating_split,
            above_threshold(0.9),
        ),
        (MergeConfig(matcher=AlternatingBipartite(), threshold=FixedCount(6), mode="mean"), alternating_split, None),
    ],
    ids=["user_matcher", "similarity_threshold", "plain_mean_mode"],
)
def test_timm_vit_other_policies_follow_the_reference(
    config: MergeConfig, split: Split, count: CountRule | None, timm_tiny_vit: Callable[..., nn.Module]
) -> None:
    model = timm_tiny_vit(reg_tokens=2)
    unpatched = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with tokenmerge.apply(model, config.replace(trace_source=True)):
        merged = forward(model, images)
        record = merge_record(model)
        assert record is not None and record.num_tokens < record.num_input
        assert_partition(record, batch=2)
    with torch.no_grad():
        counts = [count or fixed_count(6)] * len(model.blocks)
        reference = reference_forward(unpatched, images, counts, split=split, weighted=config.mode == "weighted")
    assert reference.counts[-1] == record.num_tokens
    torch.testing.assert_close(merged, reference.logits, atol=2e-5, rtol=1e-4)


def test_timm_vit_grid_matchers_merge_while_tokens_form_the_grid(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    grid_config = MergeConfig(matcher=RandomGrid(2, 2), threshold=FixedRatio(0.5), mode="weighted", seed=0)
    with tokenmerge.apply(model, grid_config.replace(blocks=(1, 1), trace_source=True)):
        assert bool(forward(model, images).isfinite().all())
        record = merge_record(model)
        assert record is not None and record.num_tokens == 1 + 32
        assert_partition(record, batch=2)
    with pytest.raises(TokenMergeError, match=r"RandomGrid is a grid matcher.*blocks=\(i, i\)"):
        tokenmerge.apply(model, grid_config)  # refused at apply: later blocks would see merged tokens
    assert tokenmerge.get_handle(model) is None


# ---------------------------------------------------------------------------- attention
def test_timm_vit_proportional_attention_goes_to_sdpa_as_a_mask(
    timm_tiny_vit: Callable[..., nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = timm_tiny_vit()
    assert all(block.attn.fused_attn for block in model.blocks)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks: list[Tensor | None] = []

    def spy(*args: Any, attn_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    images = torch.randn(2, 3, 32, 32)
    entering_last: list[Tensor] = []
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):
        watcher = model.blocks[-2].register_forward_hook(lambda *_: entering_last.append(merge_record(model).sizes))
        forward(model, images)
        watcher.remove()
    assert masks[0] is None  # nothing merged before the first block
    assert [tuple(m.shape) for m in masks[1:]] == [(2, 1, 1, 65 - 8 * i) for i in range(1, 4)]
    assert torch.equal(masks[-1], entering_last[0].log()[:, None, None, :])
    masks.clear()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8, prop_attn=False)):
        forward(model, images)
    assert masks == [None] * 4


def test_timm_vit_attn_mask_is_carried_through_merges(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    unpatched = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    keep = torch.rand(2, 65, generator=torch.Generator().manual_seed(4)) > 0.2
    keep[:, 0] = True
    bool_mask = keep[:, None, None, :]  # (B, 1, 1, N0) key padding
    key_bias = torch.where(keep, -torch.rand(2, 65, generator=torch.Generator().manual_seed(5)), float("-inf"))

    baseline = forward(model, images, attn_mask=bool_mask)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)):
        assert torch.equal(forward(model, images, attn_mask=bool_mask), baseline)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=7)):
        merged = forward(model, images, attn_mask=key_bias[:, None, None, :])
        everything = forward(model, images, attn_mask=torch.ones(2, 1, 1, 65, dtype=torch.bool))
        plain = forward(model, images)
    with torch.no_grad():
        reference = reference_forward(unpatched, images, [fixed_count(7)] * 4, key_mask=key_bias)
    torch.testing.assert_close(merged, reference.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(everything, plain, atol=1e-5, rtol=1e-5)


def test_timm_vit_runs_under_bfloat16_autocast(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(model, torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16 and bool(out.isfinite().all())


def test_timm_vit_trains_through_merges(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit(init_values=0.5).train()
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):
        model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(g.isfinite().all()) for g in grads)
    assert float(model.blocks[0].attn.qkv.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------- dense outputs and pooling
def test_timm_vit_dense_outputs_cover_the_patch_grid(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit(reg_tokens=4)
    images = torch.randn(2, 3, 32, 32)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8).replace(options={"dense": False})):
        with torch.no_grad():
            tokens = model.forward_features(images)  # token pooling, dense=False: the merged tokens
        record = merge_record(model)
        assert record is not None and record.token_map is None  # nothing asked for the sources
    assert tokens.shape == (2, 5 + 64 - 32, 64) and record.num_tokens == tokens.shape[1]

    with tokenmerge.apply(model, tokenmerge.ToMe(r=8, trace_source=True).replace(options={"dense": False})):
        with torch.no_grad():
            tokens = model.forward_features(images)
        record = merge_record(model)
        patches = unmerge_to_patches(tokens, record)  # (B, 64, C)
        grid = unmerge_to_patches(tokens, record, as_grid=True)  # (B, C, 8, 8)
    assert patches.shape == (2, 64, 64) and grid.shape == (2, 64, 8, 8)
    groups = record.patch_groups(2)  # (B, 64)
    assert torch.equal(patches, tokens[:, 5:].gather(1, groups[..., None].expand(-1, -1, 64)))
    assert torch.equal(grid.flatten(2).transpose(1, 2), patches)

    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():  # dense by default: the unpatched shapes
        dense = model.forward_features(images)
        _, intermediates = model.forward_intermediates(images, norm=True, output_fmt="NCHW")
        _, raw_intermediates = model.forward_intermediates(images, output_fmt="NLC")
    assert dense.shape == (2, 5 + 64, 64)
    torch.testing.assert_close(dense, unmerge_tokens(tokens, record.token_map))
    torch.testing.assert_close(unmerge_to_patches(dense, record), patches)
    assert [tuple(t.shape) for t in intermediates] == [(2, 64, 8, 8)] * 4
    torch.testing.assert_close(intermediates[-1], grid)
    assert [t.shape[1] for t in raw_intermediates] == [64] * 4  # dense without the norm too


def test_timm_vit_average_pooling_reads_every_token_weighted_by_size(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit(class_token=False, global_pool="avg")
    images = torch.randn(2, 3, 32, 32)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)):  # no trace_source: tracked for the pooling anyway
        with torch.no_grad():
            features = model.forward_features(images)
            logits = model.forward_head(features)
        record = merge_record(model)
    assert features.shape == (2, 64, 64) and record.num_tokens == 64 - 32
    merged = features.new_zeros(2, record.num_tokens, 64).scatter_reduce(
        1, record.token_map[..., None].expand(-1, -1, 64), features, "mean", include_self=False
    )  # (B, N, C): the merged tokens back
    weighted = (merged * record.sizes[..., None]).sum(1) / record.sizes.sum(1, keepdim=True)
    torch.testing.assert_close(logits, model.head(model.fc_norm(weighted)))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        (
            "eva02_tiny_patch14_224",
            dict(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, use_post_norm=True),
        ),
        ("beit_base_patch16_224", dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)),
        ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2))),
        ("vit_small_patch16_18x2_224", dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)),
    ],
    ids=["eva_post_norm", "beit_relative_position", "swin", "vit_parallel_blocks"],
)
def test_timm_vit_rejects_unsupported_models(arch: str, kwargs: dict[str, Any]) -> None:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=4, **kwargs).eval()
    before = snapshot(model)
    with pytest.raises(TokenMergeError, match="VisionTransformerDistilled") as error:
        tokenmerge.apply(model, tokenmerge.ToMe(r=2))
    assert "timm Eva" in str(error.value) and "Swin" in str(error.value)
    assert_same_snapshot(before, snapshot(model))
    assert tokenmerge.get_handle(model) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (tokenmerge.ToMe(r=[2, 2, 2]), "one entry per layer"),
        (tokenmerge.ToMe(r=2).replace(mode="sum"), "mode must be"),
        (tokenmerge.ToMe(r=2).replace(kv_only=True), "kv_only"),
        (tokenmerge.ToMe(r=2).replace(merge_crossattn=True), "merge_crossattn"),
        (tokenmerge.ToMe(r=2).replace(options={"protected": 1}), "options for a ViT"),
        (tokenmerge.ToMe(r=2).replace(options={"dense": 1}), "options\\['dense'\\]"),
        (tokenmerge.ToMe(r=2).replace(blocks=(0, 4)), "blocks must lie"),
    ],
    ids=["r_list_length", "mode_sum", "kv_only", "crossattn", "unknown_option", "dense_not_bool", "blocks_range"],
)
def test_timm_vit_rejects_bad_config_and_leaves_the_model(
    config: MergeConfig, message: str, timm_tiny_vit: Callable[..., nn.Module]
) -> None:
    model = timm_tiny_vit()
    before = snapshot(model)
    with pytest.raises(TokenMergeError, match=message):
        tokenmerge.apply(model, config)
    assert_same_snapshot(before, snapshot(model))


def test_timm_vit_rejects_causal_attention_and_checkpointing(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=4)):
        with pytest.raises(TokenMergeError, match="is_causal"):
            forward(model, images, is_causal=True)
        model.set_grad_checkpointing(True)
        with pytest.raises(TokenMergeError, match="grad_checkpointing"):
            model(images)
        model.set_grad_checkpointing(False)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=0)):  # nothing merges: causal attention is fine
        assert bool(forward(model, images, is_causal=True).isfinite().all())
