"""`MergeState`: the runtime of one config on one model.

It holds what changes while a model runs: the pair cache, the seeded generator,
the denoising step of the current generation, and counters a test or a user can
read. Everything in it is reset at the start of every generation.

Two regimes, chosen once from the config (`MergeState.traceable`):

* **Traceable** (no cache, a shape-only threshold such as `FixedRatio`/`FixedCount`,
  a built-in matcher): planning is pure tensor code traced inline by `torch.compile`
  (``fullgraph=True`` works), with no host read and no Python state touched in the
  forward, so nothing recompiles from step to step and CUDA graphs replay it. Steps
  are not tracked; random partitions are keyed by the timestep tensor instead.
* **Stateful** (a pair cache, a similarity threshold, a step schedule, a custom
  policy): step tracking and planning run in Python outside the compiled graph
  (`torch.compiler.disable`): one graph break per merging layer, recompiles bounded
  by the distinct token counts (see `SimilarityThreshold`'s ``buckets``). Cached
  plans are built eagerly, never inside a CUDA graph, so a replay cannot overwrite
  them.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from .config import MergeConfig
from .errors import TokenMergeError, check
from .layout import TokenLayout, num_mergeable
from .plan import MergePlan
from .policies.base import MergeContext

__all__ = ["MergeState"]


class MergeState:
    """Caches, generator and step tracking for one applied config.

    Args:
        config: the merging policy.

    Attributes:
        step: 0-based step of the current generation, None when unknown.
        num_steps: number of steps of the current generation when known.
        call_index: forward call within the current step (separate CFG calls).
        generation: how many generations have started since `apply`.
        plans_computed: plans matched afresh (cache misses) since the last reset;
            counted in eager mode only (a compiled graph keeps no Python counters).
        plans_reused: plans taken from the cache since the last reset.
        seed: the seed random partitions are keyed by: ``config.seed``, or fresh
            entropy drawn once per state when that is None.
        timestep: the timestep the denoiser was last called with (see
            `observe_timestep`); keys the random partitions.
        traceable: True when planning needs no Python-side state (see the module
            docstring); fixed for the life of the state.
    """

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.cache = config.fresh_cache()
        self.traceable = is_traceable(config)
        self.seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
        self.timestep: Tensor | float | None = None
        self.generator = torch.Generator()
        self.step: int | None = None
        self.num_steps: int | None = None
        self.call_index = 0
        self.generation = 0
        self.plans_computed = 0
        self.plans_reused = 0
        self.merged_tokens: dict[str, tuple[int, int]] = {}
        self._last_timestep: float | None = None
        self._seed_generator()

    def _seed_generator(self) -> None:
        if self.config.seed is None:
            self.generator.seed()  # fresh entropy; never the global RNG
        else:
            self.generator.manual_seed(self.config.seed)

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget cached plans, re-seed the generator and clear the step counter."""
        self.cache.reset()
        self._seed_generator()
        self.step = None
        self.num_steps = None
        self.call_index = 0
        self.plans_computed = 0
        self.plans_reused = 0
        self._last_timestep = None

    def start_generation(self, num_steps: int | None = None) -> None:
        """Begin a new generation at step 0: caches and generator start afresh."""
        check(
            num_steps is None or (isinstance(num_steps, int) and num_steps >= 1),
            f"num_steps must be None or >= 1; got {num_steps!r}",
        )
        self.reset()
        self.step = 0
        self.num_steps = num_steps
        self.generation += 1

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Tell the state which denoising step runs next (0-based); step 0 starts a generation."""
        check(isinstance(step, int) and step >= 0, f"step must be an int >= 0; got {step!r}")
        if step == 0 or self.step is None:
            self.start_generation(num_steps if num_steps is not None else self.num_steps)
        elif num_steps is not None:
            self.num_steps = num_steps
        self.step = step
        self.call_index = 0

    def observe_timestep(self, timestep: Tensor | float, num_steps: int | None = None) -> None:
        """Track steps from the timesteps a denoiser is called with.

        Adapters call this on every denoiser call, with the timestep as given (a tensor
        stays on its device). It is kept as `timestep` to key random partitions. For a
        traceable config that is all: no host read, nothing for `torch.compile` to
        guard on. Otherwise a timestep below the last one is the next step; the same
        timestep again is a further call within the step (classifier-free guidance run
        separately); a timestep above the last one, or the first ever, starts a new
        generation. That bookkeeping runs outside any compiled graph.
        """
        self.timestep = timestep
        if self.traceable:
            return
        self._track_timestep(timestep, num_steps)

    @torch.compiler.disable
    def _track_timestep(self, timestep: Tensor | float, num_steps: int | None) -> None:
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
        last = self._last_timestep
        if last is None or value > last:
            self.start_generation(num_steps)
        elif value < last:
            assert self.step is not None
            self.step += 1
            self.call_index = 0
        else:
            self.call_index += 1
        self._last_timestep = value

    # ------------------------------------------------------------------ planning
    def context(
        self, layer: str, layer_index: int, num_layers: int, num_tokens: int, grid: tuple[int, int] | None
    ) -> MergeContext:
        """The `MergeContext` the policies see for one layer call."""
        return MergeContext(
            layer=layer,
            layer_index=layer_index,
            num_layers=num_layers,
            num_tokens=num_tokens,
            grid=grid,
            step=self.step,
            num_steps=self.num_steps,
            call_index=self.call_index,
            generator=self.generator,
            seed=self.seed,
            timestep=self.timestep,
        )

    def plan(
        self,
        layer: str,
        metric: Tensor,
        *,
        layout: TokenLayout | None = None,
        layer_index: int = 0,
        num_layers: int = 1,
        grid: tuple[int, ...] | None = None,
        protected: int = 0,
    ) -> MergePlan:
        """The merge plan for one layer call, from the cache or matched afresh.

        Args:
            layer: the layer's key.
            metric: ``(B, N, C)`` features the matching compares (protected tokens included).
            layout: the token layout (protected prefix, mergeable grid, protected suffix);
                its grid becomes ``MergeContext.grid``. Instead of ``grid`` and ``protected``.
            layer_index, num_layers: the layer's place among the merging layers.
            grid: ``(h, w)`` of the mergeable tokens when they are image patches (without ``layout``).
            protected: prefix tokens that are never merged (without ``layout``).
        """
        if metric.dim() != 3:
            raise TokenMergeError(f"metric must be 3-D (B, N, C); got shape {tuple(metric.shape)}")
        if layout is not None:
            if grid is not None or protected:
                raise TokenMergeError(f"give layout or grid/protected, not both; got layout={layout}")
            layout.check_tokens(metric.shape[1])
            # An int prefix where the layout has no suffix: old-style matchers and caches see ints.
            grid, protected = layout.grid, (layout if layout.suffix else layout.prefix)  # type: ignore[assignment]
        if self.traceable:
            return self._plan_inline(layer, metric, layer_index, num_layers, grid, protected)
        return self._plan_cached(layer, metric, layer_index, num_layers, grid, protected)

    def _plan_inline(
        self, layer: str, metric: Tensor, layer_index: int, num_layers: int, grid: Any, protected: int
    ) -> MergePlan:
        # Pure tensor code: traced into the compiled graph; nothing cached, no host reads.
        # No step fields: a traceable policy does not read them, and a Python int read
        # here would become a guard (a recompile per step).
        ctx = MergeContext(
            layer=layer,
            layer_index=layer_index,
            num_layers=num_layers,
            num_tokens=num_mergeable(protected, metric.shape[1]),
            grid=grid,
            generator=self.generator,
            seed=self.seed,
            timestep=self.timestep,
        )
        plan = compute_plan(self.config, metric.detach(), ctx, protected)
        if not _compiling():  # Python counters would be guarded on (a recompile per call)
            self.plans_computed += 1
            self.merged_tokens[layer] = (plan.num_in, plan.num_out)
        return plan

    @torch.compiler.disable
    def _plan_cached(
        self, layer: str, metric: Tensor, layer_index: int, num_layers: int, grid: Any, protected: int
    ) -> MergePlan:
        # Runs eagerly even inside a compiled model, so the plans it caches are ordinary
        # tensors (never a CUDA graph's static outputs that a later replay overwrites).
        ctx = self.context(layer, layer_index, num_layers, num_mergeable(protected, metric.shape[1]), grid)
        key = (layer, self.call_index)
        plan = self.cache.lookup(key, metric, ctx, protected)
        if plan is not None:
            self.plans_reused += 1
            return plan
        with torch.no_grad():
            plan = compute_plan(self.config, metric, ctx, protected)
        self.cache.store(key, plan, metric, ctx, protected)
        self.plans_computed += 1
        self.merged_tokens[layer] = (plan.num_in, plan.num_out)
        return plan

    def __repr__(self) -> str:
        return f"MergeState(step={self.step}, generation={self.generation}, cached={len(self.cache)})"


def compute_plan(config: MergeConfig, metric: Tensor, ctx: MergeContext, protected: int = 0) -> MergePlan:
    """Match ``metric`` ``(B, N, C)`` with ``config`` and build the plan (no cache)."""
    return config.matcher.build_plan(metric, ctx, config.threshold, protected)


def is_traceable(config: MergeConfig) -> bool:
    """Whether ``config`` plans without Python-side state: no cache, shape-only threshold, traceable matcher."""
    return bool(config.cache.stateless and config.threshold.traceable and config.matcher.traceable)


def _compiling() -> bool:
    """True while `torch.compile` traces (Python side effects would then become guards)."""
    return torch.compiler.is_compiling()


def describe(state: MergeState) -> dict[str, Any]:
    """A summary of the state for logs and the CLI."""
    return {
        "step": state.step,
        "generation": state.generation,
        "plans_computed": state.plans_computed,
        "plans_reused": state.plans_reused,
        "tokens": dict(state.merged_tokens),
    }
