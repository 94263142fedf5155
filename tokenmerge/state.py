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

Who owns what:

* The state itself belongs to the handle and lives as long as the config is applied:
  the config, the seed, whether it traces, and `merged_tokens` (the last token counts
  per layer). Nothing in it refers to the model.
* Generation state is per thread (a `tokenmerge.hooks.PerThread`): the step, the number of
  steps, the call within the step, the generation count, the plan counters, the
  timestep of the running denoiser call, the generator and the pair cache's entries
  (each thread gets its own empty copy of the configured cache). Two threads that each
  run their own generation on one model therefore each get exactly their serial result.
  The public attributes (`step`, `cache`, `plans_computed`, ...) read and write the
  calling thread's view; `reset`, `start_generation` and `set_step` act on it.
* Planning has one path: `MergeState.plan` takes the `~tokenmerge.layout.TokenLayout`
  of the call (every adapter describes its tokens with one); the legacy ``grid=`` and
  ``protected=`` keywords are turned into a layout first (`legacy_layout`).
* The cache is bounded: entries are keyed by layer and by the call within the step,
  and the calls from index ``MAX_CALL_SLOTS - 1`` on share one slot, so a bare denoiser
  called again and again at one timestep keeps at most ``MAX_CALL_SLOTS`` entries per
  layer (per thread).
"""

from __future__ import annotations

import copy
import functools
import random
from typing import Any

import torch
from torch import Tensor

from .config import MergeConfig
from .errors import TokenMergeError, check
from .hooks import PerThread
from .layout import TokenLayout
from .plan import MergePlan
from .policies.base import MergeContext, PairCache
from .policies.checks import check_plan_from_cache, needs_check

__all__ = ["MergeState", "MAX_CALL_SLOTS", "legacy_layout"]

#: Calls within one step that get cache entries of their own (separate classifier-free
#: guidance calls are 0 and 1); later calls share the last slot. Bounds the cache at
#: ``MAX_CALL_SLOTS`` entries per layer however often a denoiser is called at one timestep.
MAX_CALL_SLOTS = 4


class _Generation:
    """One thread's generation: step tracking, counters, generator and cache entries."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.cache = config.fresh_cache()
        self.generator = torch.Generator()
        self.step: int | None = None
        self.num_steps: int | None = None
        self.call_index = 0
        self.generation = 0
        self.plans_computed = 0
        self.plans_reused = 0
        self.timestep: Tensor | float | None = None
        self.last_timestep: float | None = None
        self.seed_generator()

    def seed_generator(self) -> None:
        if self.config.seed is None:
            self.generator.seed()  # fresh entropy; never the global RNG
        else:
            self.generator.manual_seed(self.config.seed)


def _thread_field(name: str, doc: str) -> property:
    """A `MergeState` attribute that reads and writes the calling thread's generation state."""

    def get(self: MergeState) -> Any:
        return getattr(self._thread, name)

    def set_(self: MergeState, value: Any) -> None:
        setattr(self._thread, name, value)

    return property(get, set_, doc=doc)


class MergeState:
    """Caches, generator and step tracking for one applied config.

    The state belongs to the handle; what changes within a generation is kept per
    thread (see the module docstring): the attributes below that say "this thread"
    read and write the calling thread's view, so a single-threaded user sees one state
    as before, and threads running their own generations do not disturb each other.

    Args:
        config: the merging policy.

    Attributes:
        step: 0-based step of this thread's current generation, None when unknown.
        num_steps: number of steps of this thread's current generation when known.
        call_index: forward call within the current step (separate CFG calls), this thread.
        generation: how many generations this thread has started since `apply`.
        plans_computed: plans matched afresh (cache misses) in this thread since its last
            reset; counted in eager mode only (a compiled graph keeps no Python counters).
        plans_reused: plans taken from the cache in this thread since its last reset.
        merged_tokens: ``{layer: (num_in, num_out)}`` of the last plan of each layer (any thread).
        cache: this thread's copy of the configured `PairCache` (entries bounded, see
            `MAX_CALL_SLOTS`).
        generator: this thread's seeded generator (for custom policies).
        seed: the seed random partitions are keyed by: ``config.seed``, or fresh
            entropy drawn once per state when that is None.
        timestep: the timestep of this thread's running denoiser call (see
            `observe_timestep`); keys the random partitions.
        traceable: True when planning needs no Python-side state (see the module
            docstring); fixed for the life of the state.
    """

    step = _thread_field("step", "0-based step of this thread's generation, None when unknown.")
    num_steps = _thread_field("num_steps", "Steps of this thread's generation when known.")
    call_index = _thread_field("call_index", "Forward call within the current step, this thread.")
    generation = _thread_field("generation", "Generations this thread has started since apply.")
    plans_computed = _thread_field("plans_computed", "Plans matched afresh in this thread since its last reset.")
    plans_reused = _thread_field("plans_reused", "Plans reused from the cache in this thread since its last reset.")
    timestep = _thread_field("timestep", "The timestep of this thread's running denoiser call.")

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.traceable = is_traceable(config)
        self.seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
        self.merged_tokens: dict[str, tuple[int, int]] = {}
        self._per_thread = PerThread(functools.partial(_Generation, config))

    @property
    def _thread(self) -> _Generation:
        return self._per_thread.value

    @property
    def cache(self) -> PairCache:
        """This thread's pair cache: an empty copy of ``config.cache`` made on first use in the thread."""
        return self._thread.cache

    @property
    def generator(self) -> torch.Generator:
        """This thread's generator, re-seeded at every generation it starts."""
        return self._thread.generator

    def __deepcopy__(self, memo: dict[int, Any]) -> MergeState:
        # A copy (of a merged model) starts with no generation in flight, same seed and config.
        new = MergeState.__new__(MergeState)
        memo[id(self)] = new
        new.config = copy.deepcopy(self.config, memo)
        new.traceable, new.seed = self.traceable, self.seed
        new.merged_tokens = dict(self.merged_tokens)
        new._per_thread = PerThread(functools.partial(_Generation, new.config))
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TokenMergeError("a MergeState holds per-thread state and cannot be pickled; pickle its config")

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget this thread's cached plans, re-seed its generator and clear its step counter."""
        thread = self._thread
        thread.cache.reset()
        thread.seed_generator()
        thread.step = None
        thread.num_steps = None
        thread.call_index = 0
        thread.plans_computed = 0
        thread.plans_reused = 0
        thread.last_timestep = None

    def start_generation(self, num_steps: int | None = None) -> None:
        """Begin a new generation at step 0 in this thread: its cache and generator start afresh."""
        check(
            num_steps is None or (isinstance(num_steps, int) and num_steps >= 1),
            f"num_steps must be None or >= 1; got {num_steps!r}",
        )
        self.reset()
        thread = self._thread
        thread.step = 0
        thread.num_steps = num_steps
        thread.generation += 1

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Tell the state which denoising step runs next in this thread (0-based); step 0 starts a generation."""
        check(isinstance(step, int) and step >= 0, f"step must be an int >= 0; got {step!r}")
        thread = self._thread
        if step == 0 or thread.step is None:
            self.start_generation(num_steps if num_steps is not None else thread.num_steps)
        elif num_steps is not None:
            thread.num_steps = num_steps
        thread.step = step
        thread.call_index = 0

    def observe_timestep(self, timestep: Tensor | float, num_steps: int | None = None) -> None:
        """Track steps from the timesteps a denoiser is called with (in the calling thread).

        Adapters call this on every denoiser call, with the timestep as given (a tensor
        stays on its device). It is kept as `timestep` to key random partitions. For a
        traceable config that is all: no host read, nothing for `torch.compile` to
        guard on. Otherwise a timestep below the last one is the next step; the same
        timestep again is a further call within the step (classifier-free guidance run
        separately); a timestep above the last one, or the first ever, starts a new
        generation. That bookkeeping runs outside any compiled graph.
        """
        self._thread.timestep = timestep
        if self.traceable:
            return
        self._track_timestep(timestep, num_steps)

    @torch.compiler.disable
    def _track_timestep(self, timestep: Tensor | float, num_steps: int | None) -> None:
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
        thread = self._thread
        last = thread.last_timestep
        if last is None or value > last:
            self.start_generation(num_steps)
        elif value < last:
            assert thread.step is not None
            thread.step += 1
            thread.call_index = 0
        else:
            thread.call_index += 1
        thread.last_timestep = value

    # ------------------------------------------------------------------ planning
    def context(
        self, layer: str, layer_index: int, num_layers: int, num_tokens: int, grid: tuple[int, ...] | None
    ) -> MergeContext:
        """The `MergeContext` the policies see for one layer call (this thread's step and call)."""
        thread = self._thread
        return MergeContext(
            layer=layer,
            layer_index=layer_index,
            num_layers=num_layers,
            num_tokens=num_tokens,
            grid=grid,
            step=thread.step,
            num_steps=thread.num_steps,
            call_index=thread.call_index,
            generator=thread.generator,
            seed=self.seed,
            timestep=thread.timestep,
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

        Every adapter passes a ``layout``. The ``grid``/``protected`` keywords are kept
        for external callers and go the same way: they are turned into the layout
        ``TokenLayout(grid or (N - protected,), prefix=protected)`` (`legacy_layout`),
        except that without a ``grid`` the policies see ``MergeContext.grid = None``
        (the grid matchers then assume a square, as they always did on that path).

        Args:
            layer: the layer's key.
            metric: ``(B, N, C)`` features the matching compares (protected tokens included).
            layout: the token layout (protected prefix, mergeable grid, protected suffix);
                its grid becomes ``MergeContext.grid``. Instead of ``grid`` and ``protected``.
            layer_index, num_layers: the layer's place among the merging layers.
            grid: ``(n,)``, ``(h, w)`` or ``(t, h, w)`` of the mergeable tokens (without
                ``layout``; legacy).
            protected: prefix tokens that are never merged (without ``layout``; legacy).

        Raises:
            TokenMergeError: when ``metric`` is not 3-D, both forms are given, or the
                layout (or ``grid`` and ``protected``) does not cover the N tokens.
        """
        if metric.dim() != 3:
            raise TokenMergeError(f"metric must be 3-D (B, N, C); got shape {tuple(metric.shape)}")
        if layout is None:
            layout = legacy_layout(metric.shape[1], grid, protected)
            context_grid = grid if grid is None else layout.grid
        else:
            if grid is not None or protected:
                raise TokenMergeError(f"give layout or grid/protected, not both; got layout={layout}")
            layout.check_tokens(metric.shape[1])
            context_grid = layout.grid
        if self.traceable:
            return self._plan_inline(layer, metric, layer_index, num_layers, layout, context_grid)
        return self._plan_cached(layer, metric, layer_index, num_layers, layout, context_grid)

    def _plan_inline(
        self,
        layer: str,
        metric: Tensor,
        layer_index: int,
        num_layers: int,
        layout: TokenLayout,
        grid: tuple[int, ...] | None,
    ) -> MergePlan:
        # Pure tensor code: traced into the compiled graph; nothing cached, no host reads.
        # No step fields: a traceable policy does not read them, and a Python int read
        # here would become a guard (a recompile per step). The layout is a Python value:
        # it adds no operator.
        thread = self._thread
        ctx = MergeContext(
            layer=layer,
            layer_index=layer_index,
            num_layers=num_layers,
            num_tokens=layout.num_mergeable,
            grid=grid,
            generator=thread.generator,
            seed=self.seed,
            timestep=thread.timestep,
        )
        plan = compute_plan(self.config, metric.detach(), ctx, _protected(layout))
        if not _compiling():  # Python counters would be guarded on (a recompile per call)
            thread.plans_computed += 1
            self.merged_tokens[layer] = (plan.num_in, plan.num_out)
        return plan

    @torch.compiler.disable
    def _plan_cached(
        self,
        layer: str,
        metric: Tensor,
        layer_index: int,
        num_layers: int,
        layout: TokenLayout,
        grid: tuple[int, ...] | None,
    ) -> MergePlan:
        # Runs eagerly even inside a compiled model, so the plans it caches are ordinary
        # tensors (never a CUDA graph's static outputs that a later replay overwrites).
        thread = self._thread
        protected = _protected(layout)
        ctx = self.context(layer, layer_index, num_layers, layout.num_mergeable, grid)
        key = (layer, min(thread.call_index, MAX_CALL_SLOTS - 1))  # bounded: later calls share the last slot
        plan = thread.cache.lookup(key, metric, ctx, protected)
        if plan is not None and needs_check(thread.cache):  # a user's cache: the plan fits this call
            check_plan_from_cache(plan, metric, thread.cache, layout.prefix)
        if plan is not None:
            thread.plans_reused += 1
            return plan
        with torch.no_grad():
            plan = compute_plan(self.config, metric, ctx, protected)
        thread.cache.store(key, plan, metric, ctx, protected)
        thread.plans_computed += 1
        self.merged_tokens[layer] = (plan.num_in, plan.num_out)
        return plan

    def __repr__(self) -> str:
        return f"MergeState(step={self.step}, generation={self.generation}, cached={len(self.cache)})"


def compute_plan(config: MergeConfig, metric: Tensor, ctx: MergeContext, protected: int | TokenLayout = 0) -> MergePlan:
    """Match ``metric`` ``(B, N, C)`` with ``config`` and build the plan (no cache).

    ``protected``: a protected prefix length, or a whole `TokenLayout`.
    """
    return config.matcher.build_plan(metric, ctx, config.threshold, protected)


def legacy_layout(num_tokens: int, grid: tuple[int, ...] | None, protected: int) -> TokenLayout:
    """The `TokenLayout` the legacy ``grid``/``protected`` keywords of `MergeState.plan` stand for.

    ``TokenLayout(grid, prefix=protected)``, or a sequence of the ``num_tokens -
    protected`` tokens after the prefix when ``grid`` is None.

    Raises:
        TokenMergeError: naming ``protected`` or ``grid`` when they do not fit ``num_tokens``.
    """
    if not (isinstance(protected, int) and not isinstance(protected, bool) and 0 <= protected < num_tokens):
        raise TokenMergeError(
            f"protected must be an int in [0, {num_tokens}) (the metric has {num_tokens} tokens); got {protected!r}"
        )
    if grid is None:
        return TokenLayout.sequence(num_tokens - protected, prefix=protected)
    layout = TokenLayout(grid, prefix=protected)
    if layout.num_tokens != num_tokens:
        raise TokenMergeError(
            f"grid {layout.grid} covers {layout.num_mergeable} tokens but the metric has {num_tokens - protected} "
            f"after the {protected} protected ones; prod(grid) must equal N - protected"
        )
    return layout


def _protected(layout: TokenLayout) -> int | TokenLayout:
    # What matchers and caches get: the prefix count when the layout has no suffix (so a
    # policy written for ints keeps working and a cache entry is the same as before
    # layouts), else the whole layout.
    return layout if layout.suffix else layout.prefix


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
