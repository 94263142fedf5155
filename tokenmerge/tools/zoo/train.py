"""Train the reference models on crops of scikit-image's photographs.

The diffusion models (``dit-photos``, ``unet-photos``) train here; the ViT classifier
(``--models vit-photos``) in `tokenmerge.tools.zoo.train_vit`, which also writes
``heldout_strips.npz`` and records the held-out accuracy in the JSON.

Run ``python examples/train_reference.py --help`` (or ``python -m tokenmerge.tools.zoo.train``).
Writes, for each model, ``<name>.safetensors`` (fp16 EMA weights), ``<name>.json`` (the
model spec, the exact command, the loss curve, final loss, steps, hardware and time)
and the held-out evaluation crops ``heldout_crops.npz``; copy them into
``tokenmerge/tools/zoo/weights/`` to ship them.

Deterministic for a given ``--steps`` on a given device: all random draws come from
seeded generators. With a ``--minutes`` budget the script times a few steps first, fixes
the number of steps it can afford (``planned_steps``, recorded in the JSON) and then
runs exactly that schedule, so ``--steps <planned_steps>`` replays it (the JSON's
``replay_command``). If the run turns out slower or faster than timed (a shared
machine), the plan is changed on the way (``replanned`` in the JSON) so the schedule
still ends on time; such a run, like one cut by the hard deadline, has no exact replay.

The photographs come from scikit-image; on a machine without it, export them once with
``--export-photos out/reference-photos.npz`` where it is installed and pass ``--photos``
(``out/reference-photos.npz`` is read by default when scikit-image is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import device_argument, resolve_device, seeded, synchronize
from .classifier import CLASSIFIER_SPECS
from .specs import SPECS, ZooSpec, build_pipeline

__all__ = ["TrainOptions", "train_model", "main", "parse_args"]

#: Where ``--export-photos`` writes by convention; read without ``--photos`` when scikit-image is absent.
DEFAULT_PHOTOS = "out/reference-photos.npz"
LABEL_DROP = 0.1  # classifier-free guidance: the null label replaces 10% of labels
WARMUP_STEPS = 50  # at most; a run of N steps warms up for N // 10
TIMING_STEPS = 1  # forward+backward passes timed per resolution to plan a --minutes run (after one warm-up)
CPU_PROBE_BATCH = 2  # on a CPU those passes use a batch this small and scale the time up to the real batch


@dataclass
class TrainOptions:
    """Options of one training run (see ``--help``)."""

    device: str = "cpu"
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 8
    lr: float = 8e-4
    ema: float = 0.999
    progressive: tuple[tuple[int, float], ...] = ()
    bank_size: int = 4096
    autocast: str = "none"
    seed: int = 0
    log_every: int = 0
    preview: int = 0


def _log(message: str) -> None:
    print(message, flush=True)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def _denoise_fn(pipe: Any) -> tuple[list[nn.Module], Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The trainable modules of a pipeline and its noise prediction (model input, t, labels)."""
    if hasattr(pipe, "transformer"):
        return [pipe.transformer], lambda x, t, y: pipe.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]
    return [pipe.unet, pipe.class_tokens], lambda x, t, y: pipe.unet(
        x, t, encoder_hidden_states=pipe.class_tokens(y), return_dict=False
    )[0]


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` at ``total``."""
    warmup = max(1, min(WARMUP_STEPS, total // 10))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Trainer:
    """One model's optimiser, EMA and step function."""

    def __init__(self, spec: ZooSpec, options: TrainOptions, device: torch.device) -> None:
        self.spec = spec
        self.options = options
        self.device = device
        with seeded(options.seed):  # seeded initial weights, the caller's RNG untouched
            self.pipe = build_pipeline(spec).to(device)
        self.modules, self.predict = _denoise_fn(self.pipe)
        self.params = [p for m in self.modules for p in m.parameters()]
        for module in self.modules:
            module.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        from diffusers import DDPMScheduler

        self.noise_schedule = DDPMScheduler(**{k: v for k, v in spec.scheduler.items() if k != "set_alpha_to_one"})
        self.null = len(spec.class_names)
        self.generator = torch.Generator(device).manual_seed(options.seed + 1)
        self.amp = options.autocast == "bf16"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss(self, x0: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Epsilon-prediction MSE on one batch ``x0`` ``(B, 3, H, W)`` in [-1, 1]."""
        batch = x0.shape[0]
        drop = torch.rand(batch, generator=generator, device=self.device) < LABEL_DROP
        labels = torch.where(drop, torch.full_like(labels, self.null), labels)  # (B,)
        t = torch.randint(
            0, self.noise_schedule.config.num_train_timesteps, (batch,), generator=generator, device=self.device
        )
        noise = torch.randn(x0.shape, generator=generator, device=self.device)  # (B, 3, H, W)
        noisy = self.noise_schedule.add_noise(x0, noise, t)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred = self.predict(noisy, t, labels)
        return F.mse_loss(pred.float(), noise)

    def step(self, x0: Tensor, labels: Tensor, lr: float, index: int) -> Tensor:
        """One optimiser step; returns the (device) loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(x0, labels, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        decay = min(self.options.ema, (1 + index) / (10 + index))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        return loss.detach()

    def time_step(self, x0: Tensor, labels: Tensor) -> float:
        """Seconds of one forward+backward (no update, own generator: the run is unaffected)."""
        generator = torch.Generator(self.device).manual_seed(12345)
        timings = []
        warmup = 1  # the first pass at a shape builds kernels and buffers (seconds on a CPU, too)
        for _ in range(TIMING_STEPS + warmup):
            synchronize(self.device)
            start = time.perf_counter()
            loss = self.loss(x0, labels, generator)
            loss.backward()
            synchronize(self.device)
            timings.append(time.perf_counter() - start)
        self.optimizer.zero_grad(set_to_none=True)
        return min(timings[warmup:]) * 1.15  # plus the optimiser step and data

    def ema_state_dict(self) -> dict[str, Tensor]:
        """fp16 state dict of the EMA weights, keyed ``<component>.<param>``."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
            state: dict[str, Tensor] = {}
            names = ["transformer"] if self.spec.kind == "dit" else ["unet", "class_tokens"]
            for name, module in zip(names, self.modules):
                for key, value in module.state_dict().items():
                    state[f"{name}.{key}"] = value.detach().to("cpu", torch.float16).contiguous()
            for p, b in zip(self.params, backup):
                p.copy_(b)
        return state


def _batch(
    bank: Tensor, labels: Tensor, size: int, resolution: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``size`` crops from the bank with random horizontal flips, average-pooled down to ``resolution``."""
    device = bank.device
    index = torch.randint(bank.shape[0], (size,), generator=generator, device=device)
    x0 = bank[index].float().div(127.5).sub(1.0)  # (B, 3, 64, 64)
    flip = torch.rand(size, generator=generator, device=device) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    if resolution != x0.shape[-1]:
        x0 = F.avg_pool2d(x0, x0.shape[-1] // resolution)  # (B, 3, resolution, resolution)
    return x0, labels[index]


def _batch_at(batch_size: int, resolution: int, full: int) -> int:
    """Batch size at a progressive resolution: ``full / resolution`` times the full-resolution batch."""
    return batch_size * (full // resolution)


def _phases(progressive: Sequence[tuple[int, float]], planned: int, full: int) -> list[tuple[int, int]]:
    """``(first step, resolution)`` of each phase: the progressive ones, then ``full`` resolution."""
    phases, first = [], 0
    for resolution, fraction in progressive:
        phases.append((first, resolution))
        first += int(round(fraction * planned))
    phases.append((first, full))
    return phases


def _resolution_at(phases: Sequence[tuple[int, int]], step: int) -> int:
    return [res for first, res in phases if first <= step][-1]


def _replan(
    progressive: Sequence[tuple[int, float]],
    limit: int,
    full: int,
    done: int,
    step_seconds: dict[int, float],
    remaining_s: float,
) -> int:
    """The largest plan in ``[done + 1, limit]`` whose remaining steps fit in ``remaining_s``.

    ``step_seconds`` are the expected seconds per step at each resolution. The phase
    boundaries scale with the plan, so a shorter plan reaches the full resolution sooner.
    """

    def cost(total: int) -> float:
        phases = _phases(progressive, total, full)
        return sum(step_seconds[_resolution_at(phases, s)] for s in range(done, total))

    low, high = done + 1, limit
    if cost(high) <= remaining_s:
        return limit
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= remaining_s:
            low = middle
        else:
            high = middle - 1
    return low


def train_model(
    spec: ZooSpec,
    bank: Tensor,
    bank_labels: Tensor,
    options: TrainOptions,
    budget_s: float | None,
    log: Callable[[str], None] = _log,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train one reference model.

    Args:
        spec: the model spec.
        bank: ``(N, 3, 64, 64)`` uint8 crops on the training device.
        bank_labels: ``(N,)`` class labels.
        options: the run's options (``steps`` and/or the time ``budget_s`` bound it).
        budget_s: seconds this model may train, or None.
        log: where progress lines go.

    Returns:
        The fp16 EMA state dict and a JSON-ready record of the run.
    """
    device = resolve_device(options.device)
    trainer = _Trainer(spec, options, device)
    log(
        f"== {spec.name}: {trainer.num_parameters() / 1e6:.2f} M parameters, "
        f"batch {options.batch_size}, device {device}"
    )
    data_generator = torch.Generator(device).manual_seed(options.seed + 2)
    start = time.perf_counter()
    planned = options.steps
    full = bank.shape[-1]
    timed: dict[int, float] = {}
    if budget_s is not None:
        # Time a small batch (cheap on a CPU) and scale to the full one; a slower run is re-planned below.
        probe_size = options.batch_size if device.type == "cuda" else min(options.batch_size, CPU_PROBE_BATCH)
        probe = bank[:probe_size].float().div(127.5).sub(1.0)
        probe_labels = bank_labels[:probe_size]
        fractions = [*options.progressive, (full, 1.0 - sum(f for _, f in options.progressive))]
        scale = options.batch_size / probe_size
        timed = {}
        for res, _ in fractions:
            repeat = _batch_at(options.batch_size, res, full) // options.batch_size
            small = F.avg_pool2d(probe, full // res).repeat(repeat, 1, 1, 1)  # (probe * repeat, 3, res, res)
            timed[res] = scale * trainer.time_step(small, probe_labels.repeat(repeat))
        per_step = sum(f * timed[res] for res, f in fractions)
        remaining = budget_s - (time.perf_counter() - start)
        affordable = max(1, int(remaining / per_step))
        planned = affordable if planned is None else min(planned, affordable)
        shown = ", ".join(f"{t * 1000:.0f} ms at {res} px" for res, t in timed.items())
        log(f"   timed one step: {shown}; planning {planned} steps")
    assert planned is not None
    first_plan = planned
    phases = _phases(options.progressive, planned, full)
    log_every = options.log_every or max(1, planned // 25)
    deadline = None if budget_s is None else start + budget_s
    curve: list[list[float]] = []
    pending: list[Tensor] = []
    recent: list[float] = []
    step = 0
    stopped_early = False
    replans: list[list[int]] = []
    history: list[dict[str, int]] = []  # the phases as they ran (a re-plan moves later boundaries)
    phase_clock: dict[int, tuple[float, int]] = {}  # phase start step -> (time, step) its measurement began
    window_resolutions: set[int] = set()
    log(f"   {'step':>6} {'res':>4} {'loss':>8} {'lr':>9} {'img/s':>8} {'time':>7}")
    window_start = time.perf_counter()
    while step < planned:
        if deadline is not None and step > 0 and time.perf_counter() > deadline:  # at least one step
            stopped_early = True
            break
        resolution = _resolution_at(phases, step)
        window_resolutions.add(resolution)
        batch_size = _batch_at(options.batch_size, resolution, full)
        if not history or history[-1]["resolution"] != resolution:
            history.append({"first_step": step, "resolution": resolution, "batch_size": batch_size})
        x0, labels = _batch(bank, bank_labels, batch_size, resolution, data_generator)
        pending.append(trainer.step(x0, labels, _lr_at(step, planned, options.lr), step))
        step += 1
        if step % log_every == 0 or step == planned:
            losses = torch.stack(pending).float().cpu().tolist()
            pending.clear()
            recent = (recent + losses)[-max(50, log_every) :]
            mean = float(np.mean(losses))
            now = time.perf_counter()
            speed = len(losses) * batch_size / max(now - window_start, 1e-9)
            if deadline is not None and len(window_resolutions) == 1 and step < planned:
                # Slower or faster than timed (a shared machine)? Re-plan so the schedule ends on time,
                # from the mean step time since this resolution began (steady, unlike one window).
                phase_start = history[-1]["first_step"]
                if phase_start not in phase_clock:
                    phase_clock[phase_start] = (window_start, step - len(losses))
                since, first = phase_clock[phase_start]
                slowdown = (now - since) / max(1, step - first) / timed[resolution]
                expected = {res: t * slowdown for res, t in timed.items()}
                limit = options.steps or 4 * first_plan
                new_plan = _replan(options.progressive, limit, full, step, expected, 0.97 * (deadline - now))
                if abs(new_plan - planned) > 0.1 * planned:
                    log(f"   step time {slowdown:.2f}x the timed one: re-planned {planned} -> {new_plan} steps")
                    planned = new_plan
                    phases = _phases(options.progressive, planned, full)
                    replans.append([step, planned])
            window_resolutions.clear()
            window_start = now
            curve.append([step, round(mean, 5)])
            log(
                f"   {step:>6} {x0.shape[-1]:>4} {mean:>8.4f} {_lr_at(step - 1, planned, options.lr):>9.2e} "
                f"{speed:>8.1f} {now - start:>6.0f}s"
            )
    if pending:
        losses = torch.stack(pending).float().cpu().tolist()
        recent = (recent + losses)[-50:]
        curve.append([step, round(float(np.mean(losses)), 5)])
    synchronize(device)
    elapsed = time.perf_counter() - start
    final = float(np.mean(recent[-50:])) if recent else float("nan")
    log(f"   done: {step} steps in {elapsed:.0f}s, final loss (mean of last {min(50, len(recent))} steps) {final:.4f}")
    record = {
        "steps": step,
        "planned_steps": planned,
        "replanned": replans,
        "stopped_early": stopped_early,
        "phases": history,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "ema": options.ema,
        "autocast": options.autocast,
        "seed": options.seed,
        "final_loss": round(final, 5),
        "loss_curve": curve,
        "train_seconds": round(elapsed, 1),
        "parameters": trainer.num_parameters(),
    }
    return trainer.ema_state_dict(), record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of the training script."""
    parser = argparse.ArgumentParser(
        prog="train_reference",
        description="Train tokenmerge's reference diffusion models on crops of scikit-image's photographs.",
    )
    parser.add_argument(
        "--device", type=device_argument, default="cpu", help="cpu (default), cuda, cuda:N, mps or auto"
    )
    parser.add_argument(
        "--models",
        default="dit-photos,unet-photos",
        help="comma-separated model names: dit-photos, unet-photos (diffusion), vit-photos (classifier)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per model")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget for all models together")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on cuda, 8 on cpu; vit-photos 32")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (AdamW; default 8e-4, vit-photos 5e-4)"
    )
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument(
        "--progressive",
        default="",
        help="train first on downsampled crops, e.g. '16:0.3,32:0.4' = 30%% of steps at 16 px, then 40%% at 32 px, "
        "then 64 px; a phase at R px uses 64/R times the batch (cheap warm-up for CPU runs; default: none)",
    )
    parser.add_argument(
        "--bank-size", type=int, default=None, help="crops drawn up front (default: 32768 cuda, 4096 cpu)"
    )
    parser.add_argument("--autocast", choices=["none", "bf16"], default=None, help="default: bf16 on cuda, none on cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=0, help="steps between loss lines (default: about 25 lines)")
    parser.add_argument("--preview", type=int, default=None, help="images in a preview grid (default: 16 cuda, 0 cpu)")
    parser.add_argument("--out", default="reference-weights", help="output directory")
    parser.add_argument("--photos", default=None, help="read the photographs from this .npz instead of scikit-image")
    parser.add_argument(
        "--export-photos", default=None, help="write the photographs to this .npz (for a machine without scikit-image)"
    )
    args = parser.parse_args(argv)
    if args.steps is None and args.minutes is None and args.export_photos is None:
        parser.error("give --steps, --minutes or both")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be > 0")
    try:
        args.progressive = _parse_progressive(args.progressive)
    except ValueError as error:
        parser.error(f"--progressive: {error}")
    allowed = [*SPECS, *CLASSIFIER_SPECS]
    unknown = [m for m in args.models.split(",") if m not in allowed]
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed: {', '.join(allowed)}")
    return args


def _parse_progressive(text: str) -> tuple[tuple[int, float], ...]:
    """``'16:0.3,32:0.4'`` to ``((16, 0.3), (32, 0.4))``, validated."""
    if not text.strip():
        return ()
    phases = []
    for part in text.split(","):
        res, _, fraction = part.partition(":")
        phase = (int(res), float(fraction))
        if phase[0] not in (8, 16, 32) or not 0 < phase[1] < 1:
            raise ValueError(
                f"each phase must be RES:FRACTION with RES in 8, 16, 32 and 0 < FRACTION < 1; got {part!r}"
            )
        phases.append(phase)
    if sum(f for _, f in phases) >= 1:
        raise ValueError("the fractions must sum to less than 1 (the rest trains at 64 px)")
    return tuple(phases)


def _options(args: argparse.Namespace, device: torch.device) -> TrainOptions:
    cuda = device.type == "cuda"
    return TrainOptions(
        device=str(device),
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size or (128 if cuda else 8),
        lr=args.lr or 8e-4,
        ema=args.ema,
        progressive=args.progressive,
        bank_size=args.bank_size or (32768 if cuda else 4096),
        autocast=args.autocast or ("bf16" if cuda else "none"),
        seed=args.seed,
        log_every=args.log_every,
        preview=args.preview if args.preview is not None else (16 if cuda else 0),
    )


PREVIEW_CHUNK = 4  # images sampled at once for the preview grid (memory stays small)


def _save_preview(spec: ZooSpec, out: Path, count: int, device: torch.device, log: Callable[[str], None]) -> None:
    """Sample a preview grid from the saved weights; cosmetic, so a failure is logged, never raised."""
    from . import load

    try:
        pipe = load(spec.name, device=device, weights_dir=out)
        labels = [i % len(spec.class_names) for i in range(count)]
        generator = torch.Generator(device).manual_seed(0)
        chunks = []
        for start in range(0, count, PREVIEW_CHUNK):
            part = labels[start : start + PREVIEW_CHUNK]
            chunks.append(
                pipe(part, num_inference_steps=25, guidance_scale=3.0, generator=generator, output_type="np").images
            )
        images = np.concatenate(chunks)  # (count, H, W, 3)
    except (RuntimeError, MemoryError) as error:  # e.g. out of memory: the weights are already written
        log(f"   preview skipped: {type(error).__name__}: {str(error)[:200]}")
        return
    columns = min(8, count)
    rows = math.ceil(count / columns)
    size = images.shape[1]
    grid = np.ones((rows * size, columns * size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    from PIL import Image

    path = out / f"{spec.name}-preview.png"
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    log(f"   preview: {path}")


def _replay_command(argv: Sequence[str], name: str, steps: int) -> str:
    """The command that retrains just ``name`` for exactly ``steps`` steps (no time budget)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in ("--minutes", "--steps", "--models"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return "python examples/train_reference.py " + shlex.join([*kept, "--models", name, "--steps", str(steps)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: train the requested models and write their weights."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(args, argv, device)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run_classifier(
    name: str,
    photos: list[Tensor],
    args: argparse.Namespace,
    argv: Sequence[str],
    command: str,
    device: torch.device,
    out: Path,
    budget: float | None,
) -> None:
    """Train, save and score one reference classifier on ``device`` (its crops are drawn on the CPU)."""
    from safetensors.torch import save_file

    from . import load
    from .classifier import STRIPS_FILE, accuracy, eval_crops, write_heldout_strips
    from .specs import CLASS_NAMES
    from .train_vit import CI_PER_CLASS, EVAL_PER_CLASS, ClassifierOptions, train_classifier

    spec = CLASSIFIER_SPECS[name]
    photos = [p.cpu() for p in photos]
    write_heldout_strips(photos, out / STRIPS_FILE)
    options = ClassifierOptions(
        device=str(device),
        steps=args.steps,
        batch_size=args.batch_size or 32,
        lr=args.lr or 5e-4,
        ema=args.ema,
        seed=args.seed,
        log_every=args.log_every,
    )
    state, record = train_classifier(spec, photos, options, budget, _log)
    save_file(state, str(out / f"{name}.safetensors"))
    exact = not record["stopped_early"] and not record["replanned"]
    payload: dict[str, Any] = {
        "spec": spec.to_json(),
        "training": {
            "command": command,
            "replay_command": _replay_command(argv, name, record["planned_steps"]) if exact else None,
            "hardware": _hardware(device),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"),
            "data": f"fresh random multi-scale crops ({spec.image_size} px, flips, brightness 0.9-1.1) of the left 80% "
            f"of the columns of {len(CLASS_NAMES)} skimage.data photographs",
            **record,
        },
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    model = load(name, weights_dir=out)  # the saved fp16 weights, upcast: what users get
    scores = {}
    for per_class in (EVAL_PER_CLASS, CI_PER_CLASS):
        images, labels = eval_crops(per_class, spec.image_size, weights_dir=out)
        scores[per_class] = accuracy(model, images, labels)
    payload["evaluation"] = {
        "data": f"held-out crops of the right 20% of the columns ({STRIPS_FILE}), eval_crops(seed=0)",
        "per_class": EVAL_PER_CLASS,
        "top1": round(scores[EVAL_PER_CLASS], 6),
        "ci_per_class": CI_PER_CLASS,
        "ci_top1": round(scores[CI_PER_CLASS], 6),
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    size_mb = (out / f"{name}.safetensors").stat().st_size / 1e6
    _log(
        f"   wrote {out / name}.safetensors ({size_mb:.2f} MB) and {name}.json; held-out top-1 "
        f"{scores[EVAL_PER_CLASS]:.4f} ({len(CLASS_NAMES) * EVAL_PER_CLASS} crops), {scores[CI_PER_CLASS]:.4f} "
        f"({len(CLASS_NAMES) * CI_PER_CLASS} crops)"
    )


def _has_scikit_image() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def _run(args: argparse.Namespace, argv: Sequence[str], device: torch.device) -> int:
    from .photos import export_photos, use_photos
    from .specs import CLASS_NAMES

    if args.export_photos:
        export_photos(CLASS_NAMES, args.export_photos)
        _log(f"wrote {len(CLASS_NAMES)} photographs to {args.export_photos}")
        if args.steps is None and args.minutes is None:
            return 0
    photos_file = args.photos
    if photos_file is None and not _has_scikit_image() and Path(DEFAULT_PHOTOS).is_file():
        photos_file = DEFAULT_PHOTOS  # a machine without scikit-image, with the exported photographs carried over
        _log(f"scikit-image is not installed: reading the photographs from {DEFAULT_PHOTOS}")
    if photos_file:
        use_photos(photos_file)
    options = _options(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/train_reference.py " + shlex.join(argv)
    run_start = time.perf_counter()
    deadline = None if args.minutes is None else run_start + args.minutes * 60.0

    from safetensors.torch import save_file

    from .photos import heldout_crops, load_photos, random_crops

    _log(f"tokenmerge reference training: {command}")
    _log(f"device {device} ({_hardware(device)}), torch {torch.__version__}, options {options}")
    names = args.models.split(",")
    photos = load_photos(CLASS_NAMES, device)
    diffusion = [name for name in names if name in SPECS]
    if diffusion:
        bank_count = options.bank_size
        if options.steps is not None:
            bank_count = min(bank_count, options.steps * options.batch_size)
        bank, bank_labels = random_crops(photos, bank_count, 64, torch.Generator().manual_seed(options.seed))
        bank = bank.add(1.0).mul(127.5).round().to(torch.uint8)  # (N, 3, 64, 64)
        crops, labels = heldout_crops()
        np.savez_compressed(out / "heldout_crops.npz", images=crops, labels=labels, class_names=np.asarray(CLASS_NAMES))
        _log(
            f"crop bank: {bank.shape[0]} crops in {time.perf_counter() - run_start:.1f}s; held-out: {len(crops)} crops"
        )
    for index, name in enumerate(names):
        budget = None
        if deadline is not None:
            remaining_models = len(names) - index
            reserve = 10.0 if options.preview else 2.0  # saving (and the preview) after training
            budget = max(1.0, (deadline - time.perf_counter() - reserve * remaining_models) / remaining_models)
        if name in CLASSIFIER_SPECS:
            _run_classifier(name, photos, args, argv, command, device, out, budget)
            continue
        spec = SPECS[name]
        state, record = train_model(spec, bank, bank_labels, options, budget)
        save_file(state, str(out / f"{name}.safetensors"))
        exact = not record["stopped_early"] and not record["replanned"]
        replay = _replay_command(argv, name, record["planned_steps"]) if exact else None
        payload = {
            "spec": spec.to_json(),
            "training": {
                "command": command,
                "replay_command": replay,
                "hardware": _hardware(device),
                "torch": torch.__version__,
                "diffusers": __import__("diffusers").__version__,
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
                "data": f"{bank.shape[0]} random multi-scale crops (64 px, flips) of {len(CLASS_NAMES)} skimage.data "
                "photographs, right 20% of columns held out",
                **record,
            },
        }
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        size_mb = (out / f"{name}.safetensors").stat().st_size / 1e6
        _log(f"   wrote {out / name}.safetensors ({size_mb:.2f} MB) and {name}.json")
        if options.preview:
            _save_preview(spec, out, options.preview, device, _log)
    _log(f"total {time.perf_counter() - run_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
