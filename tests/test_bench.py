"""`tokenmerge bench` on tiny CPU models: rows, derived figures, JSON, plot, command line, GPU script.

No test asserts a speed: CPU timings of tiny models say nothing. They check that every row
kind runs, that the figures are derived consistently, and that the outputs are written.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.tools.bench import BenchRow, RowTimeout, _watchdog, format_table, run_bench
from tokenmerge.tools.bench_methods import merged_fraction, parse_method
from tokenmerge.tools.bench_models import INPUT_KINDS, Workload, build_model, get_arch, smooth_noise

ROOT = Path(__file__).resolve().parent.parent

#: sd15's structure cut to two levels: the top level merges; dynamo and the CPU stay quick.
SMALL_UNET = dataclasses.replace(
    get_arch("sd15-tiny"),
    name="sd15-small",
    config={
        **get_arch("sd15-tiny").config,
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
)

QUICK = {"warmup": 1, "repeats": 2, "schedule": 3, "sample_steps": 2, "progress": False}


def _rows(result: object, mode: str) -> dict[str, BenchRow]:
    return {row.method: row for row in result.rows if row.mode == mode}  # type: ignore[attr-defined]


def test_unet_rows_fidelity_ideals_tomesd_json_and_plot(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_bench(
        SMALL_UNET,
        ["tomesd:0.5", "catome:0.3,recompute_at=0/2,buckets=4"],
        resolution=64,
        compile_modes=["eager"],
        json_path=str(tmp_path / "bench.json"),
        plot_path=str(tmp_path / "bench.png"),
        stream=out,
        **QUICK,
    )
    rows = _rows(result, "eager")
    assert set(rows) == {
        "plain",
        "ToMeSD(0.5)",
        "CAToMe(0.3, recompute_at=0/2, buckets=4)",
        "tomesd lib r=0.5",
        "ideal@ToMeSD(0.5)",
        "ideal@CAToMe(0.3, recompute_at=0/2, buckets=4)",
    }
    assert all(row.ok for row in rows.values()), [row.status for row in rows.values()]
    plain, tomesd, catome = rows["plain"], rows["ToMeSD(0.5)"], rows["CAToMe(0.3, recompute_at=0/2, buckets=4)"]
    assert plain.speedup == pytest.approx(1.0) and plain.rel_l2 == 0.0
    assert 0 < tomesd.rel_l2 < 1 and math.isfinite(tomesd.psnr_db) and tomesd.merged == pytest.approx(0.5)
    assert tomesd.speedup == pytest.approx(plain.time_ms / tomesd.time_ms)
    ideal = rows["ideal@ToMeSD(0.5)"]
    assert tomesd.ideal_label == ideal.method and ideal.merged == pytest.approx(0.5)
    expected_overhead = (tomesd.time_ms - ideal.time_ms) / (plain.time_ms - ideal.time_ms)
    assert tomesd.overhead == pytest.approx(expected_overhead)
    assert rows["tomesd lib r=0.5"].ideal_label == ideal.method  # the library row is compared to the same ideal
    assert catome.calls == 3 and "whole schedules" in catome.note  # timed over whole schedules, the mean
    # Operator counts (launches on a GPU): merging adds some, the ideal nearly none.
    assert plain.ops is not None and ideal.ops is not None and tomesd.ops is not None
    assert plain.ops <= ideal.ops < tomesd.ops
    assert catome.time_ms == pytest.approx(catome.mean_ms)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["arch"] == "sd15-small" and len(data["rows"]) == 6
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.getvalue()
    assert "ideal@ToMeSD(0.5)" in table and "overhead" in table and "PSNR dB" in table


def test_vit_rows_compiled_without_breaks() -> None:
    result = run_bench(
        "vit-tiny",
        ["tome:4"],
        compile_modes=["eager", "reduce-overhead"],
        backend="eager",
        print_table=False,
        **QUICK,
    )
    assert all(row.ok for row in result.rows), [(row.mode, row.method, row.status) for row in result.rows]
    for mode in ("reduce-overhead",):
        rows = _rows(result, mode)
        assert set(rows) == {"plain", "ToMe(4)", "ideal@ToMe(4)"}
        merged = rows["ToMe(4)"]
        assert (merged.graphs, merged.breaks, merged.recompiles_in_timing) == (1, 0, 0)
        assert merged.compiled_vs_eager == pytest.approx(0.0, abs=1e-5)  # compiled equals eager
        assert merged.agree is not None and merged.speedup_vs_eager is not None and merged.overhead is not None


def test_dit_block_range_and_time_budget() -> None:
    result = run_bench("dit-xl-2-tiny", ["block:0.5"], resolution=64, compile_modes=["eager"], **QUICK)
    rows = _rows(result, "eager")
    assert rows["block r=0.5"].ok and rows["block r=0.5"].merged == pytest.approx(0.5)
    skipped = run_bench("vit-tiny", ["tome:2"], time_budget_s=0.0, compile_modes=["eager"], **QUICK)
    assert {row.status for row in skipped.rows} == {"skipped: time budget"}


def test_command_line_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenmerge.tools.cli import main

    path = tmp_path / "vit.json"
    argv = ["bench", "--arch", "vit-tiny", "--methods", "tome:2", "--no-compile", "--repeats", "1"]
    argv += ["--warmup", "1", "--no-progress", "--json", str(path)]
    assert main(argv) == 0
    assert "ToMe(2)" in capsys.readouterr().out
    assert {row["method"] for row in json.loads(path.read_text())["rows"]} == {"plain", "ToMe(2)", "ideal@ToMe(2)"}


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(TokenMergeError, match="arch must be one of"):
        run_bench("sd16", compile_modes=["eager"], **QUICK)
    with pytest.raises(TokenMergeError, match="compile_modes must be"):
        run_bench("vit-tiny", compile_modes=["max-autotune"], **QUICK)
    with pytest.raises(TokenMergeError, match="tomesd rows need a UNet"):
        run_bench("vit-tiny", tomesd=[0.5], compile_modes=["eager"], **QUICK)
    with pytest.raises(TokenMergeError, match="method name must be one of"):
        parse_method("tomesd2:0.5")
    with pytest.raises(TokenMergeError, match="ratio must be at most 0.75"):
        parse_method("tomesd:0.9")
    with pytest.raises(TokenMergeError, match="inputs must be one of"):
        run_bench("vit-tiny", inputs="images", compile_modes=["eager"], **QUICK)
    with pytest.raises(TokenMergeError, match="resolution for vit-tiny must be a positive multiple of 16"):
        run_bench("vit-tiny", resolution=70, compile_modes=["eager"], **QUICK)


def test_method_specs_build_the_presets() -> None:
    assert parse_method("tomesd:0.5,max_downsample=2").build(None).max_downsample == 2  # type: ignore[misc]
    catome = parse_method("catome:0.7,buckets=4,recompute_at=0/10")
    config = catome.build(None)  # type: ignore[misc]
    assert catome.stateful and config.threshold.buckets == 4 and config.cache.steps == (0, 10)
    assert not parse_method("tome:13").stateful
    assert parse_method("todo:2").build(None).kv_only  # type: ignore[misc]


def test_smooth_inputs_make_a_threshold_merge_on_random_weights() -> None:
    spec = get_arch("sd15-tiny")
    model = build_model(spec, 64, device=torch.device("cpu"), dtype=torch.float32)
    merged = {}
    for kind in INPUT_KINDS:
        work = Workload(spec, model, 2, 64, torch.device("cpu"), torch.float32, schedule=2, inputs=kind)
        handle = tokenmerge.apply(model, tokenmerge.CAToMe(0.7))
        try:
            with torch.no_grad():
                work.step(model, 0)
            merged[kind] = merged_fraction(dict(handle.state.merged_tokens))
        finally:
            handle.remove()
    assert merged["smooth"] > 0.5 > merged["noise"]  # i.i.d. noise on random weights: few similar tokens
    field = smooth_noise((2, 4, 32, 32), torch.Generator().manual_seed(0))
    assert field.shape == (2, 4, 32, 32)
    assert torch.allclose(field.std(dim=(2, 3)), torch.ones(2, 4), atol=1e-4)
    neighbours = torch.corrcoef(torch.stack([field[..., :-1].flatten(), field[..., 1:].flatten()]))[0, 1]
    assert neighbours > 0.9
    with pytest.raises(TokenMergeError, match="inputs must be one of"):
        Workload(spec, model, 2, 64, torch.device("cpu"), torch.float32, inputs="images")


def test_watchdog_stops_a_row_that_runs_too_long() -> None:
    with pytest.raises(RowTimeout):
        with _watchdog(0.05):
            time.sleep(2)
    with _watchdog(5.0):  # and lets a quick one finish
        pass


def test_table_shows_infinite_psnr_and_skips() -> None:
    row = BenchRow("a", 64, 2, "float32", "eager", "plain", "plain", "plain", time_ms=1.0, psnr_db=math.inf)
    skipped = BenchRow("a", 64, 2, "float32", "default", "x", "tokenmerge", "x", status="skipped: time budget")
    table = format_table([row, skipped])
    assert "inf" in table and "skipped: time budget" in table


def test_gpu_script_dry_run_section(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_table.main(["--dry-run", "--sections", "vit-b16", "--out", str(tmp_path), "--repeats", "1"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["checks"]["triton"]["device"] == "cpu"
    timed = data["checks"]["attention"]["ms"]
    assert isinstance(timed["N=197 no mask"], float) and isinstance(timed["N=184 mask"], float)
    assert "N=184 mask, math only" in timed
    rows = data["runs"][0]["rows"]
    assert data["runs"][0]["meta"]["inputs"] == "smooth"
    assert {(row["mode"], row["method"]) for row in rows} >= {
        ("eager", "ToMe(13)"),
        ("default", "ToMe(13)"),
        ("eager", "ToMe(13, prop_attn=0)"),
    }
    assert all(row["status"] == "ok" for row in rows)
    assert (tmp_path / "all.png").is_file()


def _benchmark_script(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_operator_counts_of_full_size_models_on_the_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    op_counts = _benchmark_script("op_counts")
    assert op_counts.main(["--arch", "vit-b16", "--batch", "2", "--methods", "tome:13"]) == 0
    lines = capsys.readouterr().out.splitlines()
    plain = int(lines[1].split("plain ")[1].split()[0])
    merged = next(line for line in lines if line.strip().startswith("ToMe(13)"))
    ideal = next(line for line in lines if line.strip().startswith("ideal@ToMe(13)"))
    merged_ops, ideal_ops = int(merged.split()[1]), int(ideal.split()[1])
    assert plain < ideal_ops < merged_ops  # the ideal only slices; ToMe also matches
    assert "per merging layer (12)" in merged
    # ViT-B/16 at r = 13: about 59 % of the plain FLOPs (the exact figure is in BENCHMARKS.md)
    ratio = float(merged.split("FLOP ratio ")[1].split("x")[0])
    assert 1.6 < ratio < 1.8 and "FLOP ratio" in ideal


def test_zoo_step_profile_runs(capsys: pytest.CaptureFixture[str]) -> None:
    zoo_step_profile = _benchmark_script("zoo_step_profile")
    assert zoo_step_profile.main(["--model", "dit-photos", "--repeats", "1", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "plain:" in out and "tokenmerge ToMeSD(0.5):" in out and "Self CPU" in out


def test_merge_forms_script_times_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    merge_forms = _benchmark_script("merge_forms")
    assert merge_forms.main(["--shapes", "2x17x8x3", "--repeats", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("B=2 N=17 C=8 r=3: index ") and "matrix/index" in line


@pytest.mark.parametrize(("arch", "resolution"), [("hf-vit-b16", 64), ("eva02-b14", 112)])
def test_vit_b_sized_encoders_of_other_families_bench_with_their_ideal(arch: str, resolution: int) -> None:
    """transformers' ViTModel and timm's EVA-02 (rotary) at ViT-B size: ToMe against plain and its ideal."""
    result = run_bench(arch, ["tome:1"], resolution=resolution, batch=1, compile_modes=["eager"], **QUICK)
    rows = _rows(result, "eager")
    assert set(rows) == {"plain", "ToMe(1)", "ideal@ToMe(1)"}
    assert all(row.ok for row in rows.values()), [(row.method, row.status) for row in rows.values()]
    assert rows["ToMe(1)"].merged is not None and rows["ToMe(1)"].merged > 0
    assert rows["ideal@ToMe(1)"].merged == pytest.approx(rows["ToMe(1)"].merged)
