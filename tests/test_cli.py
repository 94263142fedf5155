"""The ``tokenmerge`` command: help everywhere, one-line user errors with status 2, a working demo."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmerge import TokenMergeError
from tokenmerge.tools import cli, common, demo

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def test_demo_is_a_command() -> None:
    assert "demo" in _commands()


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in _commands())], ids=lambda a: " ".join(a))
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokenmerge")
    if argv == ["--help"]:
        for command in _commands():
            assert command in out


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        status = cli.main(argv)
        raise SystemExit(status)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--models", "unet,resnet"], "unknown resnet; choose from unet, dit, vit"),
        (["demo", "--presets", ""], "must name at least one of"),
        (["demo", "--repeats", "0"], "must be a positive integer; got '0'"),
        (["demo", "--steps", "two"], "must be a positive integer; got 'two'"),
        (["demo", "--device", "tpu"], "must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
        (["demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argument_errors_are_one_line_status_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line_error(capsys, argv)
    assert expected in line
    assert line.startswith("tokenmerge")


def test_tokenmerge_error_is_one_line_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    # No machine has 100 GPUs: resolve_device raises TokenMergeError, main turns it into one line.
    line = _one_line_error(capsys, ["demo", "--device", "cuda:99", "--no-progress"])
    assert line.startswith("tokenmerge: error: device must be")


def test_missing_optional_dependency_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def run(args: object) -> int:
        raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")

    monkeypatch.setattr(cli, "_run_demo", run)
    line = _one_line_error(capsys, ["demo"])
    assert line == "tokenmerge: error: this command needs diffusers: pip install 'tokenmerge[diffusers]'"


def test_other_bugs_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(args: object) -> int:
        raise ModuleNotFoundError("No module named 'tokenmerge.nothing'", name="tokenmerge.nothing")

    monkeypatch.setattr(cli, "_run_demo", run)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo"])


def test_python_dash_m_tokenmerge() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "tokenmerge", "demo", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tokenmerge demo")
    bad = subprocess.run(
        [sys.executable, "-m", "tokenmerge", "demo", "--repeats", "-1"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1


def test_summarize_tokens() -> None:
    assert demo.summarize_tokens({}) == "nothing merged"
    assert demo.summarize_tokens({"a": (65, 57), "b": (57, 49), "c": (49, 41)}) == "65→57→49→41"
    assert demo.summarize_tokens({"a": (1024, 512), "b": (1024, 512), "c": (256, 128)}) == "1024→512 ×2, 256→128"
    assert demo.summarize_tokens({"a": (1024, 600), "b": (1024, 700)}) == "1024→600..700 ×2"


def test_demo_runs_every_model_and_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, grid = tmp_path / "groups.png", tmp_path / "images.png"
    argv = ["demo", "--device", "cpu", "--steps", "2", "--repeats", "1", "--no-progress"]
    status = cli.main([*argv, "--out", str(out), "--grid", str(grid)])
    assert status == 0 and grid.exists()
    text = capsys.readouterr().out
    for title in ("UNet", "DiT", "ViT"):
        assert title in text
    for preset in ("ToMeSD", "CAToMe", "ToDo", "ToMe"):
        assert f"\n{preset} " in text
    assert "tokens per merged layer" in text and "vs plain" in text
    assert "nothing merged" not in text  # every preset merged something in every model
    assert f"wrote {out.resolve()}" in text
    with Image.open(out) as picture:
        # photo, r=8, r=12 with gaps, scaled 2x, under the strip of labels
        assert picture.size == (2 * (3 * 224 + 2 * 6), 2 * 224 + demo.LABEL_HEIGHT)
    assert "UNet: 1 rounds of" in text and "ViT: 3 rounds of" in text


SAMPLE = ROOT / "tokenmerge" / "tools" / "assets" / "sample.png"


def test_visualize_writes_the_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "groups.png"
    assert cli.main(["visualize", str(SAMPLE), "--r", "10", "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out.resolve()}"
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    label = demo.LABEL_HEIGHT  # the strip naming each panel
    assert pixels.shape == (2 * 224 + label, 2 * (2 * 224 + 6), 3)
    photo, groups = pixels[label:, : 2 * 224], pixels[label:, 2 * 230 :]
    strip = pixels[:label, 2 * 230 :]
    assert (strip < 128).any()  # the label is written
    assert not np.array_equal(photo, groups)
    assert len(np.unique(groups.reshape(-1, 3), axis=0)) < len(np.unique(photo.reshape(-1, 3), axis=0))


def test_visualize_default_output_beside_the_image(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(SAMPLE.read_bytes())
    assert cli.main(["visualize", str(image), "--r", "4"]) == 0
    assert (tmp_path / "photo-merged.png").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["visualize", "no-such-image.png"], "IMAGE must be an existing image file; got 'no-such-image.png'"),
        (["visualize", str(ROOT / "README.md")], "IMAGE must be an image file Pillow can read"),
        (["visualize", str(SAMPLE), "--arch", "resnet18"], "arch must be a timm Vision Transformer"),
        (["visualize", str(SAMPLE), "--arch", "no_such_model"], "Unknown model (no_such_model)"),
        (["visualize", str(SAMPLE), "--checkpoint", "missing.pth"], "--checkpoint must be an existing file"),
        (["visualize", str(SAMPLE), "--r", "-3"], "must be an integer >= 0; got '-3'"),
    ],
)
def test_visualize_user_errors(argv: list[str], expected: str, tmp_path: Path, capsys) -> None:
    line = _one_line_error(capsys, [*argv, "--out", str(tmp_path / "x.png")])
    assert expected in line
    assert not (tmp_path / "x.png").exists()


def test_run_demo_results(capsys: pytest.CaptureFixture[str]) -> None:
    results = demo.run_demo(
        models=["dit"], presets=["ToMeSD", "ToMe"], device="cpu", steps=1, repeats=1, progress=False, zoo=False
    )
    (result,) = results
    assert [row.preset for row in result.rows] == ["plain", "ToMeSD"]  # ToMe is not offered for the DiT
    plain, merged = result.rows
    assert plain.speedup == 1.0 and plain.fidelity == pytest.approx(1.0, abs=1e-12)
    assert merged.tokens == "256→128 ×4"
    assert 0.9 < merged.fidelity < 1.0
    assert merged.plans == "4/0"  # one step, four blocks, plans counted for the last job only
    assert "random weights" in result.model.setup
    assert "cosine to plain" in capsys.readouterr().out


def test_zoo_model_is_used_only_where_its_weights_are(tmp_path: Path) -> None:
    assert not demo.zoo_weights_ready("dit-photos", tmp_path)  # an empty folder holds no weights
    model = demo.build_model("dit", "cpu", steps=1, weights_dir=tmp_path)
    assert "random weights" in model.setup and model.fidelity is demo.COSINE and not model.makes_images
    assert all("cpu" in devices for _, devices in demo.ZOO_MODELS.values())  # both trained models run on a CPU


def test_demo_command_writes_the_image_grid_and_the_token_groups(tmp_path: Path, capsys) -> None:
    grid, groups = tmp_path / "grid.png", tmp_path / "groups.png"
    argv = ["demo", "--models", "dit,vit", "--presets", "ToMeSD,ToDo,ToMe", "--device", "cpu", "--steps", "2"]
    assert cli.main([*argv, "--repeats", "1", "--no-progress", "--out", str(groups), "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {grid.resolve()}" in out and f"wrote {groups.resolve()}" in out
    assert "tokenmerge.tools.zoo 'dit-photos' (trained)" in out and "PSNR vs plain" in out
    with Image.open(grid) as image:
        width, height = image.size
    # One block (the DiT; the ViT makes no images): plain + ToMeSD + ToDo rows of 4 images of 128 px.
    assert height >= 3 * 128 and width >= 4 * 128
    assert Image.open(groups).size[0] > Image.open(groups).size[1]


def test_image_grid_holds_each_presets_images(tmp_path: Path) -> None:
    results = demo.run_demo(
        models=["dit"], presets=["ToMeSD"], device="cpu", steps=1, repeats=1, progress=False, grid=tmp_path / "g.png"
    )
    (result,) = results
    plain, merged = result.rows
    assert plain.images is not None and merged.images is not None
    assert plain.images.shape == (len(demo.ZOO_CLASSES), 3, 64, 64)
    assert result.model.image_names == demo.ZOO_CLASSES
    assert not torch.equal(plain.images, merged.images)  # merging changed the images, a little
    picture = np.asarray(Image.open(tmp_path / "g.png"))
    assert picture.shape == demo.generated_images_grid(results).shape
    # The plain row's first image is in the grid, enlarged 2x, where the layout puts it.
    first = (plain.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
    found = any(np.array_equal(picture[y : y + 128, 190 : 190 + 128], first) for y in range(picture.shape[0] - 127))
    assert found


def test_no_grid_without_a_trained_model(tmp_path: Path, capsys) -> None:
    results = demo.run_demo(models=["vit"], device="cpu", repeats=1, progress=False, grid=tmp_path / "g.png")
    assert demo.generated_images_grid(results) is None
    assert not (tmp_path / "g.png").exists()


def test_fidelity_measures() -> None:
    import torch

    images = torch.rand(2, 3, 8, 8)
    assert demo.PSNR.measure is common.psnr  # the one PSNR (tests/test_tools_common.py)
    assert demo.PSNR.measure(images, images) == float("inf")
    assert demo.PSNR.format(31.25) == "31.2 dB" and demo.COSINE.format(0.99996) == "1.0000"
    assert demo.cosine_to_reference(images, 2 * images) == pytest.approx(1.0)


def test_run_demo_rejects_unknown_names() -> None:
    with pytest.raises(TokenMergeError, match="models must be among"):
        demo.run_demo(models=["resnet"], progress=False)


def test_speed_is_the_median_of_ratios_within_rounds() -> None:
    # Round 3 was disturbed for both runs alike: the ratio within the round stays 2x.
    speed = demo.speed_of([1.0, 1.0, 5.0, 1.0, 1.0], [0.5, 0.5, 2.5, 0.5, 0.5])
    assert speed.speedup == pytest.approx(2.0) and speed.spread == pytest.approx(0.0)
    assert speed.seconds == pytest.approx(0.5)
    # One round of five far off is left out of the spread; two are not.
    assert demo.speed_of([1.0] * 5, [0.5, 0.5, 0.5, 0.5, 2.0]).speedup == pytest.approx(2.0)
    unstable = demo.speed_of([1.0] * 5, [0.5, 0.5, 0.5, 1.0, 1.0])
    assert unstable.speedup is None and unstable.spread > demo.STABLE_SPREAD


def test_interleaved_times_alternate_runs_within_each_round() -> None:
    import torch

    calls: list[str] = []
    runs = [
        (lambda: calls.append("enter a"), lambda: calls.append("a"), lambda: calls.append("leave a")),
        (lambda: calls.append("enter b"), lambda: calls.append("b"), lambda: calls.append("leave b")),
    ]
    times = demo.interleaved_times(runs, torch.device("cpu"), rounds=2)
    assert [len(t) for t in times] == [2, 2] and all(s >= 0 for t in times for s in t)
    assert calls == ["enter a", "a", "leave a", "enter b", "b", "leave b"] * 2


def test_unstable_speedup_is_left_out_with_a_reason(monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "STABLE_SPREAD", -1.0)  # nothing counts as stable
    monkeypatch.setattr(demo, "speed_of", lambda p, t, spread_limit=-1.0: demo.Speed(0.1, None, 0.5))
    results = demo.run_demo(models=["vit"], device="cpu", repeats=1, progress=False, zoo=False)
    out = capsys.readouterr().out
    assert results[0].rows[1].speedup is None
    assert "not stable*" in out and "* not stable: the rounds' speed-ups spread by more than" in out


def test_cpu_threads_follow_the_free_cores(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo, "busy_cores", lambda window_s=0.3: 1.2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert demo.cpu_threads_for_load(torch.device("cpu")) == (1, 1.2)
    monkeypatch.setattr(demo, "busy_cores", lambda window_s=0.3: 0.1)
    assert demo.cpu_threads_for_load(torch.device("cpu")) == (2, 0.1)
    assert demo.cpu_threads_for_load(torch.device("cuda"))[1] is None


@pytest.mark.parametrize("command", ["bench", "fidelity"])
def test_bench_and_fidelity_help_show_every_default(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--full" in text
    for dest, value in cli.QUICK_DEFAULTS[command].items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert f"(default: {shown} on a CPU, " in text, dest
    assert "%(default)" not in text and "callss)" not in text


@pytest.mark.parametrize(
    ("command", "module", "run", "dest", "quick", "full"),
    [
        ("bench", "tokenmerge.tools.bench", "bench_main", "repeats", 5, 20),
        ("fidelity", "tokenmerge.tools.fidelity", "fidelity_main", "seeds", 1, 4),
    ],
)
def test_cpu_takes_the_quick_defaults_unless_full(command, module, run, dest, quick, full, monkeypatch, capsys):
    import importlib

    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(importlib.import_module(module), run, lambda args: seen.append(args) or 0)
    assert cli.main([command, "--device", "cpu"]) == 0
    assert getattr(seen[-1], dest) == quick
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"tokenmerge {command}: CPU sizes (") and "--full" in line and len(line.splitlines()) == 1
    assert cli.main([command, "--device", "cpu", "--full"]) == 0
    assert getattr(seen[-1], dest) == full and capsys.readouterr().err == ""
    assert cli.main([command, "--device", "cpu", f"--{dest}", "7"]) == 0
    assert getattr(seen[-1], dest) == 7  # what the user sets stays


def test_bench_reports_a_line_per_row_as_it_goes() -> None:
    from tokenmerge.tools import bench

    lines: list[str] = []
    result = bench.run_bench(
        "sd15-tiny",
        ["tomesd:0.5"],
        device="cpu",
        compile_modes=["eager"],
        warmup=0,
        repeats=1,
        schedule=1,
        fidelity=False,
        ideal=False,
        tomesd=[],
        progress=False,
        print_table=False,
        log=lines.append,
    )
    assert len(lines) == len(result.rows) == 2
    assert lines[0].startswith("sd15-tiny eager plain: ") and " ms" in lines[0]
    assert lines[1].startswith("sd15-tiny eager ToMeSD(0.5): ")


def test_visualize_without_a_merge_record_is_a_clear_error() -> None:
    from tokenmerge.tools import vis

    with pytest.raises(TokenMergeError, match="record must be the merge record of a forward: call"):
        vis.visualize(np.zeros((32, 32, 3), dtype=np.uint8), None)  # merge_record after the with block
