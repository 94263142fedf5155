"""The diffusers examples run end to end on their tiny pipelines (``--tiny``)."""

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


RUNS = [
    ("sd", ["--method", "tomesd", "--ratio", "0.5", "--merge-mlp"], (1, 3, 16, 16)),
    ("sd", ["--method", "catome", "--threshold", "0.3", "--recompute-at", "0,2", "--batch", "2"], (2, 3, 16, 16)),
    ("sdxl", ["--method", "tomesd", "--ratio", "0.5"], (1, 3, 16, 16)),
    ("sdxl", ["--method", "todo", "--downsample", "2"], (1, 3, 16, 16)),
    ("dit", ["--method", "tomesd", "--classes", "1,2,3", "--batch", "3"], (3, 3, 16, 16)),
    ("dit", ["--method", "tomesd", "--blocks", "1,2"], (1, 3, 16, 16)),
    ("pixart", ["--method", "todo"], (1, 3, 128, 128)),
    ("pixart", ["--method", "catome", "--threshold", "0.3", "--blocks", "0,3"], (1, 3, 128, 128)),
]


@pytest.mark.parametrize(("name", "options", "shape"), RUNS, ids=[f"{n}-{' '.join(o[:2])}" for n, o, _ in RUNS])
def test_example_runs_on_its_tiny_pipeline(name, options, shape, monkeypatch, tmp_path, capsys):
    example = load_example(name, monkeypatch)
    argv = ["--tiny", "--steps", "3", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), *options]
    result = example.main(argv)
    printed = capsys.readouterr().out
    assert "plain:" in printed and "merged:" in printed and "speedup:" in printed
    assert result["plain"].shape == result["merged"].shape == shape
    assert torch.isfinite(result["merged"]).all()
    assert not torch.equal(result["plain"], result["merged"])
    assert result["plain_s"] > 0 and result["merged_s"] > 0
    tokens = result["merging"]["tokens"]
    assert tokens and all(n_out < n_in for n_in, n_out in tokens.values())
    assert len(list(tmp_path.glob("merged_*.png"))) == shape[0]


def test_catome_default_steps_follow_the_paper_rescaled(monkeypatch):
    common = load_example("_diffusion_common", monkeypatch)
    import argparse

    parser = argparse.ArgumentParser()
    common.add_arguments(parser, model="m", steps=50, size=512)
    config = common.build_config(parser.parse_args(["--method", "catome"]))
    assert config.cache.steps == (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49)
    config = common.build_config(parser.parse_args(["--method", "catome", "--steps", "25"]))
    assert config.cache.steps == (0, 4, 6, 10, 12, 15, 18, 22, 23, 24)
