"""``tokenmerge demo``: merging on small built-in models, measured against the plain models.

Nothing is downloaded. The diffusion models are the trained reference models shipped in
`tokenmerge.tools.zoo` (a UNet in the Stable Diffusion layout and a DiT, 64x64 px), which
generate a few images per preset; without their weights (or with ``zoo=False``) small
models with seeded random weights stand in. The ViT has random weights. Each preset that
applies to a model is timed against the plain model and its output compared with the
plain output: the PSNR of the generated images for the trained models; for random-weight
models a cosine similarity, which says how much merging perturbs a network, not image
quality. `generated_images_grid` puts the trained models' images side by side, and
`merged_groups_picture` draws the token groups a ViT merges.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from ..api import apply
from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..presets import CAToMe, ToDo, ToMe, ToMeSD
from .bench_timing import time_calls
from .common import progress as progress_bar
from .common import psnr, resolve_device, seeded, synchronize

__all__ = [
    "MODEL_NAMES",
    "PRESET_NAMES",
    "DemoModel",
    "DemoRow",
    "DemoResult",
    "build_model",
    "zoo_weights_ready",
    "ZOO_MODELS",
    "COSINE",
    "PSNR",
    "measure",
    "run_demo",
    "format_table",
    "summarize_tokens",
    "cosine_to_reference",
    "Fidelity",
    "merged_groups_picture",
    "generated_images_grid",
    "visualize_image",
    "ZOO_CLASSES",
    "DEFAULT_STEPS",
    "DEFAULT_REPEATS",
    "STABLE_SPREAD",
    "Speed",
    "interleaved_times",
    "speed_of",
    "cpu_threads_for_load",
    "busy_cores",
    "LABEL_HEIGHT",
    "ZOO_NOTE",
    "VIT_CALLS",
    "TIMED_STEPS",
]

#: Models the demo can build, in the order it runs them.
MODEL_NAMES: tuple[str, ...] = ("unet", "dit", "vit")
#: Presets the demo tries on every model they apply to.
PRESET_NAMES: tuple[str, ...] = ("ToMeSD", "CAToMe", "ToDo", "ToMe")


@dataclass(frozen=True)
class Fidelity:
    """How a demo model's output is compared with the plain model's.

    Attributes:
        heading: the table column's heading.
        meaning: one line saying what is measured.
        measure: ``measure(output, plain_output) -> float``.
        unit: ``"dB"`` or ``""``; decides how values are printed.
    """

    heading: str
    meaning: str
    measure: Callable[[Tensor, Tensor], float]
    unit: str = ""

    def format(self, value: float) -> str:
        """``value`` as the table shows it."""
        return f"{value:.1f} dB" if self.unit == "dB" else f"{value:.4f}"


@dataclass
class DemoModel:
    """A built model, the job that runs it, and the presets that apply to it.

    Attributes:
        key: short name (one of `MODEL_NAMES`).
        title: heading of its table.
        setup: one line saying what runs (architecture, sizes, steps, device).
        target: what `tokenmerge.apply` is given.
        job: runs one generation (or forward) and returns its output tensor.
        configs: preset name -> `MergeConfig`, for the presets that apply.
        fidelity: how its output is compared with the plain output.
        makes_images: whether ``job`` returns images, ``(B, 3, H, W)`` in [0, 1] (the
            trained models), which go into the demo's grid of generated images.
        image_names: what each image of the batch shows (its class), when it makes images.
        timed: the run that is timed, when cheaper than ``job`` (one image of the batch,
            the same steps); None times ``job`` itself.
        timed_what: what one timed run is, for the output (``"one 8-step generation of
            1 image"``).
        short: the model's short name on pictures (``"UNet"``).
        note: what to expect of the model's output, printed under its table.
        rounds: timing rounds per demo round (`run_demo`'s ``repeats``): more for a model
            whose timed run is short, so that its figure is as steady as the others'.
    """

    key: str
    title: str
    setup: str
    target: Any
    job: Callable[[], Tensor]
    configs: dict[str, MergeConfig]
    fidelity: Fidelity = field(default_factory=lambda: COSINE)
    makes_images: bool = False
    image_names: tuple[str, ...] = ()
    timed: Callable[[], Tensor] | None = None
    timed_what: str = "one run"
    short: str = ""
    note: str = ""
    rounds: int = 1


@dataclass
class DemoRow:
    """One line of a demo table.

    Attributes:
        preset: the preset's name, or ``"plain"``.
        tokens: tokens per merged layer, ``"in→out"`` (see `summarize_tokens`).
        seconds: median time of one timed run (`DemoModel.timed`) over the rounds.
        speedup: median over the rounds of plain time / this time, both timed in the same
            round (1.0 for the plain row); None when the rounds disagree by more than
            `STABLE_SPREAD` (the figure would not repeat on this machine).
        fidelity: the model's fidelity measure (`DemoModel.fidelity`) of the output against
            the plain output: a cosine similarity (1.0 is identical) for random-weight
            models, a PSNR in dB (inf is identical) for trained ones.
        plans: ``"computed/reused"`` merge plans in the last job (reset before each job).
        images: the last job's images when the model makes images (`DemoModel.makes_images`),
            ``(B, 3, H, W)`` in [0, 1] on the CPU; else None.
        spread: how far the rounds' speed-ups spread, ``(high - low) / median`` of the
            middle rounds (0 for the plain row).
    """

    preset: str
    tokens: str
    seconds: float
    speedup: float | None
    fidelity: float
    plans: str = ""
    images: Tensor | None = field(default=None, repr=False)
    spread: float = 0.0


@dataclass
class DemoResult:
    """The table of one model."""

    model: DemoModel
    rows: list[DemoRow] = field(default_factory=list)


# ---------------------------------------------------------------------- timing
def measure(
    job: Callable[[], Tensor],
    device: torch.device,
    repeats: int = 1,
    before: Callable[[], object] | None = None,
    warmup: Callable[[], object] | None = None,
) -> tuple[float, Tensor]:
    """Best wall time of ``repeats`` runs of ``job`` after one warm-up, and its last output.

    ``before`` (untimed) runs before every timed run, e.g. a merge handle's ``reset``;
    ``warmup`` is the warm-up run (``job`` itself when None; a one-step generation is
    enough to build every layer's kernels, buffers and partition tables).
    """
    with torch.inference_mode():
        (warmup or job)()
        times = []
        for _ in range(repeats):
            if before is not None:
                before()
            synchronize(device)
            start = time.perf_counter()
            output = job()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return min(times), output  # the best run: the least disturbed by whatever else the machine does


#: Largest spread of the rounds' speed-ups, ``(high - low) / median`` of the middle rounds,
#: for a speed-up to be printed: a wider spread means the figure would not repeat.
STABLE_SPREAD = 0.15


@dataclass(frozen=True)
class Speed:
    """A preset's speed against the plain model, from interleaved rounds (`speed_of`).

    Attributes:
        seconds: median time of one of its runs.
        speedup: median over the rounds of plain / preset time, or None when not stable.
        spread: ``(high - low) / median`` of the middle rounds' speed-ups.
    """

    seconds: float
    speedup: float | None
    spread: float


def interleaved_times(
    runs: Sequence[tuple[Callable[[], object], Callable[[], object], Callable[[], object]]],
    device: torch.device,
    rounds: int,
) -> list[list[float]]:
    """Seconds of each run in each round: ``times[run][round]``.

    Each of ``runs`` is ``(enter, call, leave)``: ``enter`` and ``leave`` run untimed
    around the timed ``call`` (applying and removing a merge config). Every round runs
    each call once, one after the other, so whatever else the machine does at that
    moment slows plain and merged runs alike; ratios are taken within a round. Times
    come from `tokenmerge.tools.bench_timing.time_calls` (CUDA events on a GPU).
    """
    times: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for _ in range(rounds):
            for index, (enter, call, leave) in enumerate(runs):
                enter()
                try:
                    timing = time_calls(_Indexed(call), [0], device)
                finally:
                    leave()
                times[index].append(timing.times_ms[0] / 1000.0)
    return times


class _Indexed:
    """``call`` as `time_calls` calls it, with the (unused) index of the call."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call

    def __call__(self, _index: int) -> object:
        return self.call()


def speed_of(plain: Sequence[float], times: Sequence[float], spread_limit: float = STABLE_SPREAD) -> Speed:
    """The speed of runs timed in the same rounds as ``plain`` (see `interleaved_times`).

    The speed-up is the median of the rounds' ``plain / time``. With five rounds or more
    the fastest and slowest fifth of the rounds (at least one each) are left out of the
    spread (one disturbed round does not hide a figure); the speed-up is None when the
    rest spread by more than ``spread_limit`` of the median.
    """
    ratios = sorted(p / s for p, s in zip(plain, times))
    cut = max(1, len(ratios) // 5) if len(ratios) >= 5 else 0
    middle = ratios[cut : len(ratios) - cut]
    median = statistics.median(ratios)
    spread = (middle[-1] - middle[0]) / median if median > 0 else math.inf
    return Speed(statistics.median(times), median if spread <= spread_limit else None, spread)


def _cpu_ticks() -> tuple[int, int] | None:
    """``(idle, total)`` CPU ticks of the whole machine from ``/proc/stat``, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)) if len(fields) >= 4 else None


def busy_cores(window_s: float = 0.3) -> float | None:
    """How many cores other processes keep busy now, sampled over ``window_s`` while this one sleeps.

    Read from ``/proc/stat`` (Linux); the 1-minute load average elsewhere; None where neither exists.
    """
    first = _cpu_ticks()
    if first is not None:
        time.sleep(window_s)
        second = _cpu_ticks()
        if second is not None and second[1] > first[1]:
            idle = (second[0] - first[0]) / (second[1] - first[1])
            return (1.0 - idle) * (os.cpu_count() or 1)
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_threads_for_load(device: torch.device) -> tuple[int, float | None]:
    """Threads to time with on a CPU: the cores that other processes leave free.

    When other processes keep cores busy, threads that wait for each other at every
    operator run many times slower than fewer threads. Returns ``(threads, busy)``:
    torch's thread count lowered to the free cores (at least 1), and the cores found
    busy (`busy_cores`; None on a GPU or where the system does not say).
    """
    current = torch.get_num_threads()
    if device.type != "cpu":
        return current, None
    busy = busy_cores()
    if busy is None:
        return current, None
    cores = os.cpu_count() or current
    free = max(1, int(cores - busy + 0.5))
    return min(current, free), busy


def cosine_to_reference(output: Tensor, reference: Tensor) -> float:
    """Mean over the batch of the cosine similarity of flattened outputs (1.0: same direction)."""
    a = output.detach().double().flatten(1)  # (B, D)
    b = reference.detach().double().flatten(1)  # (B, D)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


#: The random-weight models' measure: how much merging perturbs the network.
COSINE = Fidelity(
    "cosine to plain", "cosine similarity of the outputs to the plain outputs (1.0: unchanged)", cosine_to_reference
)
#: The trained models' measure: how far the final images move.
PSNR = Fidelity("PSNR vs plain", "PSNR of the final images against the plain model's (inf: unchanged)", psnr, "dB")


def summarize_tokens(merged: dict[str, tuple[int, int]]) -> str:
    """Tokens per merged layer in a short form.

    Consecutive layers that merge the residual stream are chained (``65→57→49``); layers
    that merge to the same count are grouped (``1024→512 ×4``); adaptive counts that differ
    between layers of one size show their range (``1024→620..790 ×4``).
    """
    if not merged:
        return "nothing merged"
    pairs = list(merged.values())
    chained = all(pairs[i][1] == pairs[i + 1][0] for i in range(len(pairs) - 1)) and len(pairs) > 1
    if chained and len({n for n, _ in pairs}) == len(pairs):
        return "→".join([str(pairs[0][0]), *(str(out) for _, out in pairs)])
    groups: dict[int, list[int]] = {}
    for num_in, num_out in pairs:
        groups.setdefault(num_in, []).append(num_out)
    parts = []
    for num_in, outs in groups.items():
        low, high = min(outs), max(outs)
        out = str(low) if low == high else f"{low}..{high}"
        parts.append(f"{num_in}→{out}" + (f" ×{len(outs)}" if len(outs) > 1 else ""))
    return ", ".join(parts)


# ---------------------------------------------------------------------- models
def _denoise_job(call: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int) -> Callable[[], Tensor]:
    """A DDIM sampling loop of ``steps`` steps calling ``call(latents, timestep)`` -> noise prediction.

    The job returns every step's noise prediction, ``(B, steps * C, H, W)``: what merging
    changes in the network, step by step (the final latents are mostly the initial noise
    for a random-weight model, so they would hide it).
    """
    from diffusers import DDIMScheduler

    # Stable Diffusion's DDIM settings, without clipping.
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )

    def job() -> Tensor:
        scheduler.set_timesteps(steps)
        latents = noise.clone()  # (B, C, H, W)
        predictions = []
        for t in scheduler.timesteps:
            timestep = t.to(noise.device).expand(noise.shape[0])  # (B,)
            eps = call(latents, timestep)[:, : noise.shape[1]]  # (B, C, H, W); DiT also predicts variance
            predictions.append(eps)
            latents = scheduler.step(eps, t, latents).prev_sample
        return torch.cat(predictions, dim=1)  # (B, steps * C, H, W)

    return job


def _diffusion_configs(seed: int) -> dict[str, MergeConfig]:
    """The presets every diffusion demo model runs: ToMeSD, CA-ToMe and ToDo at their usual settings."""
    return {
        "ToMeSD": ToMeSD(ratio=0.5, seed=seed),
        "CAToMe": CAToMe(threshold=0.7, seed=seed),
        "ToDo": ToDo(downsample=2, seed=seed),
    }


def _build_unet(device: torch.device, seed: int, steps: int) -> DemoModel:
    from .tiny import TEXT_DIM, tiny_sd_unet

    size = 32  # latent side: 1024 tokens in the top-level attention
    # The library's initialisation (a random-weight model that computes something), 2 levels.
    unet = tiny_sd_unet(
        seed,
        size,
        init="default",
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with seeded(seed + 1):
        noise = torch.randn(1, 4, size, size)  # (B, C, H, W)
        text = torch.randn(1, 8, TEXT_DIM)  # (B, L, D) stands in for a prompt's embedding
    unet = unet.to(device).eval()
    noise, text = noise.to(device), text.to(device)
    job = _denoise_job(lambda x, t: unet(x, t, encoder_hidden_states=text).sample, noise, steps)
    return DemoModel(
        key="unet",
        title="UNet (Stable Diffusion layout)",
        setup=(
            f"diffusers UNet2DConditionModel, random weights, 2 levels (32, 64 channels), {size}x{size} latent "
            f"({size * size} tokens at the top level), batch 1, {steps} DDIM steps, {device.type}"
        ),
        target=unet,
        job=job,
        configs=_diffusion_configs(seed),
        timed_what=f"one {steps}-step generation",
        short="UNet",
    )


def _build_dit(device: torch.device, seed: int, steps: int) -> DemoModel:
    from .tiny import tiny_dit

    size, patch = 32, 2  # 16 x 16 = 256 tokens
    dit = tiny_dit(seed, size, 4, init="default", num_attention_heads=4, attention_head_dim=16, patch_size=patch)
    with seeded(seed + 1):
        noise = torch.randn(1, 4, size, size)  # (B, C, H, W)
    dit = dit.to(device).eval()
    noise = noise.to(device)
    label = torch.zeros(1, dtype=torch.long, device=device)  # (B,) class 0
    job = _denoise_job(lambda x, t: dit(x, timestep=t, class_labels=label).sample, noise, steps)
    tokens = (size // patch) ** 2
    return DemoModel(
        key="dit",
        title="DiT (class-conditional transformer)",
        setup=(
            f"diffusers DiTTransformer2DModel, random weights, 4 blocks, 64 wide, {size}x{size} latent, patch {patch} "
            f"({tokens} tokens), batch 1, {steps} DDIM steps, {device.type}"
        ),
        target=dit,
        job=job,
        configs=_diffusion_configs(seed),
        timed_what=f"one {steps}-step generation",
        short="DiT",
    )


def _build_vit(device: torch.device, seed: int, steps: int) -> DemoModel:
    import timm

    size, depth = 128, 6  # 8 x 8 patches + class token
    with seeded(seed):
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, depth=depth)
        images = torch.randn(4, 3, size, size)  # (B, 3, H, W)
    vit = vit.to(device).eval()
    images = images.to(device)
    tokens = (size // 16) ** 2 + 1
    return DemoModel(
        key="vit",
        title="ViT (timm)",
        setup=(
            f"timm vit_tiny_patch16 (192 wide), random weights, {depth} blocks, {size}x{size} px ({tokens} tokens), "
            f"batch 4, {device.type}"
        ),
        target=vit,
        job=lambda: vit(images),
        configs={"ToMe": ToMe(r=8, seed=seed)},
        timed=_Repeat(lambda: vit(images), VIT_CALLS),
        timed_what=f"{VIT_CALLS} forwards of 4 images",
        short="ViT",
        rounds=3,
    )


#: Forwards of the ViT in one timed run: one forward is too short to time on its own.
VIT_CALLS = 8


class _Repeat:
    """Call ``call`` ``times`` times; return the last result."""

    def __init__(self, call: Callable[[], Tensor], times: int) -> None:
        self.call, self.times = call, times

    def __call__(self) -> Tensor:
        for _ in range(self.times - 1):
            self.call()
        return self.call()


#: The demo model each trained `tokenmerge.tools.zoo` model stands in for, and the devices it runs on in the demo.
ZOO_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("unet-photos", ("cuda", "cpu")),
    "dit": ("dit-photos", ("cuda", "cpu")),
}
#: Classes the trained models generate in the demo, one image each (a batch of 4).
ZOO_CLASSES: tuple[str, ...] = ("astronaut", "coffee", "grass", "rocket")
#: Denoising steps of one demo generation: random-weight models, trained models.
DEFAULT_STEPS: dict[bool, int] = {False: 4, True: 8}
#: Timing rounds (each times the plain model and every preset once), on a CPU (the demo
#: stays under a minute on two cores), on a GPU.
DEFAULT_REPEATS: dict[bool, int] = {False: 5, True: 10}
#: Denoising steps of the trained models' timed run (one image): the timing rounds stay short.
TIMED_STEPS = 4
#: What to expect of the trained models' images, printed with them.
ZOO_NOTE = (
    "the trained models are small (2-3 M parameters, 64x64 px, trained briefly on crops of a few photographs): "
    "their images show a class's colours and textures, not a recognisable object; compare each row with the "
    "plain row above it, not with the label"
)


def zoo_weights_ready(name: str, weights_dir: Path | str | None = None) -> bool:
    """Whether `tokenmerge.tools.zoo` is installed and has the trained weights of ``name``."""
    import importlib.util

    if importlib.util.find_spec("tokenmerge.tools.zoo") is None:
        return False
    from . import zoo

    try:
        zoo.info(name, weights_dir)
    except TokenMergeError:
        return False
    return True


def _build_zoo(key: str, name: str, device: torch.device, seed: int, steps: int, weights_dir: Any) -> DemoModel:
    from diffusers.utils import logging as diffusers_logging

    from . import zoo

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # loading notes about dtypes are not for the demo's reader
    try:
        pipe = zoo.load(name, device=device, weights_dir=weights_dir)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    spec = zoo.info(name, weights_dir)["spec"]
    target = pipe.unet if spec["kind"] == "unet" else pipe.transformer
    size = int(spec["denoiser"]["sample_size"])
    patch = int(spec["denoiser"].get("patch_size") or 1)
    labels = [c for c in ZOO_CLASSES if c in pipe.class_names] or [0]

    def generate(num_steps: int, batch: Sequence[Any] = labels) -> Tensor:
        generator = torch.Generator(device).manual_seed(seed)
        images = pipe(
            list(batch), num_inference_steps=num_steps, guidance_scale=1.0, generator=generator, output_type="pt"
        )
        return images.images  # (B, 3, H, W) in [0, 1]

    tokens = (size // patch) ** 2
    classes = ", ".join(str(label) for label in labels)
    return DemoModel(
        key=key,
        title=f"{'UNet' if key == 'unet' else 'DiT'}: tokenmerge.tools.zoo {name!r} (trained)",
        setup=(
            f"{type(target).__name__} trained by tokenmerge on photographs, {size}x{size} px in pixel space "
            f"({tokens} tokens{' at the top level' if key == 'unet' else ''}), batch {len(labels)} ({classes}), "
            f"{steps} DDIM steps, no guidance, {device.type}"
        ),
        target=pipe,
        job=lambda: generate(steps),
        configs=_diffusion_configs(seed),
        fidelity=PSNR,
        makes_images=True,
        image_names=tuple(str(label) for label in labels),
        timed=lambda: generate(min(steps, TIMED_STEPS), labels[:1]),
        timed_what=f"one {min(steps, TIMED_STEPS)}-step generation of 1 image",
        short="UNet" if key == "unet" else "DiT",
        note=ZOO_NOTE,
    )


_BUILDERS: dict[str, Callable[[torch.device, int, int], DemoModel]] = {
    "unet": _build_unet,
    "dit": _build_dit,
    "vit": _build_vit,
}


def build_model(
    name: str,
    device: torch.device | str = "cpu",
    seed: int = 0,
    steps: int | None = None,
    *,
    zoo: bool = True,
    weights_dir: Path | str | None = None,
) -> DemoModel:
    """Build one of the demo's models (see `MODEL_NAMES`).

    The trained `tokenmerge.tools.zoo` model when its weights are installed and it suits the
    device (`ZOO_MODELS`), else a small model with seeded random weights.

    Args:
        name: ``"unet"``, ``"dit"`` or ``"vit"``.
        device: where the model runs.
        seed: seed of weights, inputs and merging.
        steps: denoising steps of one job (diffusion models); `DEFAULT_STEPS` when None.
        zoo: use the trained models where possible; False always builds random-weight ones.
        weights_dir: where the zoo's weights are (the shipped ones by default).
    """
    check(name in _BUILDERS, f"model must be one of {', '.join(MODEL_NAMES)}; got {name!r}")
    check(steps is None or (isinstance(steps, int) and steps >= 1), f"steps must be an int >= 1; got {steps!r}")
    device = resolve_device(device)
    if zoo and name in ZOO_MODELS:
        zoo_name, devices = ZOO_MODELS[name]
        if device.type in devices and zoo_weights_ready(zoo_name, weights_dir):
            return _build_zoo(name, zoo_name, device, seed, steps or DEFAULT_STEPS[True], weights_dir)
    return _BUILDERS[name](device, seed, steps or DEFAULT_STEPS[False])


# ---------------------------------------------------------------------- running
class _Applied:
    """``enter``/``leave`` of one timed run: apply ``config`` to ``target``, then remove it."""

    def __init__(self, target: Any, config: MergeConfig | None) -> None:
        self.target, self.config, self.handle = target, config, None

    def enter(self) -> None:
        """Apply the config (nothing for the plain model)."""
        if self.config is not None:
            self.handle = apply(self.target, self.config)

    def leave(self) -> None:
        """Remove it again."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def run_model(model: DemoModel, presets: Sequence[str], device: torch.device, rounds: int, bar: Any) -> DemoResult:
    """Run the plain model and each applicable preset once for their outputs, then time them in rounds.

    Outputs (and the tokens, plans and images) come from one `DemoModel.job` per config,
    which also warms up every layer; the times from ``rounds`` interleaved rounds of
    `DemoModel.timed` (`interleaved_times`, `speed_of`). One `DemoRow` each, plain first.
    """
    result = DemoResult(model)
    configs = [(name, model.configs[name]) for name in presets if name in model.configs]
    bar.set_postfix_str(f"{model.key} plain")
    with torch.inference_mode():
        reference = model.job()
    bar.update()
    outputs: list[tuple[str, str, str, Tensor]] = []
    for name, config in configs:
        bar.set_postfix_str(f"{model.key} {name}")
        handle = apply(model.target, config)
        try:
            with torch.inference_mode():
                output = model.job()
            state = handle.state
            outputs.append(
                (name, summarize_tokens(state.merged_tokens), f"{state.plans_computed}/{state.plans_reused}", output)
            )
        finally:
            handle.remove()
        bar.update()
    bar.set_postfix_str(f"{model.key} timing")
    timed = model.timed or model.job
    runs = [_Applied(model.target, config) for config in [None, *(c for _, c in configs)]]
    times = interleaved_times([(run.enter, timed, run.leave) for run in runs], device, rounds * model.rounds)
    bar.update()
    plain = times[0]
    result.rows.append(
        DemoRow(
            "plain",
            "-",
            statistics.median(plain),
            1.0,
            model.fidelity.measure(reference, reference),
            "",
            _images_of(model, reference),
        )
    )
    for (name, tokens, plans, output), preset_times in zip(outputs, times[1:]):
        speed = speed_of(plain, preset_times)
        fidelity = model.fidelity.measure(output, reference)
        result.rows.append(
            DemoRow(
                name,
                tokens,
                speed.seconds,
                speed.speedup,
                fidelity,
                plans,
                spread=speed.spread,
                images=_images_of(model, output),
            )
        )
    return result


def _images_of(model: DemoModel, output: Tensor) -> Tensor | None:
    return output.detach().float().clamp(0, 1).cpu() if model.makes_images else None  # (B, 3, H, W)


def _speedup_text(row: DemoRow) -> str:
    return "not stable*" if row.speedup is None else f"{row.speedup:.2f}x"


def format_table(result: DemoResult) -> str:
    """The table of one model as aligned text; a speed-up that is not stable reads ``not stable*``."""
    fidelity = result.model.fidelity
    header = ("preset", "tokens per merged layer", "time", "vs plain", fidelity.heading, "plans new/reused")
    lines = [
        (
            row.preset,
            row.tokens,
            f"{row.seconds * 1000:.0f} ms",
            _speedup_text(row),
            fidelity.format(row.fidelity),
            row.plans or "-",
        )
        for row in result.rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]

    def fmt(cells: Iterable[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


# ---------------------------------------------------------------------- pictures
#: ToMe's r per block for the panels of the demo picture (a 12-block ViT at 224 px: 196 patches).
PICTURE_RS: tuple[int, ...] = (8, 12)


#: Height in pixels of the label strip above the merge picture's panels.
LABEL_HEIGHT = 28


def merged_groups_picture(
    pixels: Any = None,
    rs: Sequence[int] = PICTURE_RS,
    *,
    model: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    scale: int = 2,
    labels: bool = True,
) -> Any:
    """The input beside the token groups ToMe merges at each ``r``, labelled, as one ``(H', W', 3)`` uint8 image.

    Args:
        pixels: ``(H, W, 3)`` uint8 of any size (the model sees it resized to its input;
            the groups are drawn at this size); the sample photo shipped with tokenmerge by default.
        rs: ToMe's r (tokens merged per block) of each panel.
        model: a timm ViT; the trained reference ViT (`tokenmerge.tools.vis.reference_vit`) by default.
        device: where the model runs.
        scale: nearest-neighbour enlargement of the result.
        labels: a strip of `LABEL_HEIGHT` pixels on top naming each panel: the input's
            size and patch count, then the model, r and the patch tokens entering the
            first block and leaving the last (``196 -> 100 tokens``).
    """
    import numpy as np

    from .vis import load_sample_image, merged_groups_with_record, reference_vit

    resolved = resolve_device(device)
    if pixels is None:
        pixels = load_sample_image(224)
    if model is None:
        model = reference_vit(resolved)
    drawn = []  # (picture, patch tokens entering the first block, leaving the last) per r
    for r in rs:
        picture, record = merged_groups_with_record(model, pixels, r, device=resolved)
        drawn.append((picture, record.num_input - record.num_prefix, record.num_tokens - record.num_prefix))
    panels = [pixels, *(picture for picture, _, _ in drawn)]
    gap = np.full((pixels.shape[0], 6, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)  # (H, W', 3)
    row = row.repeat(scale, axis=0).repeat(scale, axis=1)
    if not labels:
        return row
    from PIL import Image, ImageDraw

    height, width = pixels.shape[:2]
    patches = drawn[0][1] if drawn else None
    name = _model_name(model)
    texts = [f"input, {width}x{height} px" + (f": {patches} patches" if patches else "")]
    texts += [f"{name} ToMe r={r}: {n_in} -> {n_out} tokens" for r, (_, n_in, n_out) in zip(rs, drawn)]
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(row), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for index, text in enumerate(texts):
        draw.text((index * (width + 6) * scale + 2, LABEL_HEIGHT // 2 - 6), text, fill=(0, 0, 0))
    return np.asarray(canvas).copy()


def _model_name(model: torch.nn.Module) -> str:
    """A timm model's architecture name (``vit_tiny_patch16_224``), or its class name."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return str(config.get("architecture") or type(model).__name__)


def generated_images_grid(results: Sequence[DemoResult], scale: int = 2) -> Any:
    """The images each preset generated beside the plain model's, as one ``(H, W, 3)`` uint8 image.

    One block per model that makes images (the trained ones): its title and what to
    expect of such small models on top, a row per preset (plain first), one column per
    class label. On the left of each row: model, preset, speed-up against plain (when
    stable) and PSNR; under each image: model, preset and that image's PSNR against the
    plain image above it. Same seed, same initial noise in every row, so the rows differ
    only by merging.

    Args:
        results: `run_demo`'s results; models without images are left out.
        scale: nearest-neighbour enlargement of the generated images.

    Returns:
        The grid, or None when no model made images.
    """
    blocks = [r for r in results if r.rows and r.rows[0].images is not None]
    if not blocks:
        return None
    import numpy as np
    from PIL import Image, ImageDraw

    label_width, line, gap = 190, 12, 4
    side = max(int(r.rows[0].images.shape[-1]) for r in blocks) * scale  # type: ignore[union-attr]
    columns = max(int(r.rows[0].images.shape[0]) for r in blocks)  # type: ignore[union-attr]
    width = label_width + columns * (side + gap) + gap
    heights = [4 * line + len(r.rows) * (side + line + gap) + 2 * gap for r in blocks]
    canvas = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = 0
    for result, height in zip(blocks, heights):
        model = result.model
        short = model.short or model.key
        draw.text((gap, top + 2), model.title, fill=(0, 0, 0))
        draw.text((gap, top + line + 2), _wrap(model.note or "", width // 6)[0], fill=(90, 90, 90))
        draw.text((gap, top + 2 * line + 2), "".join(_wrap(model.note or "", width // 6)[1:2]), fill=(90, 90, 90))
        for column, name in enumerate(model.image_names):
            draw.text((label_width + column * (side + gap), top + 3 * line + 2), f"label: {name}", fill=(90, 90, 90))
        plain = result.rows[0].images
        for index, row in enumerate(result.rows):
            y = top + 4 * line + gap + index * (side + line + gap)
            fidelity = model.fidelity.format(row.fidelity)
            if row.preset == "plain":
                text = f"{short}, plain\n(no merging: the reference)"
            else:
                speed = "speed-up not stable" if row.speedup is None else f"{row.speedup:.2f}x vs plain"
                text = f"{short}, {row.preset}\n{speed}\nPSNR {fidelity} vs plain"
            draw.multiline_text((gap, y + side // 2 - line), text, fill=(0, 0, 0))
            assert row.images is not None and plain is not None
            pixels = (row.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, h, w, 3)
            for column, picture in enumerate(pixels):
                x = label_width + column * (side + gap)
                tile = Image.fromarray(picture).resize((side, side), Image.Resampling.NEAREST)
                canvas.paste(tile, (x, y))
                own = model.fidelity.format(
                    model.fidelity.measure(row.images[column : column + 1], plain[column : column + 1])
                )
                caption = f"{short} plain" if row.preset == "plain" else f"{short} {row.preset} {own}"
                draw.text((x, y + side + 1), caption, fill=(60, 60, 60))
        top += height
    return np.asarray(canvas).copy()


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def visualize_image(
    image: Path | str,
    out: Path | str,
    r: int | None = None,
    *,
    arch: str | None = None,
    checkpoint: Path | str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> Path:
    """Draw the token groups a ViT merges over ``image`` and write them to ``out`` (PNG).

    Args:
        image: an image file Pillow can read; the model sees it at its input size, the groups
            are drawn at that size enlarged to at least 224 px.
        out: the PNG to write (the input beside its groups).
        r: tokens merged per block; by default both of `PICTURE_RS`.
        arch: a timm architecture name (seeded random weights, or ``checkpoint``); None: the
            trained reference ViT (`tokenmerge.tools.vis.reference_vit`), or
            ``vit_tiny_patch16_224`` when a ``checkpoint`` is given.
        checkpoint: a local state dict for ``arch``; seeded random weights when None.
        seed: seed of the random weights.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...

    Returns:
        The path written.
    """
    import numpy as np
    import timm
    from PIL import Image, UnidentifiedImageError

    from .vis import reference_vit, save_png

    resolved = resolve_device(device)
    if arch is None and checkpoint is None:
        model = reference_vit(resolved)
    else:
        arch = arch or "vit_tiny_patch16_224"
        try:
            with seeded(seed):
                model = timm.create_model(arch, pretrained=False, checkpoint_path=str(checkpoint) if checkpoint else "")
        except RuntimeError as error:  # timm's unknown model name, or a state dict of another architecture
            raise TokenMergeError(f"arch/checkpoint must be a timm ViT and its weights: {error}") from None
        check(
            isinstance(getattr(model, "patch_embed", None), torch.nn.Module),
            f"arch must be a timm Vision Transformer (vit_*, deit_*, ...); got {arch!r}",
        )
    model = model.to(resolved).eval()
    height, width = getattr(model.patch_embed, "img_size", (224, 224))
    enlarge = max(1, -(-224 // max(height, width)))  # draw small models' groups at 224 px or more
    height, width = height * enlarge, width * enlarge
    try:
        with Image.open(image) as opened:
            picture = opened.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    except (OSError, UnidentifiedImageError) as error:
        raise TokenMergeError(f"IMAGE must be an image file Pillow can read; got {str(image)!r} ({error})") from None
    pixels = np.asarray(picture).copy()  # (H, W, 3) uint8
    rs = PICTURE_RS if r is None else (r,)
    return save_png(out, merged_groups_picture(pixels, rs, model=model, device=resolved))


def _run_models(
    models: Sequence[str],
    presets: Sequence[str],
    device: torch.device,
    steps: int | None,
    repeats: int,
    seed: int,
    progress: bool,
    stream: TextIO,
    zoo: bool,
    weights_dir: Path | str | None,
) -> list[DemoResult]:
    """Build each model, run and time it (`run_model`), and print its table as soon as it is done."""
    results, built = [], []
    with progress_bar(len(models), "building models", progress, unit="model") as bar:
        for name in models:
            bar.set_postfix_str(name)
            built.append(build_model(name, device, seed, steps, zoo=zoo, weights_dir=weights_dir))
            bar.update()
    total = sum(2 + sum(p in m.configs for p in presets) for m in built)
    print(f"tokenmerge demo on {_device_name(device)} (torch {torch.__version__})", file=stream, flush=True)
    with progress_bar(total, "running", progress, unit="step") as bar:
        for model in built:
            result = run_model(model, presets, device, repeats, bar)
            results.append(result)
            bar.clear()  # the table goes where the bar was; the bar is drawn again below it
            note = f"\n{model.note}" if model.note else ""
            print(
                f"\n{model.title}\n{model.setup}\ntimed: {model.timed_what}\nfidelity: {model.fidelity.meaning}"
                f"\n{format_table(result)}{note}",
                file=stream,
                flush=True,
            )
            bar.refresh()
    return results


def run_demo(
    models: Sequence[str] = MODEL_NAMES,
    presets: Sequence[str] = PRESET_NAMES,
    device: str = "auto",
    steps: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    out: Path | str | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    zoo: bool = True,
    weights_dir: Path | str | None = None,
    grid: Path | str | None = None,
) -> list[DemoResult]:
    """Run the demo: build each model, time every applicable preset against it, print the tables.

    Args:
        models: which of `MODEL_NAMES` to run.
        presets: which of `PRESET_NAMES` to try (each only where it applies).
        device: ``"auto"`` (GPU when present), ``"cpu"``, ``"cuda"``, ...
        steps: denoising steps per generation (`DEFAULT_STEPS` when None: 8 for the
            trained models, 4 for random-weight ones).
        repeats: timing rounds, each timing the plain model and every preset once
            (`interleaved_times`); `DEFAULT_REPEATS` of the device when None (5 on a CPU,
            10 on a GPU). Times are medians; a speed-up is printed only when the rounds
            agree (`speed_of`, `STABLE_SPREAD`).
        seed: seed of weights, inputs and merging.
        out: where to write the picture of merged tokens; None writes none.
        progress: show a progress bar on stderr.
        stream: where the tables go (stdout by default).
        zoo: use the trained `tokenmerge.tools.zoo` models where their weights are installed.
        weights_dir: where the zoo's weights are (the shipped ones by default).
        grid: where to write the images the trained models generated with and without
            each preset, side by side (`generated_images_grid`); None writes none, and
            none is written when no trained model ran.

    Returns:
        One `DemoResult` per model.
    """
    stream = stream if stream is not None else sys.stdout
    for name in models:
        check(name in MODEL_NAMES, f"models must be among {', '.join(MODEL_NAMES)}; got {name!r}")
    for name in presets:
        check(name in PRESET_NAMES, f"presets must be among {', '.join(PRESET_NAMES)}; got {name!r}")
    check(
        repeats is None or (isinstance(repeats, int) and repeats >= 1), f"repeats must be an int >= 1; got {repeats!r}"
    )
    resolved = resolve_device(device)
    repeats = repeats or DEFAULT_REPEATS[resolved.type == "cuda"]
    threads_before = torch.get_num_threads()
    threads, busy = cpu_threads_for_load(resolved)
    torch.set_num_threads(threads)
    try:
        results = _run_models(models, presets, resolved, steps, repeats, seed, progress, stream, zoo, weights_dir)
    finally:
        torch.set_num_threads(threads_before)
    unstable = [
        f"{r.model.short or r.model.key} {row.preset} ({row.spread:.0%})"
        for r in results
        for row in r.rows
        if row.speedup is None
    ]
    timed = "; ".join(
        f"{r.model.short or r.model.key}: {repeats * r.model.rounds} rounds of {r.model.timed_what}" for r in results
    )
    print(
        "\ntime: the median of a preset's timed runs; each round times the plain model and every preset once, one "
        f"after the other, and a speed-up is the median of the rounds' plain/preset ratios ({timed}).",
        file=stream,
    )
    if busy is not None and threads < threads_before:
        print(
            f"other processes kept {busy:.1f} of {os.cpu_count()} cores busy when the demo started: it timed with "
            f"{threads} thread{'s' if threads != 1 else ''} instead of {threads_before}.",
            file=stream,
        )
    if unstable:
        print(
            f"* not stable: the rounds' speed-ups spread by more than {STABLE_SPREAD:.0%} ({', '.join(unstable)}): "
            "other work on this machine moved the times, so the figure is left out rather than printed wrong. "
            "Run the demo again on an idle machine, or with more --repeats.",
            file=stream,
        )
    print(
        "Small models on a CPU are not where merging pays off: see 'Where merging pays off' in the docs.",
        file=stream,
    )
    from .vis import save_png

    picture = generated_images_grid(results) if grid is not None else None
    if picture is not None:
        written = save_png(grid, picture).resolve()  # type: ignore[arg-type]
        print(
            f"\nwrote {written}: the images the trained models generated without merging (top row) and with "
            "each preset (same seed and noise; time against plain and PSNR on the left)",
            file=stream,
        )
    if out is not None:
        with progress_bar(1, "drawing merged tokens", progress) as bar:
            written = save_png(out, merged_groups_picture(device=resolved)).resolve()
            bar.update()
        rs = " and ".join(str(r) for r in PICTURE_RS)
        print(
            f"\nwrote {written}: the sample photo beside the token groups ToMe merges in the trained reference "
            f"ViT with r={rs} tokens per block (each group filled with its mean colour; each panel names r and "
            "the patch tokens entering the first block and leaving the last)",
            file=stream,
        )
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"
