"""Benchmark rows of the newer families (Flux, SD3.5, Wan): tiny variants run, meta counts are consistent.

No test asserts a speed. They check that the tiny variants of ``flux-dev``, ``sd35-medium``
and ``wan-1.3b`` build and step with the inputs their pipelines give, that the full-size
configs have the published token counts, and that the meta-device harness
(`benchmarks/op_counts.py`) counts what it says: the plain model above a merge in FLOPs,
a merge's zero-overhead ideal at or below the merge.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmerge import TokenMergeError
from tokenmerge.tools.bench_models import (
    Workload,
    build_model,
    check_resolution,
    flux_image_ids,
    get_arch,
    pack_flux_latents,
    smooth_noise,
    video_size,
)

ROOT = Path(__file__).resolve().parent.parent
MODERN_TINY = ("flux-dev-tiny", "sd35-medium-tiny", "wan-1.3b-tiny")
CPU = torch.device("cpu")
META = torch.device("meta")


def _script(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name", MODERN_TINY)
@pytest.mark.parametrize("inputs", ["noise", "smooth"])
def test_tiny_variants_step_and_sample(name: str, inputs: str) -> None:
    spec = get_arch(name)
    model = build_model(spec)
    work = Workload(spec, model, spec.batch, spec.resolution, CPU, torch.float32, schedule=3, inputs=inputs)
    with torch.no_grad():
        out = work.step(model, 1)
        latents = work.sample(model, 2)
    assert out.shape == work.inputs["latents"].shape == latents.shape
    assert torch.isfinite(out).all() and out.std() > 0


def _tokens(name: str) -> tuple[int, tuple[int, ...]]:
    """Image tokens per sample of ``name`` at its default size, and its latent shape (built on meta)."""
    spec = get_arch(name)
    model = build_model(spec, device=META)
    work = Workload(spec, model, spec.batch, spec.resolution, META, torch.float32)
    shape = tuple(work.inputs["latents"].shape)
    if spec.family == "flux":  # packed: (B, N, 64)
        return shape[1], shape
    frames = shape[2] if spec.family == "wan" else 1  # (B, C, T, H, W) or (B, C, H, W); 2x2 patches
    return frames * (shape[-2] // 2) * (shape[-1] // 2), shape


def test_full_size_configs_have_the_published_token_counts() -> None:
    assert _tokens("flux-dev") == (4096, (1, 4096, 64))  # 1024 px: 128x128 latent, 2x2 packed
    assert _tokens("sd35-medium") == (4096, (2, 16, 128, 128))
    assert _tokens("wan-1.3b") == (21 * 30 * 52, (1, 16, 21, 60, 104))  # 81 frames at 480x832 px
    assert video_size(get_arch("wan-1.3b"), 480) == (81, 480, 832)
    assert get_arch("flux-dev").extra["text"] == (512, 4096) and get_arch("sd35-medium").extra["text"][0] == 333
    check_resolution(get_arch("wan-1.3b"), 480)  # a multiple of 16 is enough for the patch transformers
    with pytest.raises(TokenMergeError, match="multiple of 16"):
        check_resolution(get_arch("flux-dev"), 1000)


def test_flux_packing_and_position_ids_follow_the_pipeline() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack_flux_latents(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, CPU, torch.float32)
    assert torch.equal(flux_image_ids(4, 3), ids)


def test_smooth_noise_of_video_latents() -> None:
    gen = torch.Generator().manual_seed(0)
    field = smooth_noise((1, 2, 5, 16, 16), gen)
    assert field.shape == (1, 2, 5, 16, 16)
    assert field.mean(dim=(2, 3, 4)).abs().max() < 1e-4
    neighbours = (field[..., 1:] * field[..., :-1]).mean()
    assert neighbours > 0.5  # neighbouring tokens alike; i.i.d. noise gives about 0
    with pytest.raises(TokenMergeError, match="shape must be"):
        smooth_noise((2, 16), gen)


@pytest.mark.parametrize("name", MODERN_TINY)
def test_fewer_tokens_cuts_image_rows_only(name: str) -> None:
    spec = get_arch(name)
    model = build_model(spec)
    work = Workload(spec, model, spec.batch, spec.resolution, CPU, torch.float32)
    fewer = work.fewer_tokens(0.5)
    before, after = work.inputs["latents"], fewer.inputs["latents"]
    assert after.numel() * 2 == before.numel()
    assert torch.equal(fewer.inputs["text"], work.inputs["text"]) and work.inputs["latents"] is before
    if spec.family == "flux":
        assert fewer.inputs["img_ids"].shape[0] == after.shape[1]
    with torch.no_grad():
        assert fewer.step(model, 0).shape == after.shape
    assert work.fewer_tokens(0.0).inputs["latents"].shape == before.shape
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(TokenMergeError, match="fraction must be"):
            work.fewer_tokens(bad)  # type: ignore[arg-type]


def test_fewer_tokens_refuses_a_unet() -> None:
    spec = get_arch("sd15-tiny")
    work = Workload(spec, build_model(spec, device=META), 2, 128, META, torch.float32)
    with pytest.raises(TokenMergeError, match="fewer_tokens takes a patch transformer"):
        work.fewer_tokens(0.5)


@pytest.mark.parametrize("name", MODERN_TINY)
def test_meta_counts_of_the_token_floor(name: str) -> None:
    op_counts = _script("op_counts")
    spec = get_arch(name)
    _title, rows = op_counts.profile_rows(name, spec.resolution, spec.batch, (), fewer=(0.5,))
    plain, floor = rows
    assert plain.label == "plain" and floor.label == "token floor 50%"
    assert floor.total == plain.total  # the same model on fewer tokens: the same operators
    assert 0 < floor.flops < plain.flops


def test_meta_counts_of_a_merge_and_its_ideal() -> None:
    op_counts = _script("op_counts")
    _title, rows = op_counts.profile_rows("dit-xl-2-tiny", 128, 2, ("block:0.5",), fewer=(0.5,))
    by_label = {row.label: row for row in rows}
    plain, merged, ideal = by_label["plain"], by_label["block r=0.5"], by_label["ideal@block r=0.5"]
    assert plain.flops > merged.flops >= ideal.flops
    assert ideal.total <= merged.total and merged.layers > 0 and ideal.ideal_of == merged.label
    floor = by_label["token floor 50%"] if "token floor 50%" in by_label else None
    assert floor is None  # the token floor is a row of the newer families only


LABELS = {"tomesd:0.5": "ToMeSD(0.5)", "todo:2": "ToDo(2)", "block:0.5": "block r=0.5"}


@pytest.mark.parametrize(
    ("name", "methods"),
    [
        ("flux-dev-tiny", ("tomesd:0.5", "todo:2", "block:0.5")),
        ("sd35-medium-tiny", ("tomesd:0.5", "todo:2", "block:0.5")),
        ("wan-1.3b-tiny", ("tomesd:0.5", "tomesd:0.5,st=2", "block:0.5")),
    ],
)
def test_meta_counts_of_merges_and_their_ideals(name: str, methods: tuple[str, ...]) -> None:
    op_counts = _script("op_counts")
    spec = get_arch(name)
    _title, rows = op_counts.profile_rows(name, spec.resolution, spec.batch, methods, fewer=(0.5,))
    by_label = {row.label: row for row in rows}
    plain, floor = by_label["plain"], by_label["token floor 50%"]
    for label in (LABELS.get(m, "ToMeSD(0.5, st=2)") for m in methods):
        merged, ideal = by_label[label], by_label[f"ideal@{label}"]
        assert merged.ops is not None and ideal.ops is not None, (merged.note, ideal.note)
        assert plain.flops > merged.flops >= ideal.flops >= floor.flops, label
        assert merged.total > plain.total and merged.layers > 0


def test_meta_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    op_counts = _script("op_counts")
    args = ["--arch", "wan-1.3b-tiny", "--methods", "catome:0.7", "--markdown"]
    assert op_counts.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == op_counts.MARKDOWN_HEADER[0]
    body = lines[3:]
    assert body[0].startswith("| wan-1.3b-tiny 64px batch 1 bfloat16 | plain |")
    assert any("| token floor 50% |" in line for line in body)
    assert len(body) >= 3  # plain, the floor, and CAToMe's row (counted, refused or n/a on meta)


def test_gpu_sections_of_the_newer_families() -> None:
    gpu_table = _script("gpu_table")
    modern = {s.name: s for s in gpu_table.SECTION_SETS["modern"]}
    assert set(modern) == {"flux-dev-1024", "sd35-medium-1024", "wan-1.3b-480p"}
    assert all(s.dtype == "bfloat16" and s.mode == "default" for s in modern.values())
    dry = gpu_table.dry_sections(list(modern.values()))
    assert [s.arch for s in dry] == ["flux-dev-tiny", "sd35-medium-tiny", "wan-1.3b-tiny"]
    assert all(s.dtype == "bfloat16" for s in dry)
    names = {name for name, _ in gpu_table.PRIORITY}
    assert set(modern) <= names


QUICK = {"warmup": 1, "repeats": 1, "schedule": 2, "sample_steps": 2, "progress": False}


@pytest.mark.parametrize("name", MODERN_TINY)
def test_bench_rows_of_the_tiny_variants(name: str) -> None:
    from tokenmerge.tools.bench import run_bench

    result = run_bench(name, None, compile_modes=["eager"], stream=io.StringIO(), inputs="smooth", **QUICK)
    rows = {row.method: row for row in result.rows}
    assert set(rows) == {"plain", "ToMeSD(0.5)", "block r=0.5", "ideal@ToMeSD(0.5)", "ideal@block r=0.5"}
    assert all(row.ok for row in rows.values()), [row.status for row in rows.values()]
    for label in ("ToMeSD(0.5)", "block r=0.5"):
        merged = rows[label]
        assert 0 < merged.merged <= 0.5 and merged.rel_l2 > 0 and merged.psnr_db is not None
        assert rows[f"ideal@{label}"].merged == pytest.approx(merged.merged, abs=0.02)


def test_gpu_script_dry_run_of_a_modern_section(tmp_path: Path) -> None:
    gpu_table = _script("gpu_table")
    argv = ["--dry-run", "--sections", "wan-1.3b-480p", "--out", str(tmp_path), "--repeats", "1"]
    assert gpu_table.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["runs"]
    assert run["meta"]["arch"] == "wan-1.3b-tiny" and run["meta"]["dtype"] == "torch.bfloat16"
    rows = {(row["mode"], row["method"]): row for row in run["rows"]}
    for mode in ("eager", "default"):  # eager and compiled, plain and merged, and the ideals
        assert {(mode, m) for m in ("plain", "ToMeSD(0.5)", "block r=0.5", "ideal@block r=0.5")} <= set(rows)
    assert all(row["status"] == "ok" for row in rows.values()), [row["status"] for row in rows.values()]
    assert (tmp_path / "wan-1.3b-480p.png").is_file()
