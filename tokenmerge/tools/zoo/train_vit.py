"""Training of the reference ViT classifier (``vit-photos``), called by `tokenmerge.tools.zoo.train`.

Every step draws fresh seeded crops of the training part of the photographs (left 80% of
the columns): log-uniform crop sides, horizontal flips, brightness jitter. AdamW with
weight decay, linear warm-up and cosine decay (`tokenmerge.tools.zoo.train`'s schedule),
label smoothing, gradient clipping at 1 and an EMA of the weights, saved in fp16. After
training the saved weights are loaded back and scored on the seeded held-out crops
(`tokenmerge.tools.zoo.classifier.eval_crops`); the scores go into the JSON record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import seeded, synchronize
from .classifier import ClassifierSpec, build_classifier, sample_crops
from .photos import split_columns

__all__ = ["ClassifierOptions", "train_classifier", "EVAL_PER_CLASS", "CI_PER_CLASS"]

#: Held-out crops per class of the accuracy recorded with the weights.
EVAL_PER_CLASS = 32
#: Held-out crops per class of the fast subset the tests score (a prefix of the full set).
CI_PER_CLASS = 4
LABEL_SMOOTHING = 0.1


@dataclass
class ClassifierOptions:
    """Options of one classifier training run."""

    device: str = "cpu"
    steps: int | None = None
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.05
    ema: float = 0.999
    seed: int = 0
    log_every: int = 0


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 1% of ``base``."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def training_regions(photos: Sequence[Tensor]) -> list[Tensor]:
    """The training part (columns left of `split_columns`) of every ``(3, H, W)`` photo in [-1, 1], in [0, 1]."""
    return [p[:, :, : split_columns(p.shape[-1])].add(1.0).div(2.0) for p in photos]


def train_classifier(
    spec: ClassifierSpec,
    photos: Sequence[Tensor],
    options: ClassifierOptions,
    budget_s: float | None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train one reference classifier on ``options.device`` (its crops are drawn on the CPU).

    Args:
        spec: the classifier spec.
        photos: ``(3, H, W)`` photographs in [-1, 1] (`tokenmerge.tools.zoo.photos.load_photos`), label order.
        options: the run's options; ``steps`` and/or ``budget_s`` bound it.
        budget_s: seconds it may train, or None.
        log: where progress lines go.

    Returns:
        The fp16 EMA state dict and a JSON-ready record of the run.
    """
    regions = [r.cpu() for r in training_regions(photos)]  # crops are drawn on the CPU: the same on every device
    device = torch.device(options.device)
    with seeded(options.seed):
        model = build_classifier(spec)
    model.to(device).train()
    params = [p for p in model.parameters()]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr,
        betas=(0.9, 0.99),
    )
    ema = [p.detach().clone() for p in params]
    data = torch.Generator().manual_seed(options.seed + 2)
    count = sum(p.numel() for p in params)
    size = spec.image_size
    num_classes = len(spec.class_names)
    log(f"== {spec.name}: {count / 1e6:.2f} M parameters, batch {options.batch_size}, {size} px")

    def batch() -> tuple[Tensor, Tensor]:
        labels = torch.randint(num_classes, (options.batch_size,), generator=data)  # (B,)
        images = sample_crops(regions, labels, size, data, augment=True)  # (B, 3, S, S)
        return images.to(device), labels.to(device)

    def step_once(index: int, total: int) -> float:
        images, labels = batch()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(index, total, options.lr)
        loss = F.cross_entropy(model(images), labels, label_smoothing=LABEL_SMOOTHING)  # (,)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        weight = 1.0 - min(options.ema, (1 + index) / (10 + index))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], weight)
        return float(loss.detach())

    start = time.perf_counter()
    planned = options.steps
    timed = None
    if budget_s is not None:
        # One timed step on a copy of the state (the run itself stays as seeded).
        backup = ({k: v.clone() for k, v in model.state_dict().items()}, data.get_state())
        times = []
        for _ in range(2):  # the first pass builds buffers
            synchronize(device)
            began = time.perf_counter()
            images, labels = batch()
            F.cross_entropy(model(images), labels).backward()
            synchronize(device)
            times.append(time.perf_counter() - began)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(backup[0])
        data.set_state(backup[1])
        timed = times[-1] * 1.1
        affordable = max(1, int((budget_s - (time.perf_counter() - start)) / timed))
        planned = affordable if planned is None else min(planned, affordable)
        log(f"   timed one step: {timed:.2f}s; planning {planned} steps")
    assert planned is not None
    first_plan = planned
    log_every = options.log_every or max(1, planned // 25)
    deadline = None if budget_s is None else start + budget_s
    curve: list[list[float]] = []
    recent: list[float] = []
    replans: list[list[int]] = []
    stopped_early = False
    step = 0
    train_start = time.perf_counter()
    log(f"   {'step':>6} {'loss':>8} {'lr':>9} {'img/s':>8} {'time':>7}")
    window: list[float] = []
    window_start = time.perf_counter()
    while step < planned:
        if deadline is not None and step > 0 and time.perf_counter() > deadline:
            stopped_early = True
            break
        window.append(step_once(step, planned))
        step += 1
        if step % log_every == 0 or step == planned:
            now = time.perf_counter()
            recent = (recent + window)[-50:]
            curve.append([step, round(float(np.mean(window)), 5)])
            speed = len(window) * options.batch_size / max(now - window_start, 1e-9)
            log(
                f"   {step:>6} {np.mean(window):>8.4f} {_lr_at(step - 1, planned, options.lr):>9.2e} "
                f"{speed:>8.1f} {now - start:>6.0f}s"
            )
            window, window_start = [], now
            if deadline is not None and step < planned:
                per_step = (now - train_start) / step  # mean so far: steady on a shared machine
                fits = step + int(0.97 * (deadline - now) / per_step)
                limit = options.steps or 4 * first_plan
                new_plan = max(step + 1, min(limit, fits))
                if abs(new_plan - planned) > 0.1 * planned:
                    log(f"   {per_step:.2f}s per step: re-planned {planned} -> {new_plan} steps")
                    planned = new_plan
                    replans.append([step, planned])
    elapsed = time.perf_counter() - start
    final = float(np.mean(recent)) if recent else float("nan")
    log(f"   done: {step} steps in {elapsed:.0f}s, final loss (mean of last {len(recent)} steps) {final:.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    record = {
        "steps": step,
        "planned_steps": planned,
        "replanned": replans,
        "stopped_early": stopped_early,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "weight_decay": options.weight_decay,
        "label_smoothing": LABEL_SMOOTHING,
        "ema": options.ema,
        "seed": options.seed,
        "final_loss": round(final, 5),
        "loss_curve": curve,
        "train_seconds": round(elapsed, 1),
        "parameters": count,
    }
    return state, record
