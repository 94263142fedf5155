"""The helpers every tool shares, written once: devices, synchronisation, seeding, PSNR, progress bars.

`tokenmerge demo`, `tokenmerge bench`, `tokenmerge fidelity`, the zoo's training, the
examples and the benchmark scripts call these, so a device name is accepted or refused
the same way everywhere and a PSNR means the same number in every table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..errors import TokenMergeError, check

__all__ = [
    "DEVICE_NAMES",
    "check_device_name",
    "device_argument",
    "resolve_device",
    "synchronize",
    "seeded",
    "PSNR_PEAK",
    "psnr",
    "progress",
    "NoBar",
]

#: The device names the tools take, as their error messages list them.
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(device: str | torch.device) -> str:
    """``device`` as a string, if it is one of `DEVICE_NAMES` (``torch.device`` objects of those too).

    Only the name is checked, not that the device is present (`resolve_device` does both).
    Raises `TokenMergeError` naming the value otherwise.
    """
    name = str(device)
    if not _DEVICE_PATTERN.fullmatch(name):
        raise TokenMergeError(f"device must be {DEVICE_NAMES}; got {name!r}")
    return name


def device_argument(text: str) -> str:
    """An argparse ``type`` for ``--device``: `check_device_name`, as an argparse error."""
    try:
        return check_device_name(text)
    except TokenMergeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` that ``device`` names, checked to be present on this machine.

    ``"auto"`` is the first GPU when CUDA is available, else the CPU. Otherwise the name
    must be one of `DEVICE_NAMES` (`check_device_name`); ``cuda``/``cuda:N`` need CUDA
    and ``N`` below the GPU count, ``mps`` needs the MPS backend. Raises
    `TokenMergeError` naming the value otherwise.
    """
    name = check_device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    if resolved.type == "cuda":
        check(torch.cuda.is_available(), f"device must be a present device; got {name!r} but CUDA is not available")
        check(
            resolved.index is None or resolved.index < torch.cuda.device_count(),
            f"device must be a present device; got {name!r} with {torch.cuda.device_count()} GPU(s)",
        )
    elif resolved.type == "mps":
        check(
            torch.backends.mps.is_available(), f"device must be a present device; got {name!r} but MPS is not available"
        )
    return resolved


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU; nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def seeded(seed: int, device: str | torch.device | None = None) -> Iterator[None]:
    """Seed torch's global RNGs inside, and leave the caller's as they were afterwards.

    Args:
        seed: the seed.
        device: a CUDA device whose RNG is forked and seeded too; the CPU's only otherwise.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        torch.manual_seed(seed)
        yield


#: The peak of `psnr`: the value range of images in [0, 1].
PSNR_PEAK = 1.0


def psnr(output: Tensor, reference: Tensor) -> float:
    """PSNR in dB of ``output`` against ``reference``, with peak 1 (`PSNR_PEAK`), from the pooled MSE.

    ``10 * log10(1 / MSE)`` with the mean squared error over every element, in float64;
    ``inf`` when the two are identical. The peak is fixed at 1, the range of images in
    [0, 1] (`tokenmerge demo`, `tokenmerge fidelity`); `tokenmerge bench` applies it to
    final latents too, where with unit-variance latents it reads as a signal-to-error
    ratio. A fixed peak makes the figure depend on the error only, never on the
    reference's extremes.

    Args:
        output, reference: tensors of the same shape, e.g. images ``(B, 3, H, W)`` in [0, 1].
    """
    check(
        output.shape == reference.shape,
        f"output must have the reference's shape {tuple(reference.shape)}; got {tuple(output.shape)}",
    )
    return psnr_from_mse(float((output.detach().double() - reference.detach().double()).pow(2).mean()))


def psnr_from_mse(mse: float) -> float:
    """`psnr` of a mean squared error: ``10 * log10(1 / mse)`` dB, ``inf`` for 0 (pooled errors of several sets)."""
    return math.inf if mse == 0.0 else 10.0 * math.log10(PSNR_PEAK * PSNR_PEAK / mse)


class NoBar:
    """A progress bar that shows nothing: what `progress` returns when bars are off."""

    total = 0

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Nothing (tqdm's ``update``)."""

    def set_description(self, text: str) -> None:
        """Nothing (tqdm's ``set_description``)."""

    def set_postfix_str(self, text: str) -> None:
        """Nothing (tqdm's ``set_postfix_str``)."""

    def clear(self) -> None:
        """Nothing (tqdm's ``clear``)."""

    def refresh(self) -> None:
        """Nothing (tqdm's ``refresh``)."""

    def close(self) -> None:
        """Nothing (tqdm's ``close``)."""


def progress(total: int, desc: str = "", enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on stderr, drawn only when stderr is a terminal; a `NoBar` when not ``enabled`` or without tqdm.

    Either one is a context manager that closes the bar, and has ``update``,
    ``set_description``, ``set_postfix_str``, ``clear``, ``refresh``, ``close`` and a
    settable ``total``.
    """
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the bench, diffusers and timm extras
            pass
        else:
            return tqdm(
                total=total,
                desc=desc or None,
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
                disable=None,
            )
    return NoBar()
