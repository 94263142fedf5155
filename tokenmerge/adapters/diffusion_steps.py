"""Step awareness inside an unchanged pipeline: a forward pre-hook on the denoiser.

Every denoiser call carries the latent and the timestep. `StepTracker` reads both:

* the latent's spatial size ``(H, W)``, from which the blocks derive their token grids;
* the timestep, which `MergeState.observe_timestep` turns into the 0-based step, the call
  within the step (separate classifier-free-guidance calls) and the start of a new
  generation (the timestep went up).

When the adapter was applied to a pipeline, the tracker also watches the pipeline's
scheduler: a new ``scheduler.timesteps`` tensor means ``set_timesteps`` ran, i.e. a new
pipeline call, so a new generation starts even when its first timestep equals the last
one seen (one-step generations). The step index is then the timestep's position in the
schedule, so img2img (which starts part-way through the schedule) gets the step
indices the schedule defines, and ``num_steps`` is the schedule's length.

All of this is per thread: the latent size of the running call, the schedule seen last
and (in `MergeState`) the step, so threads that each run their own sampling loop on one
denoiser each get their serial result. (A diffusers scheduler is not thread-safe itself:
give each thread a pipeline of its own, sharing the denoiser, or write the loop.)
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..hooks import PerThread, copied_ref
from ..state import MergeState
from .diffusion_layout import DenoiserLayout

__all__ = ["StepTracker", "timestep_value", "get_argument"]


def get_argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """The argument a call received at position ``index`` or as keyword ``name`` (None if absent)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def timestep_value(timestep: Any) -> float | None:
    """The timestep of a denoiser call as a Python float (the first element of a per-sample tensor).

    Reading a tensor on an accelerator synchronises with it once per denoiser call.
    """
    if timestep is None:
        return None
    if isinstance(timestep, Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


class _TrackerCall:
    """The calling thread's view: latent size of the running call, the schedule of its generation."""

    def __init__(self) -> None:
        self.latent_hw: tuple[int, ...] | None = None
        self.schedule: Tensor | None = None
        self.values: list[float] = []
        # The position ids whose grid was read last, and that grid: a pipeline passes the
        # same ids tensor at every step, so the host read happens once per generation.
        self.ids: weakref.ref[Tensor] | None = None
        self.ids_version: int | None = -1
        self.ids_grid: tuple[int, ...] | None = None


class StepTracker:
    """Forward pre-hook on a denoiser: latent size and denoising step for the merge hooks.

    Args:
        state: the merging state whose step it keeps.
        layout: the denoiser's layout (where the latent and the timestep are in its call).
        pipeline: the pipeline the config was applied to, if any (its scheduler is read,
            never changed; only a weak reference is kept).

    Attributes:
        latent_hw: ``(H, W)`` of the latent of the calling thread's current call, None before the first.
    """

    def __init__(self, state: MergeState, layout: DenoiserLayout, pipeline: Any = None) -> None:
        self.state = state
        self.layout = layout
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._per_thread = PerThread(_TrackerCall)
        self._listeners: list[Any] = []

    @property
    def _call(self) -> _TrackerCall:
        return self._per_thread.value

    @property
    def latent_hw(self) -> tuple[int, ...] | None:
        """``(H, W)`` (video: ``(F, H, W)``) of the latent of the calling thread's current denoiser call."""
        return self._call.latent_hw

    def __deepcopy__(self, memo: dict[int, Any]) -> StepTracker:
        # The copy watches the copied pipeline, if the pipeline is part of the copy.
        new = StepTracker.__new__(StepTracker)
        memo[id(self)] = new
        new.state = copy.deepcopy(self.state, memo)
        new.layout = copy.deepcopy(self.layout, memo)
        new._pipeline = copied_ref(self._pipeline, memo)
        new._per_thread = PerThread(_TrackerCall)
        new._listeners = copy.deepcopy(self._listeners, memo)
        return new

    def on_call(self, listener: Any) -> None:
        """Call ``listener()`` at the start of every denoiser call (to clear per-call state)."""
        self._listeners.append(listener)

    def _schedule_of_pipeline(self) -> Tensor | None:
        pipeline = self._pipeline() if self._pipeline is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        return timesteps if isinstance(timesteps, Tensor) and timesteps.dim() == 1 else None

    def _index_of(self, value: float, start: int) -> int | None:
        values = self._call.values
        for index in range(max(start, 0), len(values)):
            if math.isclose(values[index], value, rel_tol=1e-5, abs_tol=1e-4):
                return index
        return None

    def __call__(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record the latent size and advance the step; changes no argument."""
        for listener in self._listeners:
            listener()
        layout = self.layout
        latent = get_argument(args, kwargs, layout.latent_index, layout.latent_name)
        if layout.grid_ids is not None:  # a packed latent (B, N, C): the grid from the position ids
            self._call.latent_hw = self._grid_of_ids(layout.grid_ids.get(args, kwargs))
        elif layout.grid_shapes is not None:  # a packed latent with its grids as Python ints (Qwen-Image)
            self._call.latent_hw = layout.grid_of_shapes(layout.grid_shapes.get(args, kwargs))
        elif isinstance(latent, Tensor):
            grid = layout.latent_grid(latent)  # (B, C, H, W) -> (H, W); video (B, C, F, H, W) -> (F, H, W)
            if grid is not None:
                self._call.latent_hw = grid
        timestep = get_argument(args, kwargs, layout.timestep_index, layout.timestep_name)
        if timestep is None:
            return
        if getattr(self.state, "traceable", False):
            # Planning needs no step: hand the timestep over as it is (no host read, no Python state).
            self.state.observe_timestep(timestep)
            return
        self._track(timestep)

    @torch.compiler.disable
    def _grid_of_ids(self, ids: Any) -> tuple[int, ...] | None:
        if not isinstance(ids, Tensor):
            return None
        call = self._call
        # Inference tensors keep no version counter (and pipelines never edit their ids in place).
        version = None if ids.is_inference() else ids._version
        if call.ids is not None and call.ids() is ids and call.ids_version == version:
            return call.ids_grid  # the same, unchanged ids as the previous call: no host read
        grid = self.layout.grid_of_ids(ids)  # one host read per new ids tensor (per generation)
        call.ids, call.ids_version, call.ids_grid = weakref.ref(ids), version, grid
        return grid

    @torch.compiler.disable
    def _track(self, timestep: Any) -> None:
        value = timestep_value(timestep)
        if value is None:
            return
        value *= self.layout.timestep_scale  # the scheduler's timestep (Flux is called with t / 1000)
        state, call = self.state, self._call
        schedule = self._schedule_of_pipeline()
        if schedule is not None and schedule is not call.schedule:
            # set_timesteps ran since the last call: this is a new pipeline call.
            call.schedule = schedule
            call.values = [float(v) for v in schedule.tolist()]  # one host copy per generation
            state.reset()
        previous_step = state.step
        num_steps = len(call.values) if call.values else None
        state.observe_timestep(value, num_steps)
        if not call.values or state.call_index != 0 or state.step is None:
            return
        # Place the step on the schedule: img2img starts part-way; order-2 schedulers repeat timesteps.
        start = 0 if previous_step is None or state.step == 0 else previous_step + 1
        index = self._index_of(value, start)
        if index is not None and index > 0 and index != state.step:
            state.set_step(index, num_steps)
