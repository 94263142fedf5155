"""Step awareness inside unchanged pipelines: steps, generations, caches, CFG calls, seeds and RNGs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import tokenmerge
from tokenmerge.policies import MergeContext, RandomGrid, RecomputeAt
from tokenmerge.tools import tiny

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

# Blocks of the tiny SD UNet at full latent resolution (max_downsample=1): down 0 and up 2 (two).
TOP_BLOCKS = 3


class SpyRecomputeAt(RecomputeAt):
    """CA-ToMe's cache, recording the (step, call) of every plan it stores during the current generation."""

    def __init__(self, steps: Any) -> None:
        super().__init__(steps)
        self.computed_at: list[tuple[int | None, int]] = []

    def store(self, key: Any, plan: Any, metric: Any, ctx: MergeContext, protected: int = 0) -> Any:
        self.computed_at.append((ctx.step, ctx.call_index))
        return super().store(key, plan, metric, ctx, protected)

    def reset(self) -> None:
        super().reset()
        self.computed_at = []


def catome(steps: tuple[int, ...], **kwargs: Any) -> tokenmerge.MergeConfig:
    return tokenmerge.CAToMe(threshold=0.3, seed=0, **kwargs).replace(cache=SpyRecomputeAt(steps))


def generate(pipe: Any, steps: int = 6, guidance: float = 7.5, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    text = tiny.tiny_prompt_embeds(1)
    with torch.no_grad():
        return pipe(
            prompt_embeds=text,
            negative_prompt_embeds=torch.zeros_like(text),
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **kwargs,
        ).images


def test_catome_recomputes_exactly_at_its_steps_and_starts_fresh_each_call(diffusers_tiny_sd_pipeline):
    pipe = diffusers_tiny_sd_pipeline
    handle = tokenmerge.apply(pipe, catome((0, 3, 4)))
    state = handle.state
    first = generate(pipe, steps=6)
    assert state.cache.computed_at == [(0, 0)] * TOP_BLOCKS + [(3, 0)] * TOP_BLOCKS + [(4, 0)] * TOP_BLOCKS
    assert (state.plans_computed, state.plans_reused) == (3 * TOP_BLOCKS, 3 * TOP_BLOCKS)
    assert (state.generation, state.step, state.num_steps) == (1, 5, 6)

    second = generate(pipe, steps=6)
    assert state.generation == 2
    assert state.cache.computed_at == [(0, 0)] * TOP_BLOCKS + [(3, 0)] * TOP_BLOCKS + [(4, 0)] * TOP_BLOCKS
    assert (state.plans_computed, state.plans_reused) == (3 * TOP_BLOCKS, 3 * TOP_BLOCKS)
    assert torch.equal(first, second)
    handle.remove()


def test_one_step_generations_each_start_a_new_generation(diffusers_tiny_sd_pipeline):
    pipe = diffusers_tiny_sd_pipeline
    with tokenmerge.apply(pipe, catome((0,))) as handle:
        outputs = [generate(pipe, steps=1) for _ in range(3)]
        assert handle.state.generation == 3
        assert handle.state.cache.computed_at == [(0, 0)] * TOP_BLOCKS
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])


def test_dpm_solver_multistep_steps_are_tracked():
    pipe = tiny.tiny_sd_pipeline(scheduler=DPMSolverMultistepScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    with tokenmerge.apply(pipe, catome((0, 2))) as handle:
        first = generate(pipe, steps=5)
        assert handle.state.cache.computed_at == [(0, 0)] * TOP_BLOCKS + [(2, 0)] * TOP_BLOCKS
        assert (handle.state.step, handle.state.num_steps) == (4, 5)
        assert torch.equal(generate(pipe, steps=5), first)


def test_img2img_steps_are_positions_in_the_schedule():
    pipe = tiny.tiny_sd_img2img_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with tokenmerge.apply(pipe, catome((0, 4))) as handle:
        generate(pipe, steps=6, image=image, strength=0.5)  # the last 3 of 6 steps: 3, 4, 5
        state = handle.state
        # Nothing cached at step 3, so it computes there; then at the listed step 4; reuses at 5.
        assert state.cache.computed_at == [(3, 0)] * TOP_BLOCKS + [(4, 0)] * TOP_BLOCKS
        assert (state.step, state.num_steps, state.generation) == (5, 6, 1)


def test_separate_cfg_calls_keep_their_own_cache(diffusers_tiny):
    """A hand-written loop calling the UNet twice per timestep (unconditional, then conditional)."""
    case = diffusers_tiny("sd_unet", batch=1)
    unet = case.denoiser
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = tiny.tiny_prompt_embeds(1)
    with tokenmerge.apply(unet, catome((0, 2))) as handle, torch.no_grad():
        for timestep in (900, 600, 300, 100):
            unet(latent, timestep, encoder_hidden_states=torch.zeros_like(text))
            unet(latent, timestep, encoder_hidden_states=text)
        state = handle.state
        calls = [(0, 0)] * TOP_BLOCKS + [(0, 1)] * TOP_BLOCKS + [(2, 0)] * TOP_BLOCKS + [(2, 1)] * TOP_BLOCKS
        assert state.cache.computed_at == calls
        assert len(state.cache) == 2 * TOP_BLOCKS
        assert (state.step, state.call_index, state.generation) == (3, 1, 1)
        unet(latent, 999, encoder_hidden_states=text)  # the timestep went up: a new generation
        assert (state.step, state.call_index, state.generation) == (0, 0, 2)


class SpyGrid(RandomGrid):
    """ToMeSD's random grid, recording every matching it makes."""

    def __init__(self) -> None:
        super().__init__(2, 2, use_rand=True)
        self.matchings: list[Any] = []

    def match(self, metric: torch.Tensor, ctx: MergeContext) -> Any:
        matching = super().match(metric, ctx)
        self.matchings.append(matching)
        return matching


def test_batched_cfg_halves_share_one_partition(diffusers_tiny):
    case = diffusers_tiny("sd_unet", batch=2)
    matcher = SpyGrid()
    with tokenmerge.apply(case.target, tokenmerge.ToMeSD(ratio=0.5, seed=3).replace(matcher=matcher)):
        case.run()
    assert len(matcher.matchings) == TOP_BLOCKS  # one matching per block for the whole batch
    for matching in matcher.matchings:
        assert torch.equal(matching.dst_idx[0], matching.dst_idx[1])
        assert torch.equal(matching.src_idx[0], matching.src_idx[1])


@pytest.mark.parametrize(
    "config",
    [
        lambda: tokenmerge.ToMeSD(ratio=0.5, seed=7),
        lambda: tokenmerge.CAToMe(threshold=0.3, recompute_at=(0, 2), seed=7),
        lambda: tokenmerge.ToMeSD(ratio=0.5, seed=7, merge_crossattn=True, merge_mlp=True, max_downsample=4),
    ],
    ids=["tomesd", "catome", "tomesd-all"],
)
def test_seeded_pipeline_calls_are_bitwise_identical_and_leave_the_rngs_alone(diffusers_tiny_sd_pipeline, config):
    pipe = diffusers_tiny_sd_pipeline
    global_before = torch.get_rng_state()
    user = torch.Generator().manual_seed(11)
    text = tiny.tiny_prompt_embeds(1)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt_embeds=text,
                negative_prompt_embeds=torch.zeros_like(text),
                num_inference_steps=4,
                generator=user,
                output_type="latent",
            ).images

    user.manual_seed(11)
    plain = call()
    user_after_plain = user.get_state()
    with tokenmerge.apply(pipe, config()):
        user.manual_seed(11)
        first = call()
        assert torch.equal(user.get_state(), user_after_plain)  # merging drew nothing from the user's generator
        user.manual_seed(11)
        second = call()
    assert torch.equal(first, second)
    assert not torch.equal(first, plain)
    assert torch.equal(torch.get_rng_state(), global_before)  # nor from the global RNG


def test_seeds_change_random_partitions(diffusers_tiny):
    case = diffusers_tiny("sd_unet")
    results = []
    for seed in (1, 2):
        with tokenmerge.apply(case.target, tokenmerge.ToMeSD(ratio=0.5, seed=seed)):
            results.append(case.run())
    assert not torch.equal(results[0], results[1])
