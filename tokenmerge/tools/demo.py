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
        warmup: a cheaper run through every layer (a one-step generation), the warm-up
            before timing; None warms up with ``job`` itself.
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
    warmup: Callable[[], Tensor] | None = None


@dataclass
class DemoRow:
    """One line of a demo table.

    Attributes:
        preset: the preset's name, or ``"plain"``.
        tokens: tokens per merged layer, ``"in→out"`` (see `summarize_tokens`).
        seconds: best (shortest) time of one job over the timed runs.
        speedup: plain time / this time (1.0 for the plain row).
        fidelity: the model's fidelity measure (`DemoModel.fidelity`) of the output against
            the plain output: a cosine similarity (1.0 is identical) for random-weight
            models, a PSNR in dB (inf is identical) for trained ones.
        plans: ``"computed/reused"`` merge plans in the last job (reset before each job).
        images: the last job's images when the model makes images (`DemoModel.makes_images`),
            ``(B, 3, H, W)`` in [0, 1] on the CPU; else None.
    """

    preset: str
    tokens: str
    seconds: float
    speedup: float
    fidelity: float
    plans: str = ""
    images: Tensor | None = field(default=None, repr=False)


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
    )


#: The demo model each trained `tokenmerge.tools.zoo` model stands in for, and the devices it runs on in the demo.
ZOO_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("unet-photos", ("cuda", "cpu")),
    "dit": ("dit-photos", ("cuda", "cpu")),
}
#: Classes the trained models generate in the demo, one image each (a batch of 4).
ZOO_CLASSES: tuple[str, ...] = ("astronaut", "coffee", "grass", "rocket")
#: Denoising steps of one demo generation: random-weight models, trained models.
DEFAULT_STEPS: dict[bool, int] = {False: 4, True: 8}
#: Timed runs per config, after a warm-up: on a CPU (the demo stays under a minute on two
#: cores), on a GPU.
DEFAULT_REPEATS: dict[bool, int] = {False: 1, True: 3}


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

    def generate(num_steps: int) -> Tensor:
        generator = torch.Generator(device).manual_seed(seed)
        images = pipe(labels, num_inference_steps=num_steps, guidance_scale=1.0, generator=generator, output_type="pt")
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
        warmup=lambda: generate(1),
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
def run_model(model: DemoModel, presets: Sequence[str], device: torch.device, repeats: int, bar: Any) -> DemoResult:
    """Time the plain model and each applicable preset; one `DemoRow` each."""
    result = DemoResult(model)
    bar.set_postfix_str(f"{model.key} plain")
    base_time, reference = measure(model.job, device, repeats, warmup=model.warmup)
    bar.update()
    pictures = _images_of(model, reference)
    result.rows.append(
        DemoRow("plain", "-", base_time, 1.0, model.fidelity.measure(reference, reference), "", pictures)
    )
    for name in presets:
        config = model.configs.get(name)
        if config is None:
            continue
        bar.set_postfix_str(f"{model.key} {name}")
        handle = apply(model.target, config)
        try:
            seconds, output = measure(model.job, device, repeats, before=handle.reset, warmup=model.warmup)
            state = handle.state
            tokens = summarize_tokens(state.merged_tokens)
            plans = f"{state.plans_computed}/{state.plans_reused}"
        finally:
            handle.remove()
        bar.update()
        fidelity = model.fidelity.measure(output, reference)
        result.rows.append(
            DemoRow(name, tokens, seconds, base_time / seconds, fidelity, plans, _images_of(model, output))
        )
    return result


def _images_of(model: DemoModel, output: Tensor) -> Tensor | None:
    return output.detach().float().clamp(0, 1).cpu() if model.makes_images else None  # (B, 3, H, W)


def format_table(result: DemoResult) -> str:
    """The table of one model as aligned text."""
    fidelity = result.model.fidelity
    header = ("preset", "tokens per merged layer", "time", "vs plain", fidelity.heading, "plans new/reused")
    lines = [
        (
            row.preset,
            row.tokens,
            f"{row.seconds * 1000:.0f} ms",
            f"{row.speedup:.2f}x",
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


def merged_groups_picture(
    pixels: Any = None,
    rs: Sequence[int] = PICTURE_RS,
    *,
    model: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    scale: int = 2,
) -> Any:
    """The input beside the token groups ToMe merges at each ``r``, as one ``(H, W', 3)`` uint8 image.

    Args:
        pixels: ``(H, W, 3)`` uint8 of any size (the model sees it resized to its input;
            the groups are drawn at this size); the sample photo shipped with tokenmerge by default.
        rs: ToMe's r (tokens merged per block) of each panel.
        model: a timm ViT; the trained reference ViT (`tokenmerge.tools.vis.reference_vit`) by default.
        device: where the model runs.
        scale: nearest-neighbour enlargement of the result.
    """
    import numpy as np

    from .vis import load_sample_image, merged_groups, reference_vit

    resolved = resolve_device(device)
    if pixels is None:
        pixels = load_sample_image(224)
    if model is None:
        model = reference_vit(resolved)
    panels = [pixels, *(merged_groups(model, pixels, r, device=resolved) for r in rs)]
    gap = np.full((pixels.shape[0], 6, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)  # (H, W', 3)
    return row.repeat(scale, axis=0).repeat(scale, axis=1)


def generated_images_grid(results: Sequence[DemoResult], scale: int = 2) -> Any:
    """The images each preset generated beside the plain model's, as one ``(H, W, 3)`` uint8 image.

    One block per model that makes images (the trained ones): a row per preset (plain
    first), one column per class, the row's time against plain and PSNR on its left.
    Same seed, same initial noise in every row, so the rows differ only by merging.

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

    label_width, line, gap = 190, 14, 4
    side = max(int(r.rows[0].images.shape[-1]) for r in blocks) * scale  # type: ignore[union-attr]
    columns = max(int(r.rows[0].images.shape[0]) for r in blocks)  # type: ignore[union-attr]
    heights = [2 * line + len(r.rows) * (side + gap) + 2 * gap for r in blocks]
    canvas = Image.new("RGB", (label_width + columns * (side + gap) + gap, sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    top = 0
    for result, height in zip(blocks, heights):
        draw.text((gap, top + 2), result.model.title, fill=(0, 0, 0))
        for column, name in enumerate(result.model.image_names):
            draw.text((label_width + column * (side + gap), top + line + 2), name, fill=(90, 90, 90))
        for index, row in enumerate(result.rows):
            y = top + 2 * line + gap + index * (side + gap)
            fidelity = result.model.fidelity.format(row.fidelity)
            text = "plain" if row.preset == "plain" else f"{row.preset}\n{row.speedup:.2f}x, {fidelity}"
            draw.multiline_text((gap, y + side // 2 - line), text, fill=(0, 0, 0))
            assert row.images is not None
            pixels = (row.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, h, w, 3)
            for column, picture in enumerate(pixels):
                tile = Image.fromarray(picture).resize((side, side), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_width + column * (side + gap), y))
        top += height
    return np.asarray(canvas).copy()


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
        repeats: timed runs per config (the best is shown), after one warm-up run;
            `DEFAULT_REPEATS` of the device when None (1 on a CPU, 3 on a GPU).
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
    results = []
    built = []
    with progress_bar(len(models), "building models", progress, unit="model") as bar:
        for name in models:
            bar.set_postfix_str(name)
            built.append(build_model(name, resolved, seed, steps, zoo=zoo, weights_dir=weights_dir))
            bar.update()
    total = sum(1 + sum(p in m.configs for p in presets) for m in built)
    print(f"tokenmerge demo on {_device_name(resolved)} (torch {torch.__version__})", file=stream)
    with progress_bar(total, "timing", progress, unit="run") as bar:
        for model in built:
            result = run_model(model, presets, resolved, repeats, bar)
            results.append(result)
            bar.clear()  # the table goes where the bar was; the bar is drawn again below it
            print(
                f"\n{model.title}\n{model.setup}\nfidelity: {model.fidelity.meaning}\n{format_table(result)}",
                file=stream,
                flush=True,
            )
            bar.refresh()
    print(
        f"\ntime: {f'best of {repeats} runs' if repeats > 1 else 'one run'} after a warm-up. Small models on a CPU "
        "are not where merging pays off: see the docs' explanation of where it does.",
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
            f"ViT with r={rs} tokens per block (each group filled with its mean colour)",
            file=stream,
        )
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"
