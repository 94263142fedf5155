"""Fidelity benchmark: what merging costs in image quality on the trained reference models.

For several seeds, `run_fidelity` samples full generations (DDIM, classifier-free
guidance) from a `tokenmerge.tools.zoo` model, first unmerged and then with each method, and
reports per method:

* **PSNR** (peak 1: `tokenmerge.tools.common.psnr`) and **SSIM** of the final images against
  the unmerged images of the same seed;
* **merged**: tokens removed / tokens entering, summed over the layers that merge and
  averaged over the denoising steps (for ToDo: the keys/values pooled away);
* **speed**: the fastest generation over the seeds, and the speed-up over unmerged as
  the ratio of the fastest times (every method runs on a seed before the next seed, and
  the minimum is the estimate least disturbed by other work on the machine);
* **RFD**: a distribution distance between all generated images and the held-out crops
  of the training photographs (`tokenmerge.tools.zoo.heldout`), in the feature space of a fixed
  random-weight convolutional network (`RandomFeatures`). It is *not* Inception FID: its
  values are comparable only with each other. `inception_fid` computes the real FID for
  users who have the FID Inception weights locally (needs ``torch-fidelity``).

Methods: tokenmerge's ToMeSD, CAToMe (no cache, and the paper's cache configurations
C1-C3, rescaled to the number of steps), ToDo, block-range merging (DiT), plus the
``tomesd`` library and the official CA-ToMe code (``ca-tome``) as reference rows when
they are installed (UNet only: both patch SD UNets).

For a classifier of the zoo (``--models vit-photos``) the command runs the accuracy mode
instead (`tokenmerge.tools.fidelity_vit.run_accuracy`): top-1 accuracy on held-out crops,
agreement with the unmerged model and speed for ToMe at several r, with and without
proportional attention.

With ``--prompts FILE --model ID_OR_PATH`` it runs on a user's diffusers text-to-image
pipeline instead (`run_prompts`). Under ``accelerate launch`` the generations are split over
the processes and the main process computes the metrics once
(`tokenmerge.tools.distributed.Processes`; how-to: *Evaluate at scale*).

Command line: ``tokenmerge fidelity --help`` or ``python -m tokenmerge.tools.fidelity --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import apply
from ..config import MergeConfig
from ..errors import TokenMergeError, check
from ..placements import ResidualRange
from ..policies.caches import NoCache
from ..policies.matchers import RandomGrid
from ..policies.thresholds import FixedRatio
from ..presets import CAToMe, ToDo, ToMeSD
from .common import device_argument, psnr_from_mse, resolve_device, seeded, synchronize
from .distributed import Processes

__all__ = [
    "CA_TOME_CONFIGS",
    "FidelityMethod",
    "FidelityRow",
    "FidelityResult",
    "RandomFeatures",
    "scale_schedule",
    "default_methods",
    "run_fidelity",
    "read_prompts",
    "load_pipeline",
    "pipeline_kind",
    "run_prompts",
    "ssim",
    "frechet_distance",
    "feature_distance",
    "InceptionFeatures",
    "inception_fid",
    "format_table",
    "write_plot",
    "add_fidelity_arguments",
    "fidelity_main",
    "main",
]

#: CA-ToMe's cache configurations for 50 PLMS steps: recompute the merge pairs at these
#: 0-based steps. C1-C3 are Table II of arXiv 2501.00946 as shipped in the official
#: ``ca_tome.CacheConf`` (CONFIG_1..CONFIG_3); C3 is the paper's best.
CA_TOME_CONFIGS: dict[str, tuple[int, ...]] = {
    "C1": (0, 1, 2, 3, 5, 10, 15, 25, 35),
    "C2": (0, 10, 11, 12, 15, 20, 25, 30, 35, 45),
    "C3": (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49),
}

Detach = Callable[[], None]
StepHook = Callable[[int], None]


# ---------------------------------------------------------------------- image metrics
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(images: Tensor, reference: Tensor) -> Tensor:
    """SSIM of each image against its reference (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5).

    Args:
        images, reference: ``(B, 3, H, W)`` in [0, 1].

    Returns:
        ``(B,)`` SSIM, averaged over channels and valid window positions.
    """
    check(images.shape == reference.shape and images.dim() == 4, "images and reference must be (B, C, H, W) alike")
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    window = _gaussian_window().to(x.device)[None, None].expand(channels, 1, -1, -1)  # (C, 1, 11, 11)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)  # (B, C, H - 10, W - 10)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return score.mean(dim=(1, 2, 3)).float()  # (B,)


# ---------------------------------------------------------------------- distribution distances
class RandomFeatures(nn.Module):
    """A fixed random-weight conv net: the offline feature space of the RFD distance.

    Four convolutions (32-64-128-128 channels; three 4x4 of stride 2, one 3x3) with ReLU,
    Kaiming-normal weights from a seeded generator, then the mean and standard deviation
    of each channel over space: 256 features per image. No training, no download.

    Args:
        seed: seed of the weights (the distance is defined for seed 0).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        shapes = [(3, 32, 4, 2), (32, 64, 4, 2), (64, 128, 4, 2), (128, 128, 3, 1)]  # (in, out, kernel, stride)
        self.convs = nn.ModuleList()
        for c_in, c_out, kernel, stride in shapes:
            conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=1)
            with torch.no_grad():
                fan_in = c_in * kernel * kernel
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images in [0, 1] to ``(B, 256)`` features."""
        x = (images.float() - 0.5) / 0.25
        for conv in self.convs:
            x = F.relu(conv(x))  # (B, C, H', W')
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)  # (B, 256)


def frechet_distance(features: Tensor, reference: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets (float64).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``; needs at least 2 rows each.
    """
    check(features.dim() == 2 and reference.dim() == 2, "features and reference must be (N, D)")
    check(features.shape[0] >= 2 and reference.shape[0] >= 2, "the Fréchet distance needs at least 2 images per set")
    a, b = features.double(), reference.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


@torch.no_grad()
def feature_distance(images: Tensor, reference: Tensor, network: nn.Module | None = None) -> float:
    """RFD: the Fréchet distance of two image sets in `RandomFeatures` space (not Inception FID).

    Args:
        images, reference: ``(N, 3, H, W)`` in [0, 1], at least 2 each.
        network: the feature network; ``RandomFeatures(seed=0)`` by default.
    """
    network = network or RandomFeatures(0)
    return frechet_distance(network(images.float().cpu()), network(reference.float().cpu()))


class InceptionFeatures:
    """The 2048-d pool features of the TF-ported FID Inception-v3 (what FID compares).

    Nothing is downloaded: ``weights_path`` must point to the PyTorch FID Inception weights
    (``weights-inception-2015-12-05-6726825d.pth``, as used by torch-fidelity), and
    ``torch-fidelity`` must be installed (``pip install torch-fidelity``).

    Args:
        weights_path: path of the Inception weights file.
        device: where the network runs.
        batch_size: images per forward.

    Raises:
        TokenMergeError: when ``weights_path`` is missing or torch-fidelity is not installed.
    """

    def __init__(
        self, weights_path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 50
    ) -> None:
        if weights_path is None or not Path(weights_path).is_file():
            raise TokenMergeError(
                "weights_path must name a local file with the FID Inception-v3 weights "
                "(weights-inception-2015-12-05-6726825d.pth from torch-fidelity); nothing is downloaded. "
                f"Got {weights_path!r}. Use the offline RFD distance (feature_distance) otherwise."
            )
        try:
            from torch_fidelity import FeatureExtractorInceptionV3
        except ImportError:
            raise TokenMergeError("inception_fid needs torch-fidelity: pip install torch-fidelity") from None
        self.device, self.batch_size = torch.device(device), batch_size
        self.extractor = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
        ).to(self.device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` images in [0, 1] (resized to 299 inside) to ``(N, 2048)`` float64 features on the CPU."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].mul(255).round().clamp(0, 255).to(torch.uint8)  # (b,3,H,W)
            chunks.append(self.extractor(chunk.to(self.device))[0].double().cpu())  # (b, 2048)
        return torch.cat(chunks)


@torch.no_grad()
def inception_fid(
    images: Tensor,
    reference: Tensor,
    weights_path: str | Path | None,
    device: str | torch.device = "cpu",
    batch_size: int = 50,
) -> float:
    """Real FID (2048-d pool features of the TF-ported FID Inception-v3) between two image sets.

    The features are `InceptionFeatures`' (local weights, nothing downloaded).

    Args:
        images, reference: ``(N, 3, H, W)`` in [0, 1] (resized to 299 inside), N >= 2.
        weights_path: path of the Inception weights file.
        device: where the network runs.
        batch_size: images per forward.

    Raises:
        TokenMergeError: when ``weights_path`` is missing or torch-fidelity is not installed.
    """
    features = InceptionFeatures(weights_path, device, batch_size)
    return frechet_distance(features(images), features(reference))


# ---------------------------------------------------------------------- methods
def scale_schedule(steps: Sequence[int], num_steps: int, reference_steps: int = 50) -> tuple[int, ...]:
    """Map recompute steps given for ``reference_steps`` onto a ``num_steps`` schedule (floor, deduplicated)."""
    check(num_steps >= 1, f"num_steps must be >= 1; got {num_steps!r}")
    return tuple(sorted({min(num_steps - 1, s * num_steps // reference_steps) for s in steps}))


@dataclass
class FidelityMethod:
    """One row of the fidelity table.

    Attributes:
        label: the name in tables.
        family: ``"plain"``, ``"ToMeSD"``, ``"CAToMe"``, ``"ToDo"``, ``"block"``,
            ``"tomesd (library)"`` or ``"ca-tome (official)"``.
        setting: the ratio/threshold/cache in words.
        config: the `MergeConfig` of a tokenmerge row (None for plain and library rows).
        library: ``"tomesd"`` or ``"ca-tome"`` for reference rows.
        options: the library row's arguments.
    """

    label: str
    family: str
    setting: str
    config: MergeConfig | None = None
    library: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _block_config(ratio: float, blocks: tuple[int, int], seed: int) -> MergeConfig:
    return MergeConfig(
        matcher=RandomGrid(sx=2, sy=2, use_rand=True),
        threshold=FixedRatio(ratio),
        mode="mean",
        seed=seed,
        placement=ResidualRange(*blocks, prop_attn=True),
    )


def default_methods(
    kind: str,
    num_steps: int,
    *,
    num_blocks: int = 6,
    seed: int = 0,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    thresholds: Sequence[float] = (0.9, 0.8, 0.7, 0.6),
    cache_threshold: float = 0.7,
    libraries: bool = True,
) -> list[FidelityMethod]:
    """The method rows for a ``"unet"`` or ``"dit"`` reference model.

    ToMeSD at each ratio; CAToMe without cache at each threshold and at
    ``cache_threshold`` with each of C1-C3 (rescaled from 50 steps to ``num_steps``);
    ToDo 2x2 (and 4x4 on the UNet); block-range merging at each ratio over all blocks but
    the first and last (DiT); the tomesd library at each ratio and the official CA-ToMe
    (threshold ``cache_threshold``, C3) on the UNet when installed.
    """
    check(kind in ("unet", "dit"), f"kind must be 'unet' or 'dit'; got {kind!r}")
    methods = [FidelityMethod("plain", "plain", "unmerged")]
    for ratio in ratios:
        methods.append(FidelityMethod(f"ToMeSD r={ratio:g}", "ToMeSD", f"ratio {ratio:g}", ToMeSD(ratio, seed=seed)))
    for threshold in thresholds:
        config = CAToMe(threshold, seed=seed).replace(cache=NoCache())
        methods.append(
            FidelityMethod(f"CAToMe T={threshold:g}", "CAToMe", f"threshold {threshold:g}, no cache", config)
        )
    for name, steps in CA_TOME_CONFIGS.items():
        scaled = scale_schedule(steps, num_steps)
        config = CAToMe(cache_threshold, recompute_at=scaled, seed=seed)
        setting = f"threshold {cache_threshold:g}, cache {name} scaled to {num_steps} steps {list(scaled)}"
        methods.append(FidelityMethod(f"CAToMe T={cache_threshold:g} {name}", "CAToMe", setting, config))
    for factor in (2, 4) if kind == "unet" else (2,):
        methods.append(
            FidelityMethod(
                f"ToDo {factor}x{factor}", "ToDo", f"keys/values pooled {factor}x{factor}", ToDo(factor, seed=seed)
            )
        )
    if kind == "dit":
        blocks = (1, num_blocks - 2) if num_blocks >= 3 else (0, num_blocks - 1)
        for ratio in ratios:
            methods.append(
                FidelityMethod(
                    f"block r={ratio:g} {blocks[0]}-{blocks[1]}",
                    "block",
                    f"ratio {ratio:g}, residual stream merged over blocks {blocks[0]}-{blocks[1]}",
                    _block_config(ratio, blocks, seed),
                )
            )
    if libraries and kind == "unet":
        for ratio in ratios:
            methods.append(
                FidelityMethod(
                    f"tomesd lib r={ratio:g}",
                    "tomesd (library)",
                    f"tomesd 0.1.3, ratio {ratio:g}",
                    library="tomesd",
                    options={"ratio": ratio},
                )
            )
        scaled = scale_schedule(CA_TOME_CONFIGS["C3"], num_steps)
        methods.append(
            FidelityMethod(
                f"ca-tome lib T={cache_threshold:g} C3",
                "ca-tome (official)",
                f"official ca-tome, threshold {cache_threshold:g}, C3 scaled {list(scaled)}",
                library="ca-tome",
                options={"threshold": cache_threshold, "compute_on": list(scaled)},
            )
        )
    return methods


# ---------------------------------------------------------------------- running
@dataclass
class FidelityRow:
    """One method's results on one model (None where not measured)."""

    model: str
    method: str
    family: str
    setting: str
    psnr: float | None = None
    ssim: float | None = None
    merged: float | None = None
    seconds: float | None = None
    speedup: float | None = None
    distance: float | None = None
    note: str = ""


@dataclass
class FidelityResult:
    """All rows of a run and how it was run."""

    rows: list[FidelityRow]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (infinite PSNR as the string ``"inf"``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            return value

        return {"meta": self.meta, "rows": [{k: clean(v) for k, v in asdict(row).items()} for row in self.rows]}


def _library_available(name: str) -> str | None:
    """None when the library imports, else why not."""
    module = {"tomesd": "tomesd", "ca-tome": "ca_tome"}[name]
    try:
        __import__(module)
    except Exception as error:  # ImportError, or an incompatible install failing at import
        return f"{name} not usable: {type(error).__name__}: {error}"
    return None


def _attach_library(method: FidelityMethod, pipe: Any) -> tuple[Detach, StepHook | None]:
    """Patch ``pipe.unet`` with a reference library; returns (detach, per-step hook)."""
    if method.library == "tomesd":
        import tomesd

        tomesd.apply_patch(pipe.unet, ratio=method.options["ratio"])
        return (lambda: tomesd.remove_patch(pipe.unet)), None
    from ca_tome.patch import apply_patch, remove_patch
    from diffusers.models.attention import BasicTransformerBlock

    apply_patch(pipe.unet, method.options["compute_on"], r=method.options["threshold"])
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def set_step(step: int) -> None:
        # The official pipeline passes step index + 1 to its patched UNet (its off-by-one):
        # reproduced. Its cache is never cleared between calls; here every generation patches
        # afresh, so each starts with an empty cache.
        for block in blocks:
            block.inference_step = step + 1

    def detach() -> None:
        remove_patch(pipe.unet)
        for block in blocks:
            block.__dict__.pop("inference_step", None)
            block.__dict__.pop("_cache_info", None)
            block.__dict__.pop("_ca_tome_info", None)
        pipe.unet.__dict__.pop("_ca_tome_info", None)

    return detach, set_step


def _labels(seed: int, count: int, num_classes: int) -> list[int]:
    return [(seed * count + i) % num_classes for i in range(count)]


@dataclass
class _Item:
    """One generation: its place in the run, its noise seed and the pipeline's inputs."""

    index: int
    seed: int
    label: str
    inputs: dict[str, Any]


def _generate(
    pipe: Any, inputs: dict[str, Any], seed: int, num_steps: int, guidance: float, step_hook: StepHook | None
) -> tuple[Tensor, float]:
    """One generation: ``(B, 3, H, W)`` images in [0, 1] on the CPU and its wall time."""
    device = pipe._execution_device
    generator = torch.Generator().manual_seed(seed)  # CPU noise: the same images on every device and process
    callback = None
    if step_hook is not None:
        step_hook(0)

        def callback(_pipe: Any, index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            step_hook(index + 1)
            return kwargs

    synchronize(device)
    start = time.perf_counter()
    out = pipe(
        **inputs,
        num_inference_steps=num_steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="pt",
        callback_on_step_end=callback,
    )
    synchronize(device)
    return out.images.float().cpu(), time.perf_counter() - start


def _merged_fraction(snapshots: list[dict[str, tuple[int, int]]]) -> float | None:
    total_in = sum(n_in for snap in snapshots for n_in, _ in snap.values())
    removed = sum(n_in - n_out for snap in snapshots for n_in, n_out in snap.values())
    return removed / total_in if total_in else None


def _run_once(
    method: FidelityMethod, pipe: Any, item: _Item, num_steps: int, guidance: float
) -> tuple[Tensor, float, list[dict[str, tuple[int, int]]]]:
    """One generation with ``method`` attached (and detached after): images, seconds, per-step token counts."""
    snapshots: list[dict[str, tuple[int, int]]] = []
    handle = None
    detach: Detach = lambda: None  # noqa: E731
    library_hook: StepHook | None = None
    if method.config is not None:
        handle = apply(pipe, method.config)
        detach = handle.remove
    elif method.library is not None:
        detach, library_hook = _attach_library(method, pipe)

    def step_hook(step: int) -> None:
        if library_hook is not None:
            library_hook(step)
        if handle is not None and step > 0:
            snapshots.append(dict(handle.state.merged_tokens))

    hook = step_hook if (handle is not None or library_hook is not None) else None
    # Library rows draw their random grids from the global RNG: seed it, and restore it afterwards.
    context = seeded(item.seed, pipe._execution_device) if method.library else contextlib.nullcontext()
    try:
        with context:
            images, seconds = _generate(pipe, item.inputs, item.seed, num_steps, guidance, hook)
    finally:
        detach()
    return images, seconds, snapshots


@dataclass
class _Scores:
    """What one generation of one method contributes to its row, against the plain images of the item.

    Computed where the generation ran, so only these (not the images) travel to the main process.
    """

    item: int
    seconds: float
    snapshots: list[dict[str, tuple[int, int]]]
    squared_error: float  # summed over every element, float64
    elements: int
    ssim: Tensor  # (B,)
    features: Tensor | None  # (B, 256) RandomFeatures
    inception: Tensor | None  # (B, 2048) InceptionFeatures


@dataclass
class _Measured:
    """Every method's scores over all items, in item order (on the main process)."""

    scores: list[list[_Scores]]
    notes: list[str]


def _measure(
    pipe: Any,
    methods: Sequence[FidelityMethod],
    items: Sequence[_Item],
    num_steps: int,
    guidance: float,
    name: str,
    emit: Callable[[str], None],
    processes: Processes,
    network: nn.Module | None,
    inception: InceptionFeatures | None,
) -> _Measured | None:
    """Generate this process's share of ``items`` with every method and score it; gathered on the main process.

    Each item's plain images stay on its process; each method's images are scored there
    against them (squared error, SSIM, features), and only the scores travel. Returns every
    item's scores in item order on the main process, None on the others. A row whose
    reference library is missing or failed on any process is left out (its note says why).
    """
    mine = processes.share(items)
    notes = [(_library_available(m.library) or "") if m.library is not None else "" for m in methods]
    scores: list[tuple[int, _Scores]] = []
    if mine:
        _generate(pipe, mine[0].inputs, mine[0].seed, 1, guidance, None)  # warm-up
    # Item-major order: every method runs right after the others on the same item, so a change
    # in machine load between items hits all rows alike.
    for item in mine:
        plain: Tensor | None = None
        for index, method in enumerate(methods):
            if notes[index]:  # a reference library that is missing or failed
                continue
            try:
                batch, seconds, snaps = _run_once(method, pipe, item, num_steps, guidance)
            except TokenMergeError:
                raise
            except Exception as error:  # a reference library that does not work with this diffusers
                if method.library is None:
                    raise
                notes[index] = f"failed: {type(error).__name__}: {str(error)[:120]}"
                continue
            plain = batch if plain is None else plain  # (B, 3, H, W): methods[0] is plain
            scores.append(
                (
                    index,
                    _Scores(
                        item=item.index,
                        seconds=seconds,
                        snapshots=snaps,
                        squared_error=float((batch.double() - plain.double()).pow(2).sum()),
                        elements=batch.numel(),
                        ssim=ssim(batch, plain),
                        features=network(batch) if network is not None else None,
                        inception=inception(batch) if inception is not None else None,
                    ),
                )
            )
            emit(f"{name}: {item.label}: {method.label}: {seconds:.1f} s ({index + 1}/{len(methods)})")
        emit(f"{name}: {item.label} done")
    gathered = processes.gather((scores, notes))
    if gathered is None:
        return None
    measured = _Measured([[] for _ in methods], [""] * len(methods))
    for _scores, process_notes in gathered:
        for index, note in enumerate(process_notes):
            measured.notes[index] = measured.notes[index] or note
    every = sorted((s for process_scores, _ in gathered for s in process_scores), key=lambda s: (s[1].item, s[0]))
    for index, score in every:
        measured.scores[index].append(score)
    return measured


def _cat(tensors: list[Tensor | None]) -> Tensor | None:
    return None if not tensors or any(t is None for t in tensors) else torch.cat(tensors)  # type: ignore[arg-type]


def _score(
    rows: list[FidelityRow],
    measured: _Measured,
    distance_to: tuple[Tensor | None, Tensor | None],
    emit: Callable[[str], None],
) -> None:
    """Fill in the rows' metrics from every generation's scores (the main process, once).

    ``distance_to``: the (RandomFeatures, Inception) features of the distance's target set,
    None where not measured. PSNR pools the squared errors over every item (in item order).
    """
    target_features, target_inception = distance_to
    fastest_plain = min(s.seconds for s in measured.scores[0])
    for index, row in enumerate(rows):
        row.note = measured.notes[index]
        scores = measured.scores[index]
        if row.note or not scores:
            emit(f"{row.model}: {row.method}: skipped ({row.note})")
            continue
        row.seconds = min(s.seconds for s in scores)
        row.speedup = fastest_plain / row.seconds
        row.merged = 0.0 if row.family == "plain" else _merged_fraction([x for s in scores for x in s.snapshots])
        mse = sum(s.squared_error for s in scores) / sum(s.elements for s in scores)
        row.psnr = psnr_from_mse(mse)
        row.ssim = float(torch.cat([s.ssim for s in scores]).mean())
        features = _cat([s.features for s in scores])
        if features is not None and target_features is not None and features.shape[0] >= 2:
            row.distance = frechet_distance(features, target_features)
        inception = _cat([s.inception for s in scores])
        if inception is not None and target_inception is not None:
            fid = frechet_distance(inception, target_inception)
            row.note = (row.note + "; " if row.note else "") + f"Inception FID {fid:.2f}"
        emit(_row_line(row))


def _with_plain(methods: Sequence[FidelityMethod]) -> list[FidelityMethod]:
    methods = list(methods)
    if not methods or methods[0].family != "plain":
        methods = [FidelityMethod("plain", "plain", "unmerged"), *[m for m in methods if m.family != "plain"]]
    return methods


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def run_fidelity(
    model: str = "unet-photos",
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    images_per_seed: int = 4,
    methods: Sequence[FidelityMethod] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    distance: bool = True,
    fid_weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    processes: Processes | None = None,
) -> FidelityResult | None:
    """Run the fidelity benchmark on one reference model.

    Under ``accelerate launch`` the seeds are split over the processes (contiguous shares,
    `tokenmerge.tools.distributed.Processes`), each process generates its share on its own
    device and scores it there against the plain images of the same seed (squared errors,
    SSIM, features: no image leaves its process), and the main process gathers the scores in
    seed order and computes the rows once. The rows equal a one-process run's with the same
    seeds, but for the timing columns (bit for bit with the same CPU threads per process).

    Args:
        model: a `tokenmerge.tools.zoo` model name.
        seeds: one generation per seed (noise seed; the classes rotate with the seed).
        num_steps: DDIM steps per generation.
        guidance_scale: classifier-free guidance weight.
        images_per_seed: images per generation (its batch, doubled by guidance).
        methods: the rows; `default_methods` for the model's kind by default. A plain
            row is added first when missing (the reference of PSNR/SSIM and speed).
        device, dtype: where and in what precision the model runs (with several processes,
            a CUDA device is each process's own GPU).
        distance: compute the RFD to the held-out crops (needs >= 2 images per method).
        fid_weights: also compute the real Inception FID with these local weights.
        weights_dir: load the model from here instead of the shipped weights.
        log: progress lines go here (None: silent); prefixed with the process when several run.
        processes: the processes of the run; `Processes.current()` by default.

    Returns:
        A `FidelityResult` with one `FidelityRow` per method on the main process; None on the others.
    """
    from . import zoo

    check(len(seeds) >= 1, "seeds must list at least one seed")
    check(
        isinstance(images_per_seed, int) and images_per_seed >= 1,
        f"images_per_seed must be >= 1; got {images_per_seed!r}",
    )
    processes = processes or Processes.current()
    device = processes.device(device)
    pipe = zoo.load(model, device=device, dtype=dtype, weights_dir=weights_dir)
    kind = "dit" if hasattr(pipe, "transformer") else "unet"
    num_blocks = len(pipe.transformer.transformer_blocks) if kind == "dit" else 0
    methods = _with_plain(methods if methods is not None else default_methods(kind, num_steps, num_blocks=num_blocks))
    items = [
        _Item(i, seed, f"seed {seed}", {"class_labels": _labels(seed, images_per_seed, pipe.num_classes)})
        for i, seed in enumerate(seeds)
    ]
    emit = processes.progress(log)
    emit(
        f"{model}: {len(methods)} methods x {len(seeds)} seeds, {num_steps} steps, {images_per_seed} images each"
        + (f", {processes.count} processes" if processes.count > 1 else "")
    )
    network = RandomFeatures(0) if distance else None
    inception = InceptionFeatures(fid_weights, device) if fid_weights is not None else None
    measured = _measure(pipe, methods, items, num_steps, guidance_scale, model, emit, processes, network, inception)
    if measured is None:
        return None
    rows = [FidelityRow(model=model, method=m.label, family=m.family, setting=m.setting) for m in methods]
    heldout = zoo.heldout(weights_dir)[0] if (network or inception) else None  # (N, 3, H, W)
    targets = (
        network(heldout) if network is not None and heldout is not None else None,
        inception(heldout) if inception is not None and heldout is not None else None,
    )
    _score(rows, measured, targets, emit)
    meta = {
        "model": model,
        "seeds": list(seeds),
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "images_per_seed": images_per_seed,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(device),
        "device_name": _device_name(device),
        "processes": processes.count,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "weights": zoo.info(model, weights_dir)["training"].get("hardware"),
        "distance": "RFD: Fréchet distance to the held-out crops in RandomFeatures(seed=0) space (not Inception FID)",
        "merged": "tokens removed / tokens entering, over the merging layers, averaged over steps",
    }
    return FidelityResult(rows=rows, meta=meta)


# ---------------------------------------------------------------------- prompts and a user's checkpoint
def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file: one per line, blank lines skipped, surrounding spaces stripped.

    Raises:
        TokenMergeError: when the file is missing or lists no prompt.
    """
    file = Path(path)
    check(file.is_file(), f"--prompts must name a text file with one prompt per line; got {str(path)!r}")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    check(len(prompts) >= 1, f"--prompts must list at least one prompt; {str(path)!r} has none")
    return prompts


def load_pipeline(
    model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **options: Any
) -> Any:
    """A diffusers pipeline from a hub id or a local directory (``DiffusionPipeline.from_pretrained``).

    A hub id downloads into the Hugging Face cache (under ``accelerate launch`` the main process
    downloads first, the others then read the cache); a local directory is read as is.

    Args:
        model: hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) or directory of ``save_pretrained``.
        device, dtype: where and in what precision the pipeline runs.
        options: more ``from_pretrained`` arguments (``variant=``, ``safety_checker=None``...).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import deprecation_utils

    device = resolve_device(device)
    # diffusers renamed torch_dtype= to dtype= (and warns about the old name) where it has _resolve_dtype.
    dtype_name = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = DiffusionPipeline.from_pretrained(str(model), **{dtype_name: dtype}, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_kind(pipe: Any) -> tuple[str, int]:
    """``("unet", 0)`` for a UNet pipeline, ``("dit", blocks)`` for a transformer one (for `default_methods`)."""
    if hasattr(pipe, "unet") and getattr(pipe, "unet", None) is not None:
        return "unet", 0
    transformer = getattr(pipe, "transformer", None)
    check(transformer is not None, f"the pipeline must have a unet or a transformer; got {type(pipe).__name__}")
    blocks = getattr(transformer, "transformer_blocks", None)
    return "dit", len(blocks) if blocks is not None else 0


def run_prompts(
    pipe: Any,
    prompts: Sequence[str],
    *,
    name: str = "model",
    seeds: Sequence[int] = (0,),
    num_steps: int = 25,
    guidance_scale: float = 7.5,
    images_per_seed: int = 1,
    methods: Sequence[FidelityMethod] | None = None,
    distance: bool = True,
    fid_weights: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    processes: Processes | None = None,
) -> FidelityResult | None:
    """The fidelity benchmark on a user's text-to-image pipeline and prompts.

    Every prompt is generated with every seed (noise from a CPU generator seeded with the
    seed, ``images_per_seed`` images per generation), first unmerged and then with each method.
    The rows are those of `run_fidelity`, but the distance columns (RFD, and Inception FID
    with ``fid_weights``) compare each method's images to the **unmerged model's** images of
    the same prompts and seeds (there are no held-out photographs for a user's model).

    Under ``accelerate launch`` the (prompt, seed) pairs are split over the processes, and
    the main process gathers their scores (not the images) and computes the rows once.

    Args:
        pipe: a diffusers pipeline taking ``prompt=`` (`load_pipeline`), already on its device.
        prompts: the prompts (`read_prompts`).
        name: the model's name in the rows (its hub id or path).
        seeds, num_steps, guidance_scale: as in `run_fidelity`.
        images_per_seed: ``num_images_per_prompt`` of each generation.
        methods: the rows; `default_methods` for the pipeline's kind by default (plain first).
        distance, fid_weights: the distances to the unmerged images (>= 2 images for RFD).
        log, processes: as in `run_fidelity`.

    Returns:
        A `FidelityResult` on the main process; None on the others.
    """
    check(len(prompts) >= 1, "prompts must list at least one prompt")
    check(len(seeds) >= 1, "seeds must list at least one seed")
    check(
        isinstance(images_per_seed, int) and images_per_seed >= 1,
        f"images_per_seed must be >= 1; got {images_per_seed!r}",
    )
    processes = processes or Processes.current()
    kind, num_blocks = pipeline_kind(pipe)
    methods = _with_plain(
        methods
        if methods is not None
        else default_methods(kind, num_steps, num_blocks=num_blocks, libraries=kind == "unet")
    )
    pairs = [(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in seeds]
    items = [
        _Item(i, seed, f"prompt {p} seed {seed}", {"prompt": prompt, "num_images_per_prompt": images_per_seed})
        for i, (p, prompt, seed) in enumerate(pairs)
    ]
    emit = processes.progress(log)
    emit(
        f"{name}: {len(methods)} methods x {len(items)} generations ({len(prompts)} prompts x {len(seeds)} seeds), "
        f"{num_steps} steps" + (f", {processes.count} processes" if processes.count > 1 else "")
    )
    device = pipe._execution_device
    network = RandomFeatures(0) if distance else None
    inception = InceptionFeatures(fid_weights, device) if fid_weights is not None else None
    measured = _measure(pipe, methods, items, num_steps, guidance_scale, name, emit, processes, network, inception)
    if measured is None:
        return None
    rows = [FidelityRow(model=name, method=m.label, family=m.family, setting=m.setting) for m in methods]
    plain = measured.scores[0]
    _score(rows, measured, (_cat([s.features for s in plain]), _cat([s.inception for s in plain])), emit)
    meta = {
        "model": name,
        "pipeline": type(pipe).__name__,
        "prompts": len(prompts),
        "seeds": list(seeds),
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "images_per_seed": images_per_seed,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(device),
        "device_name": _device_name(torch.device(device)),
        "processes": processes.count,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "distance": "RFD to the unmerged model's images of the same prompts and seeds (not Inception FID)",
        "merged": "tokens removed / tokens entering, over the merging layers, averaged over steps",
    }
    return FidelityResult(rows=rows, meta=meta)


# ---------------------------------------------------------------------- output
def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, fmt)


def _row_line(row: FidelityRow) -> str:
    return (
        f"{row.model}: {row.method}: PSNR {_num(row.psnr, '.2f')} dB, SSIM {_num(row.ssim, '.4f')}, "
        f"merged {_num(row.merged, '.1%')}, {_num(row.seconds, '.2f')} s ({_num(row.speedup, '.2f')}x), "
        f"RFD {_num(row.distance, '.3f')}"
    )


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| model | method | setting | PSNR (dB) | SSIM | merged | fastest s | speed-up | RFD to held-out | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.method} | {r.setting} | {_num(r.psnr, '.2f')} | {_num(r.ssim, '.4f')} | "
            f"{_num(r.merged, '.1%')} | {_num(r.seconds, '.2f')} | {_num(r.speedup, '.2f')}x | "
            f"{_num(r.distance, '.3f')} | {r.note} |"
        )
    return "\n".join(lines)


def write_plot(rows: Sequence[FidelityRow], path: str | Path, title: str = "") -> None:
    """Speed-up vs PSNR scatter (one colour per family, one panel per model); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TokenMergeError("write_plot needs matplotlib: pip install matplotlib") from None
    models = sorted({r.model for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        shown = [
            r
            for r in rows
            if r.model == model and r.speedup is not None and r.psnr is not None and not math.isinf(r.psnr)
        ]
        for family in sorted({r.family for r in shown}):
            points = [r for r in shown if r.family == family]
            ax.scatter([r.speedup for r in points], [r.psnr for r in points], label=family)
            for r in points:
                ax.annotate(r.method.split(" ", 1)[-1], (r.speedup, r.psnr), fontsize=6, alpha=0.7)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("speed-up over unmerged (same run)")
        ax.set_ylabel("PSNR vs unmerged (dB)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- command line
def add_fidelity_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the fidelity benchmark's options to ``parser`` (for ``tokenmerge fidelity``)."""
    parser.add_argument(
        "--models",
        default="unet-photos,dit-photos",
        help="comma-separated tokenmerge.tools.zoo models; vit-photos: the accuracy mode",
    )
    parser.add_argument("--seeds", type=int, default=4, help="generations per method (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per generation")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--images-per-seed", type=int, default=4, help="images per generation")
    parser.add_argument(
        "--families", default="", help="only these method families, e.g. 'ToMeSD,CAToMe' (plain always runs)"
    )
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="ToMeSD / block-range / tomesd ratios")
    parser.add_argument("--thresholds", default="0.9,0.8,0.7,0.6", help="CAToMe thresholds without cache")
    parser.add_argument("--no-libraries", action="store_true", help="skip the tomesd and ca-tome reference rows")
    parser.add_argument("--no-distance", action="store_true", help="skip the RFD distance to held-out crops")
    parser.add_argument("--fid-weights", default=None, help="local FID Inception weights: also report real FID")
    parser.add_argument(
        "--device", type=device_argument, default="cpu", help="cpu (default), cuda, cuda:N, mps or auto"
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--weights-dir", default=None, help="load the models from here instead of the shipped weights")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    prompts = parser.add_argument_group(
        "a text-to-image checkpoint (--prompts FILE --model ID_OR_PATH): every prompt with every seed, "
        "distances to the unmerged images"
    )
    prompts.add_argument("--prompts", default=None, help="text file, one prompt per line (instead of --models)")
    prompts.add_argument(
        "--model", default=None, help="diffusers pipeline for --prompts: hub id or local directory (from_pretrained)"
    )
    parser.add_argument("--plot", default=None, help="write a speed-vs-PSNR plot (PNG) here")
    accuracy = parser.add_argument_group("classifier models (--models vit-photos): top-1 accuracy against speed")
    accuracy.add_argument("--r", default="0,4,8,12,16", help="ToMe's r per block of the merged rows")
    accuracy.add_argument("--per-class", type=int, default=16, help="held-out crops scored per class (16 classes)")
    accuracy.add_argument("--batch-size", type=int, default=32, help="images per forward (scoring and timing)")
    accuracy.add_argument("--repeats", type=int, default=3, help="timed forwards per row (the fastest counts)")
    return parser


def _accuracy_main(name: str, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    """The accuracy mode of `fidelity_main` for a classifier: prints its table, returns its JSON."""
    from .fidelity_vit import format_accuracy_table, run_accuracy

    try:
        rs = [int(v) for v in args.r.split(",") if v.strip()]
    except ValueError:
        raise TokenMergeError(f"--r must be comma-separated integers; got {args.r!r}") from None
    result = run_accuracy(
        name,
        rs=rs,
        per_class=args.per_class,
        batch_size=args.batch_size,
        repeats=args.repeats,
        device=args.device,
        dtype=dtype,
        weights_dir=args.weights_dir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_accuracy_table(result.rows))
    return result.to_json()


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TokenMergeError(f"{name} must be comma-separated numbers; got {text!r}") from None


def _prompts_main(
    args: argparse.Namespace, dtype: torch.dtype, families: set[str], processes: Processes
) -> FidelityResult | None:
    """The ``--prompts FILE --model ID_OR_PATH`` mode of `fidelity_main`."""
    check(args.model is not None, "--prompts needs --model: a diffusers pipeline's hub id or local directory")
    prompts = read_prompts(args.prompts)
    with processes.main_first():
        pipe = load_pipeline(args.model, device=processes.device(args.device), dtype=dtype)
    kind, num_blocks = pipeline_kind(pipe)
    methods = default_methods(
        kind,
        args.steps,
        num_blocks=num_blocks,
        ratios=_floats(args.ratios, "--ratios"),
        thresholds=_floats(args.thresholds, "--thresholds"),
        libraries=kind == "unet" and not args.no_libraries,
    )
    if families:
        methods = [m for m in methods if m.family == "plain" or m.family in families]
    return run_prompts(
        pipe,
        prompts,
        name=str(args.model),
        seeds=tuple(range(args.seeds)),
        num_steps=args.steps,
        guidance_scale=args.guidance,
        images_per_seed=args.images_per_seed,
        methods=methods,
        distance=not args.no_distance,
        fid_weights=args.fid_weights,
        log=_stderr,
        processes=processes,
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fidelity_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed `add_fidelity_arguments` options; prints a Markdown table.

    Under ``accelerate launch`` the generations are split over the processes and only the
    main process prints the table and writes the JSON and the plot (the others print their
    progress on stderr); the accuracy mode (``vit-photos``) runs on the main process alone.
    """
    from . import zoo

    check(args.seeds >= 1 and args.steps >= 1, "--seeds and --steps must be >= 1")
    check(args.model is None or args.prompts is not None, "--model needs --prompts FILE (one prompt per line)")
    families = {f.strip() for f in args.families.split(",") if f.strip()}
    dtype = getattr(torch, args.dtype)
    processes = Processes.current(cpu=resolve_device(args.device).type == "cpu")
    rows: list[FidelityRow] = []
    metas = []
    classifiers = []
    models = [] if args.prompts is not None else [m for m in args.models.split(",") if m]
    for name in models:
        check(name in zoo.names(), f"--models must name {', '.join(zoo.names())}; got {name!r}")
    if args.prompts is not None:
        result = _prompts_main(args, dtype, families, processes)
        if result is not None:
            rows += result.rows
            metas.append(result.meta)
    for name in models:
        kind = zoo.info(name, args.weights_dir)["spec"]["kind"]
        if kind == "vit":
            if processes.is_main:
                classifiers.append(_accuracy_main(name, args, dtype))
            continue
        num_blocks = zoo.info(name, args.weights_dir)["spec"]["denoiser"].get("num_layers", 0)
        methods = default_methods(
            kind,
            args.steps,
            num_blocks=num_blocks,
            ratios=_floats(args.ratios, "--ratios"),
            thresholds=_floats(args.thresholds, "--thresholds"),
            libraries=not args.no_libraries,
        )
        if families:
            methods = [m for m in methods if m.family == "plain" or m.family in families]
        result = run_fidelity(
            name,
            seeds=tuple(range(args.seeds)),
            num_steps=args.steps,
            guidance_scale=args.guidance,
            images_per_seed=args.images_per_seed,
            methods=methods,
            device=args.device,
            dtype=dtype,
            distance=not args.no_distance,
            fid_weights=args.fid_weights,
            weights_dir=args.weights_dir,
            log=_stderr,
            processes=processes,
        )
        if result is not None:
            rows += result.rows
            metas.append(result.meta)
    processes.wait()
    if not processes.is_main:
        return 0
    if rows:
        print(format_table(rows))
    if args.json:
        payload = {
            "command": "python -m tokenmerge.tools.fidelity " + " ".join(sys.argv[1:]),
            "runs": metas,
            "rows": FidelityResult(rows, {}).to_json()["rows"],
            "classifiers": classifiers,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot and rows:
        write_plot(
            rows,
            args.plot,
            title=f"{args.steps} DDIM steps, guidance {args.guidance:g}, {args.seeds} seeds, {args.device}",
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmerge.tools.fidelity``."""
    parser = add_fidelity_arguments(
        argparse.ArgumentParser(prog="python -m tokenmerge.tools.fidelity", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        return fidelity_main(args)
    except TokenMergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
