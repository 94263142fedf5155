"""Who owns the runtime state: threads, dropped models, copies, pickling, one config per model tree,
process-wide settings, user hooks beside the adapter's, and timm's ``forward_intermediates``.

Tiny models built in code, CPU only.
"""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge import MergeConfig, TokenMergeError
from tokenmerge.policies import AlternatingBipartite, EveryK, FixedRatio

THREADS = 4
TOP_BLOCKS = 3  # transformer blocks of the tiny SD UNet at full latent resolution


def hooks_of(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def in_threads(work: Callable[[int], Tensor], count: int = THREADS) -> list[Tensor]:
    """``work(i)`` for every i, all threads released at once; exceptions are re-raised."""
    barrier = threading.Barrier(count)

    def run(index: int) -> Tensor:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


class Block(nn.Module):
    """A plain pre-norm block with ``attn`` and ``mlp``, as the generic adapter expects."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, depth: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def tokens(seed: int = 1) -> Tensor:
    return torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(seed))


def images(seed: int) -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- threads
def test_threads_on_a_merged_vit_each_get_their_serial_result(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    inputs = [images(seed) for seed in range(THREADS)]
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():
        serial = [model(x) for x in inputs]
        for _ in range(3):
            got = in_threads(lambda i: torch.stack([model(inputs[i]) for _ in range(5)]))
            for index, out in enumerate(got):
                for repeat in out:
                    assert torch.equal(repeat, serial[index])


def _denoise(unet: nn.Module, latent: Tensor, text: Tensor) -> Tensor:
    """A hand-written sampling loop: two guidance calls per timestep, a toy update."""
    for timestep in (900, 600, 300, 100):
        uncond = unet(latent, timestep, encoder_hidden_states=torch.zeros_like(text)).sample
        cond = unet(latent, timestep, encoder_hidden_states=text).sample
        latent = latent - 0.1 * (uncond + 2.0 * (cond - uncond))
    return latent


def test_threads_each_running_their_own_catome_loop_get_their_serial_result() -> None:
    from tokenmerge.tools import tiny

    unet = tiny.tiny_sd_unet()
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 4, 16, 16, generator=gen) for _ in range(THREADS)]
    texts = [tiny.tiny_prompt_embeds(1, seed=seed) for seed in range(THREADS)]
    config = tokenmerge.CAToMe(threshold=0.3, recompute_at=(0, 2), seed=0)
    with tokenmerge.apply(unet, config) as handle, torch.no_grad():
        serial = [_denoise(unet, latents[i], texts[i]) for i in range(THREADS)]
        assert handle.state.plans_reused > 0  # the cache was used (this thread's view)
        for _ in range(2):
            got = in_threads(lambda i: _denoise(unet, latents[i], texts[i]))
            for index, out in enumerate(got):
                assert torch.equal(out, serial[index])
        assert not torch.equal(serial[0], serial[1])


def test_threads_on_a_merged_block_stack_get_their_serial_result() -> None:
    model = stack()
    inputs = [tokens(seed) for seed in range(THREADS)]
    with tokenmerge.apply(model, tokenmerge.CAToMe(threshold=0.2, seed=0)), torch.no_grad():
        serial = [model(x) for x in inputs]
        got = in_threads(lambda i: torch.stack([model(inputs[i]) for _ in range(10)]))
    for index, out in enumerate(got):
        assert all(torch.equal(repeat, serial[index]) for repeat in out)


# ---------------------------------------------------------------------------- bounded caches
@pytest.mark.parametrize("cache", [None, EveryK(2)], ids=["recompute_at", "every_k"])
def test_repeated_calls_at_one_timestep_keep_the_cache_bounded(cache: Any) -> None:
    from tokenmerge.state import MAX_CALL_SLOTS
    from tokenmerge.tools import tiny

    unet = tiny.tiny_sd_unet()
    config = tokenmerge.CAToMe(threshold=0.3, seed=0)
    if cache is not None:
        config = config.replace(cache=cache)
    latent, text = torch.randn(1, 4, 16, 16), tiny.tiny_prompt_embeds(1)
    with tokenmerge.apply(unet, config) as handle, torch.no_grad():
        for _ in range(12):
            unet(latent, 500, encoder_hidden_states=text)
        assert handle.state.call_index == 11
        assert len(handle.state.cache) <= TOP_BLOCKS * MAX_CALL_SLOTS
        assert handle.state.plans_reused > 0  # the later calls share the last call slot


# ---------------------------------------------------------------------------- dropped models
def _assert_freed(build: Callable[[], tuple[Any, Callable[[Any], Any]]]) -> None:
    target, run = build()
    handle = tokenmerge.apply(target, run.config)  # type: ignore[attr-defined]
    with torch.no_grad():
        run(target)
    refs = [weakref.ref(target)] + [weakref.ref(m) for m in getattr(target, "components", {}).values() if m is not None]
    del target
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert handle.target is None  # the handle does not keep the model either
    handle.remove()  # harmless once the model is gone


def _with_config(fn: Callable[[Any], Any], config: MergeConfig) -> Callable[[Any], Any]:
    fn.config = config  # type: ignore[attr-defined]
    return fn


def test_a_dropped_vit_is_freed(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    _assert_freed(lambda: (timm_tiny_vit(), _with_config(lambda m: m(images(0)), tokenmerge.ToMe(r=8))))


def test_a_dropped_pipeline_is_freed() -> None:
    from tokenmerge.tools import tiny

    def build() -> tuple[Any, Callable[[Any], Any]]:
        pipe = tiny.tiny_sd_pipeline()
        pipe.set_progress_bar_config(disable=True)
        text = tiny.tiny_prompt_embeds(1)

        def call(p: Any) -> Any:
            return p(prompt_embeds=text, num_inference_steps=2, guidance_scale=1.0, output_type="latent")

        return pipe, _with_config(call, tokenmerge.CAToMe(threshold=0.3, seed=0))

    _assert_freed(build)


def test_a_dropped_block_stack_is_freed() -> None:
    _assert_freed(lambda: (stack(), _with_config(lambda m: m(tokens()), tokenmerge.ToMeSD(0.5, seed=0))))


# ---------------------------------------------------------------------------- copies and pickling
def _vit_case(timm_tiny_vit: Callable[..., nn.Module]) -> tuple[nn.Module, Tensor, MergeConfig]:
    return timm_tiny_vit(), images(0), tokenmerge.ToMe(r=8)


def _stack_case(_: Any) -> tuple[nn.Module, Tensor, MergeConfig]:
    return stack(), tokens(), tokenmerge.CAToMe(threshold=0.2, seed=0)


class _UNetCall(nn.Module):
    """A bare tiny UNet called at one timestep with fixed text, as one module for the copy tests."""

    def __init__(self) -> None:
        super().__init__()
        from tokenmerge.tools import tiny

        self.unet = tiny.tiny_sd_unet()
        self.register_buffer("text", tiny.tiny_prompt_embeds(2))

    def forward(self, latent: Tensor) -> Tensor:
        return self.unet(latent, 500, encoder_hidden_states=self.text).sample


def _unet_case(_: Any) -> tuple[nn.Module, Tensor, MergeConfig]:
    return _UNetCall(), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), tokenmerge.ToMeSD(0.5)


@pytest.mark.parametrize("case", [_vit_case, _stack_case, _unet_case], ids=["vit", "stack", "unet"])
@pytest.mark.parametrize("remove_first", ["copy", "original"])
def test_a_deep_copy_is_merged_independent_and_removable(
    case: Callable[..., tuple[nn.Module, Tensor, MergeConfig]], remove_first: str, timm_tiny_vit: Any
) -> None:
    model, x, config = case(timm_tiny_vit)
    target = model.unet if isinstance(model, _UNetCall) else model
    with torch.no_grad():
        plain = model(x)
        tokenmerge.apply(target, config)
        merged = model(x)
        clone = copy.deepcopy(model)
        clone_target = clone.unet if isinstance(clone, _UNetCall) else clone
        assert not torch.equal(merged, plain)
        assert torch.equal(clone(x), merged)  # the copy is merged, as the original
        assert hooks_of(clone) == hooks_of(model)
        handle = tokenmerge.get_handle(clone_target)
        assert handle is not None and handle.active and handle.target is clone_target
        first, second = (clone_target, target) if remove_first == "copy" else (target, clone_target)
        first_model, second_model = (clone, model) if remove_first == "copy" else (model, clone)
        assert tokenmerge.remove(first) is True
        assert hooks_of(first_model) == 0 and torch.equal(first_model(x), plain)
        assert torch.equal(second_model(x), merged)  # the other one is untouched
        assert tokenmerge.remove(second) is True
        assert hooks_of(second_model) == 0 and torch.equal(second_model(x), plain)
        assert tokenmerge.remove(first) is False


def test_pickling_a_merged_model_says_to_remove_first(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    for model, config in ((timm_tiny_vit(), tokenmerge.ToMe(r=4)), (stack(), tokenmerge.ToMeSD(0.5))):
        handle = tokenmerge.apply(model, config)
        with pytest.raises(TokenMergeError, match=r"remove\(\)"):
            pickle.dumps(model)
        handle.remove()
        assert hooks_of(pickle.loads(pickle.dumps(model))) == 0


# ---------------------------------------------------------------------------- one config per model tree
def _generic() -> MergeConfig:
    return MergeConfig(matcher=AlternatingBipartite(), threshold=FixedRatio(0.25), seed=0)


def test_a_model_and_its_blocks_never_hold_two_configs() -> None:
    x = tokens()
    with torch.no_grad():
        outer_only, inner_only = stack(), stack()
        tokenmerge.apply(outer_only, tokenmerge.ToMeSD(0.5, seed=0))
        tokenmerge.apply(inner_only.blocks, _generic())
        outer_ref, inner_ref = outer_only(x), inner_only(x)

        model = stack()
        outer = tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0))
        inner = tokenmerge.apply(model.blocks, _generic())  # replaces the model's config
        assert not outer.active and tokenmerge.get_handle(model) is None
        assert hooks_of(model) == hooks_of(inner_only) and torch.equal(model(x), inner_ref)
        outer = tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0))  # and the other way round
        assert not inner.active and tokenmerge.get_handle(model.blocks) is None
        assert hooks_of(model) == hooks_of(outer_only) and torch.equal(model(x), outer_ref)
        outer.remove()
        assert hooks_of(model) == 0


def test_a_vit_and_its_blocks_never_hold_two_configs(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model, x = timm_tiny_vit(), images(0)
    with torch.no_grad():
        tome = tokenmerge.apply(model, tokenmerge.ToMe(r=8))
        merged = model(x)
        blocks = tokenmerge.apply(model.blocks, _generic().replace(options={"protected": 1}))
        assert not tome.active and tokenmerge.get_handle(model) is None
        tome = tokenmerge.apply(model, tokenmerge.ToMe(r=8))
        assert not blocks.active
        assert torch.equal(model(x), merged)
        tome.remove()
        assert hooks_of(model) == 0


# ---------------------------------------------------------------------------- process-wide settings
def test_the_dynamo_hook_guard_setting_is_restored_when_the_last_config_goes() -> None:
    import torch._dynamo.config as dynamo_config

    gc.collect()
    for start in (True, False):
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=start):
            first = tokenmerge.apply(stack(), tokenmerge.ToMeSD(0.5))
            assert dynamo_config.skip_nnmodule_hook_guards is False
            second = tokenmerge.apply(stack(), tokenmerge.ToMeSD(0.5))
            first.remove()
            assert dynamo_config.skip_nnmodule_hook_guards is False  # one config is still active
            second.remove()
            assert dynamo_config.skip_nnmodule_hook_guards is start


# ---------------------------------------------------------------------------- user hooks
def test_user_hooks_on_a_timm_block_see_its_true_output_in_either_order(
    timm_tiny_vit: Callable[..., nn.Module],
) -> None:
    model = timm_tiny_vit()
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            seen[name] = output

        return hook

    before = model.blocks[0].register_forward_hook(keep("before"))
    received = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("next", args[0]))
    attn_before = model.blocks[0].mlp.register_forward_hook(keep("mlp_before"))
    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():
        after = model.blocks[0].register_forward_hook(keep("after"))
        model(images(0))
        after.remove()
    for handle in (before, received, attn_before):
        handle.remove()
    assert seen["next"].shape[1] == 1 + 64 - 8  # the block returned the merged tokens
    assert torch.equal(seen["before"], seen["next"]) and torch.equal(seen["after"], seen["next"])


def test_user_hooks_on_a_merged_sub_layer_see_its_unmerged_output_in_either_order() -> None:
    model = stack()
    seen: dict[str, Tensor] = {}
    before = model.blocks[0].attn.register_forward_hook(lambda m, a, out: seen.__setitem__("before", out))
    with tokenmerge.apply(model, tokenmerge.ToMeSD(0.5, seed=0)), torch.no_grad():
        after = model.blocks[0].attn.register_forward_hook(lambda m, a, out: seen.__setitem__("after", out))
        model(tokens())
        after.remove()
    before.remove()
    assert seen["before"].shape[1] == 64 and torch.equal(seen["before"], seen["after"])


# ---------------------------------------------------------------------------- forward_intermediates
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_forward_intermediates_are_dense_unmerged_features(
    reg_tokens: int, timm_tiny_vit: Callable[..., nn.Module]
) -> None:
    from tokenmerge.adapters.vit import merge_record, unmerge_tokens

    model = timm_tiny_vit(reg_tokens=reg_tokens)
    plain = copy.deepcopy(model)
    prefix = model.num_prefix_tokens
    x = images(0)
    expected: list[Tensor] = []

    def dense_output(module: nn.Module, args: Any, output: Tensor) -> None:
        record = merge_record(model)  # the adapter's block hook ran first: the map after this block
        expected.append(unmerge_tokens(output, record.full_token_map(output.shape[0])))  # (B, N0, C)

    with tokenmerge.apply(model, tokenmerge.ToMe(r=8)), torch.no_grad():
        handles = [block.register_forward_hook(dense_output) for block in model.blocks]
        final = model.forward_features(x)  # the merged forward, blocks run as one stream
        for handle in handles:
            handle.remove()
        assert [merge_record(model).num_tokens] == [prefix + 64 - 8 * 4]
        for norm in (False, True):
            want = [plain.norm(e) if norm else e for e in expected]
            last, nlc = model.forward_intermediates(x, norm=norm, output_fmt="NLC", return_prefix_tokens=True)
            _, nchw = model.forward_intermediates(x, norm=norm, output_fmt="NCHW")
            torch.testing.assert_close(last, final, rtol=1e-5, atol=1e-6)
            assert len(nlc) == len(nchw) == len(want) == 4
            for (spatial, prefix_tokens), grid, ref in zip(nlc, nchw, want):
                compare = torch.testing.assert_close if norm else lambda a, b: torch.equal(a, b) or pytest.fail()
                compare(spatial, ref[:, prefix:])  # dense, in patch order
                compare(prefix_tokens, ref[:, :prefix])
                compare(grid, ref[:, prefix:].transpose(1, 2).reshape(2, -1, 8, 8))
            # stop_early runs a slice of the blocks: the same features up to the last one asked for
            early = model.forward_intermediates(x, indices=[1], norm=norm, stop_early=True, intermediates_only=True)
            torch.testing.assert_close(early[0], want[1][:, prefix:].transpose(1, 2).reshape(2, -1, 8, 8))
