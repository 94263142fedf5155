"""The Flux and Wan examples run end to end on their tiny pipelines (``--tiny``), and check their options."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.usefixtures("diffusers_one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # for their shared _diffusion_common module
    spec = importlib.util.spec_from_file_location(f"tokenmerge_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: (example, options, shape of the returned images: Wan's are its frames, B * F of them)
RUNS = [
    ("flux", ["--method", "tomesd", "--ratio", "0.5"], (1, 3, 64, 64)),
    ("flux", ["--method", "tomesd", "--ratio", "0.5", "--blocks", "1,2", "--batch", "2"], (2, 3, 64, 64)),
    ("wan", ["--method", "tomesd", "--ratio", "0.5"], (5, 3, 32, 32)),
    ("wan", ["--method", "tomesd", "--ratio", "0.5", "--blocks", "0,1"], (5, 3, 32, 32)),
    ("wan", ["--method", "tomesd", "--ratio", "0.5", "--st", "2"], (5, 3, 32, 32)),
    ("wan", ["--method", "todo", "--downsample", "2"], (5, 3, 32, 32)),
]


@pytest.mark.parametrize(("name", "options", "shape"), RUNS, ids=[f"{n}-{' '.join(o[:4])}" for n, o, _ in RUNS])
def test_example_runs_on_its_tiny_pipeline(name, options, shape, monkeypatch, tmp_path, capsys):
    example = load_example(name, monkeypatch)
    argv = ["--tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), *options]
    result = example.main(argv)
    printed = capsys.readouterr().out
    assert "plain:" in printed and "merged:" in printed and "speedup:" in printed and "PSNR" in printed
    assert result["plain"].shape == result["merged"].shape == shape
    assert torch.isfinite(result["merged"]).all()
    assert not torch.equal(result["plain"], result["merged"])
    assert 0 < result["psnr_db"] < float("inf")
    tokens = result["merging"]["tokens"]
    assert tokens and all(n_out < n_in for n_in, n_out in tokens.values())
    assert len(list(tmp_path.glob("merged_*.png"))) == shape[0]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("flux", ["--size", "72"], "--size must be a multiple of 16"),
        ("wan", ["--frames", "6"], "--frames 4k \\+ 1"),
        ("wan", ["--width", "40"], "multiples of 16"),
    ],
)
def test_example_refuses_sizes_the_model_cannot_take(name, options, message, monkeypatch, capsys):
    example = load_example(name, monkeypatch)
    with pytest.raises(SystemExit):
        example.main(["--tiny", *options])
    assert message.replace("\\", "") in capsys.readouterr().err


def test_checkpoints_default_to_the_published_ids(monkeypatch):
    flux, wan = load_example("flux", monkeypatch), load_example("wan", monkeypatch)
    assert "black-forest-labs/FLUX.1-dev" in flux.__doc__ and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in wan.__doc__
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    import argparse

    args = argparse.Namespace(dtype=None)
    assert flux.pick_dtype(args, cuda) == wan.pick_dtype(args, cuda) == torch.bfloat16
    assert flux.pick_dtype(args, cpu) == torch.float32


@pytest.mark.parametrize(
    ("page", "printed"),
    [
        ("flux", ["'single_transformer_blocks.0': (23, 15)", "{'transformer_blocks.1-2': (16, 8)}"]),
        ("wan", ["{'blocks.0': (48, 24), 'blocks.1': (48, 24)}", "{'blocks.0-1': (48, 24)}"]),
    ],
)
def test_tutorial_code_on_the_tiny_pipeline_runs(page, printed, capsys):
    """The tutorial's sections before the real checkpoint run as written, and print what they say."""
    import re

    text = (EXAMPLES.parent / "docs" / "tutorials" / f"{page}.md").read_text(encoding="utf-8")
    tiny_part = text.split("## 3.")[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", tiny_part, re.S))
    exec(compile(code, f"docs/tutorials/{page}.md", "exec"), {})  # noqa: S102 - the page's own code
    out = capsys.readouterr().out
    for expected in printed:
        assert expected in out
    assert " dB" in out
