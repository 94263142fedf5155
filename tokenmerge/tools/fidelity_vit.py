"""Accuracy benchmark: what ToMe costs in top-1 accuracy on the trained reference ViT.

`run_accuracy` scores ``vit-photos`` (`tokenmerge.tools.zoo`) on seeded held-out crops
(`tokenmerge.tools.zoo.classifier.eval_crops`), first unmerged and then with ToMe at
several ``r``, with and without proportional attention, and reports per row:

* **top-1**: accuracy on the held-out crops;
* **agreement**: the fraction of crops whose prediction equals the unmerged model's;
* **tokens**: tokens leaving the last block (of the tokens entering the first);
* **speed**: the fastest forward of one fixed batch over ``repeats`` rounds, and the
  speed-up over unmerged as the ratio of the fastest times. Every row runs once per
  round, one after the other, after a warm-up forward, so a slow spell on a shared
  machine hits all rows alike; the minimum is the estimate least disturbed by it.

Command line: ``tokenmerge fidelity --models vit-photos`` (see ``--r``, ``--per-class``,
``--repeats``, ``--batch-size``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import apply
from ..config import MergeConfig
from ..errors import check, check_int
from ..presets import ToMe
from .common import resolve_device, synchronize

__all__ = ["AccuracyRow", "AccuracyResult", "accuracy_methods", "run_accuracy", "format_accuracy_table"]

#: ToMe's r per block of the default rows (the reference ViT has 12 blocks and 196 patches).
DEFAULT_R: tuple[int, ...] = (0, 4, 8, 12, 16)


@dataclass
class AccuracyRow:
    """One method's scores on the reference ViT.

    Attributes:
        method: its label, e.g. ``"ToMe r=8"``.
        r: tokens merged per block (None for the unmerged model).
        prop_attn: proportional attention (None for the unmerged model).
        top1: top-1 accuracy on the held-out crops.
        agreement: fraction of predictions equal to the unmerged model's.
        tokens: tokens leaving the last block, class token included.
        tokens_in: tokens entering the first block.
        ms: fastest forward of the timing batch, in milliseconds.
        speedup: the unmerged model's fastest time over this row's.
    """

    method: str
    r: int | None
    prop_attn: bool | None
    top1: float
    agreement: float
    tokens: int
    tokens_in: int
    ms: float
    speedup: float

    def line(self) -> str:
        """The row as one line of text."""
        return (
            f"{self.method}: top-1 {self.top1:.2%}, agreement {self.agreement:.2%}, "
            f"tokens {self.tokens}/{self.tokens_in}, {self.ms:.1f} ms ({self.speedup:.2f}x)"
        )


@dataclass
class AccuracyResult:
    """The rows of one `run_accuracy` and how they were measured (``meta``)."""

    rows: list[AccuracyRow]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"meta": dict(self.meta), "rows": [asdict(r) for r in self.rows]}


def accuracy_methods(rs: Sequence[int] = DEFAULT_R) -> list[tuple[str, int | None, bool | None]]:
    """``(label, r, prop_attn)`` of the rows: unmerged first, then ToMe at every r with and without
    proportional attention (at ``r = 0`` once: nothing merges, so it makes no difference)."""
    rows: list[tuple[str, int | None, bool | None]] = [("plain", None, None)]
    for r in rs:
        check_int("r", r, 0)
        for prop in (True, False) if r > 0 else (True,):
            rows.append((f"ToMe r={r}" + ("" if prop else " no-prop"), r, prop))
    return rows


def _config(r: int, prop_attn: bool) -> MergeConfig:
    return ToMe(r=r, prop_attn=prop_attn)


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
    from ..adapters.vit import merge_record

    predictions = []
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size].to(device, dtype))  # (b, classes)
        predictions.append(logits.argmax(-1).cpu())
    record = merge_record(model)
    return torch.cat(predictions), record


@torch.no_grad()
def _time_once(model: nn.Module, batch: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    begin = time.perf_counter()
    model(batch)
    synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def run_accuracy(
    name: str = "vit-photos",
    *,
    rs: Sequence[int] = DEFAULT_R,
    per_class: int = 16,
    batch_size: int = 32,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> AccuracyResult:
    """Top-1 accuracy, agreement with the unmerged model and speed of ToMe on a reference ViT.

    Args:
        name: a `tokenmerge.tools.zoo` classifier (``"vit-photos"``).
        rs: ToMe's r per block of the merged rows.
        per_class: held-out crops per class scored (16 classes).
        batch_size: images per forward, for scoring and for the timed forward.
        repeats: timed rounds (each row once per round, after one warm-up round).
        device: where it runs.
        dtype: the model's floating-point type.
        weights_dir: load the model from here instead of the shipped weights.
        log: receives one line per row as soon as it is scored, then one per row with its speed.

    Returns:
        The rows (unmerged first) and ``meta`` (machine, versions, data).
    """
    from . import zoo
    from .zoo.classifier import ClassifierSpec, eval_crops

    check_int("per_class", per_class, 1)
    check_int("batch_size", batch_size, 1)
    check_int("repeats", repeats, 1)
    record = zoo.info(name, weights_dir)
    check(record["spec"]["kind"] == "vit", f"name must be a classifier of tokenmerge.tools.zoo; got {name!r}")
    spec = ClassifierSpec.from_json(record["spec"])
    resolved = resolve_device(device)
    model = zoo.load(name, device=resolved, dtype=dtype, weights_dir=weights_dir)
    images, labels = eval_crops(per_class, spec.image_size, weights_dir=weights_dir)  # (N, 3, S, S), (N,)
    timing_batch = images[: min(batch_size, images.shape[0])].to(resolved, dtype)
    methods = accuracy_methods(rs)

    # Scores (and the warm-up of every row), one row after the other.
    scored: list[tuple[float, float, int, int]] = []
    reference = None
    for label, r, prop in methods:
        handle = None if r is None else apply(model, _config(r, bool(prop)))
        try:
            predictions, merged = _predict(model, images, batch_size, resolved, dtype)
            _time_once(model, timing_batch, resolved)  # warm-up at the timing batch's shape
        finally:
            if handle is not None:
                handle.remove()
        if reference is None:
            reference = predictions
        tokens_in = merged.num_input if merged is not None else spec.grid[0] * spec.grid[1] + 1
        tokens = merged.num_tokens if merged is not None else tokens_in
        top1 = float((predictions == labels).float().mean())
        agreement = float((predictions == reference).float().mean())
        scored.append((top1, agreement, tokens, tokens_in))
        log(f"{name}: {label}: top-1 {top1:.2%}, agreement {agreement:.2%}, tokens {tokens}/{tokens_in}")
    # Timing rounds: every row once per round.
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(repeats):
        for index, (_label, r, prop) in enumerate(methods):
            handle = None if r is None else apply(model, _config(r, bool(prop)))
            try:
                times[index].append(_time_once(model, timing_batch, resolved))
            finally:
                if handle is not None:
                    handle.remove()
    base = min(times[0])
    rows = []
    for (label, r, prop), (top1, agreement, tokens, tokens_in), row_times in zip(methods, scored, times):
        fastest = min(row_times)
        row = AccuracyRow(label, r, prop, top1, agreement, tokens, tokens_in, fastest, base / fastest)
        rows.append(row)
        log(f"{name}: {row.line()}")  # the same rows again, now with their speed
    meta = {
        "model": name,
        "device": str(resolved),
        "hardware": torch.cuda.get_device_name(resolved)
        if resolved.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
        "python": platform.python_version(),
        "crops": int(images.shape[0]),
        "per_class": per_class,
        "batch_size": int(timing_batch.shape[0]),
        "repeats": repeats,
        "recorded_top1": record.get("evaluation", {}).get("top1"),
    }
    return AccuracyResult(rows=rows, meta=meta)


def format_accuracy_table(rows: Sequence[AccuracyRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| method | r | prop. attn | top-1 | agreement | tokens out | fastest ms | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        r = "-" if row.r is None else str(row.r)
        prop = "-" if row.prop_attn is None else ("yes" if row.prop_attn else "no")
        lines.append(
            f"| {row.method} | {r} | {prop} | {row.top1:.2%} | {row.agreement:.2%} | {row.tokens}/{row.tokens_in} | "
            f"{row.ms:.1f} | {row.speedup:.2f}x |"
        )
    return "\n".join(lines)
