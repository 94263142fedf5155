"""Every script in examples/ runs: ``--help``, and its tiny-model path.

Examples are discovered, so a new one is covered without editing this file. Its tiny
path is, in this order of preference:

1. ``--tiny``, when the example's ``--help`` offers it;
2. the arguments in a module-level ``TINY_ARGS = [...]`` literal of the script (read
   without importing it); ``{tmp}``, ``{images}`` and ``{photos}`` in them are replaced by
   a temporary folder, a generated ImageNet-style image folder and a generated .npz of
   photographs for ``tokenmerge.tools.zoo`` training;
3. the entry for the script in `TINY_PATHS` below (for examples that declare neither).

An example with none of these fails the test, saying so. Each runs in a fresh
interpreter in a temporary folder (whatever it writes lands there), with the repository
on ``PYTHONPATH`` and the Hugging Face hub offline.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


#: A tiny timm ViT: 32 px images, 4 px patches, width 32, two blocks.
_TINY_VIT = json.dumps({"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 2})
#: Tiny paths of the examples that offer no ``--tiny`` and declare no ``TINY_ARGS``.
TINY_PATHS: dict[str, list[str]] = {
    "vit_visualize.py": ["--arch", "vit_tiny_patch16_224", "--model-kwargs", _TINY_VIT, "--r", "10"],
    "vit_eval.py": [
        *("--arch", "vit_tiny_patch16_224", "--model-kwargs", _TINY_VIT, "--data", "{images}", "--r", "8"),
        *("--batch-size", "4", "--workers", "0", "--warmup", "1", "--device", "cpu"),
    ],
    # Two optimiser steps on 8 px crops of generated photographs (no scikit-image needed), weights to {tmp}.
    "train_reference.py": [
        *("--steps", "2", "--batch-size", "1", "--bank-size", "4", "--progressive", "8:0.99"),
        *("--photos", "{photos}", "--out", "{tmp}/weights"),
    ],
}


def declared_tiny_args(script: Path) -> list[str] | None:
    """The literal ``TINY_ARGS`` list of ``script``, or None."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "TINY_ARGS" for t in targets) and node.value is not None:
            return [str(arg) for arg in ast.literal_eval(node.value)]
    return None


def tiny_args(script: Path, help_text: str) -> list[str] | None:
    """How to run ``script`` on its tiny model (see the module docstring), or None.

    ``help_text`` is its ``--help`` output (or its source, which names the same options).
    """
    if "--tiny" in help_text:
        return ["--tiny"]
    declared = declared_tiny_args(script)
    return declared if declared is not None else TINY_PATHS.get(script.name)


def _image_folder(root: Path) -> Path:
    """An ImageNet-style folder: two classes of three random 40x40 images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("class_a", "class_b"):
        (root / label).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(root / label / f"{index}.png")
    return root


def _photos(path: Path) -> Path:
    """An .npz of random 96x112 photographs, one per class of the reference models (as --export-photos writes)."""
    import numpy as np

    from tokenmerge.tools.zoo.specs import CLASS_NAMES

    rng = np.random.default_rng(0)
    np.savez_compressed(path, **{name: rng.integers(0, 256, (96, 112, 3), dtype=np.uint8) for name in CLASS_NAMES})
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"  # an example that tried to download would fail here
    env["OMP_NUM_THREADS"] = "1"  # tiny models; several helpers may share the cores
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(script: Path, args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_examples_exist() -> None:
    assert EXAMPLES, "examples/ has no scripts"
    assert ROOT / "examples" / "custom_policy.py" in EXAMPLES


def test_tiny_args_discovery(tmp_path: Path) -> None:
    script = tmp_path / "x.py"
    script.write_text('"""Doc."""\nTINY_ARGS = ["--model", "tiny", "--out", "{tmp}/a.png"]\n', encoding="utf-8")
    assert tiny_args(script, "usage: x.py [--model M]") == ["--model", "tiny", "--out", "{tmp}/a.png"]
    assert tiny_args(script, "usage: x.py [--tiny]") == ["--tiny"]
    script.write_text("import sys\n", encoding="utf-8")
    assert tiny_args(script, "usage: x.py") is None


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str] | None, Any]]:
    """Every example's tiny path, run two at a time (one per core), each in a fresh interpreter and folder.

    Returns script name -> (arguments, finished process), or (None, None) when the example
    declares no tiny path.
    """

    def run(script: Path) -> tuple[list[str] | None, Any]:
        args = tiny_args(script, script.read_text(encoding="utf-8"))
        if args is None:
            return None, None
        folder = tmp_path_factory.mktemp(script.stem)
        places = {"{tmp}": str(folder)}
        if any("{images}" in arg for arg in args):
            places["{images}"] = str(_image_folder(folder / "images"))
        if any("{photos}" in arg for arg in args):
            places["{photos}"] = str(_photos(folder / "photos.npz"))
        for key, value in places.items():
            args = [arg.replace(key, value) for arg in args]
        return args, _run(script, args, folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((s.name for s in EXAMPLES), pool.map(run, EXAMPLES)))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help(
    script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python script --help``, run in this interpreter (no second import of torch)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(script.parent))  # as `python script` puts the script's folder first
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code in (0, None)
    help_text = capsys.readouterr().out
    assert "usage:" in help_text.lower()
    model_option = re.compile(r"--model(?![-\w])")
    if model_option.search(script.read_text(encoding="utf-8")):
        assert model_option.search(help_text), "an example that loads checkpoints takes --model"
        assert "hub id" in help_text, "--model is a diffusers pipeline (hub id or folder); timm takes --arch"
    if "timm.create_model" in script.read_text(encoding="utf-8"):
        assert "--arch" in help_text and not model_option.search(help_text)
    assert tiny_args(script, help_text) == tiny_args(script, script.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_tiny_path(script: Path, tiny_runs: dict[str, tuple[list[str] | None, Any]]) -> None:
    args, ran = tiny_runs[script.name]
    assert args is not None, f"{script.name}: offer --tiny, or declare TINY_ARGS = [...], so CI can run it"
    assert ran.returncode == 0, f"{script.name} {' '.join(args)} failed:\n{ran.stdout[-2000:]}\n{ran.stderr[-3000:]}"
    assert "Traceback" not in ran.stderr


def _load_custom_policy():
    spec = importlib.util.spec_from_file_location("custom_policy_example", ROOT / "examples" / "custom_policy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_policy_parts_compose_and_apply(block_stack: torch.nn.Module) -> None:
    """The user-written Matcher/ThresholdPolicy/PairCache work through MergeConfig and apply."""
    import tokenmerge

    example = _load_custom_policy()
    config = example.make_config(seed=0).replace(options={"protected": 0})
    x = torch.randn(2, 16, 16)  # (B, N, C)
    with torch.no_grad():
        plain = block_stack(x)
        handle = tokenmerge.apply(block_stack, config)
        for step in range(6):
            handle.state.set_step(step, num_steps=6)
            merged = block_stack(x)
        state = handle.state
        handle.remove()
        again = block_stack(x)
    assert merged.shape == plain.shape
    assert not torch.equal(merged, plain)  # something merged
    assert torch.equal(again, plain)  # remove restores bit for bit
    # DepthRamp: 0.6 of 16 tokens in the first of 3 layers, 0.3 in the last.
    assert state.merged_tokens["blocks.0"] == (16, 16 - int(0.6 * 16))
    assert state.merged_tokens["blocks.2"] == (16, 16 - int(0.3 * 16))
    # WarmupThenEvery(warmup=2, k=3): steps 0, 1 recompute, 2-3 reuse step 1's plan, 4 recomputes, 5 reuses.
    assert (state.plans_computed, state.plans_reused) == (3 * 3, 3 * 3)


def test_custom_policy_rejects_what_its_matcher_cannot_do() -> None:
    import tokenmerge

    example = _load_custom_policy()
    with pytest.raises(tokenmerge.TokenMergeError, match="first and last must be at most 0.75"):
        tokenmerge.MergeConfig(matcher=example.EveryKthDestination(4), threshold=example.DepthRamp(0.9, 0.1))
    with pytest.raises(tokenmerge.TokenMergeError, match="k must be an int >= 2"):
        example.EveryKthDestination(1)


@pytest.mark.parametrize(
    ("script", "argv", "expected"),
    [
        ("sd.py", ["--tiny", "--ratio", "2"], "ratio"),
        ("sd.py", [], "give --model (a hub id, downloaded once, or a local folder) or --tiny"),
        ("dit.py", ["--model", "/no/such/folder"], "dit.py: error: "),
        ("vit_eval.py", ["--arch", "vit_tiny_patch16_224", "--data", "/missing"], "--data must be an image folder"),
        ("vit_visualize.py", ["--arch", "no_such_model"], "--arch/--checkpoint must be a timm architecture"),
    ],
)
def test_example_errors_are_one_line(script: str, argv: list[str], expected: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0], done.stderr[-2000:]


def test_one_custom_composition_runs_on_sd_dit_and_vit() -> None:
    """The how-to's composition (a sequence matcher) on an SD pipeline, a DiT pipeline and a timm ViT:
    finite outputs, something merged, and remove() gives the plain outputs back bit for bit."""
    import timm

    import tokenmerge
    from tokenmerge.tools.tiny import tiny_dit_pipeline, tiny_prompt_embeds, tiny_sd_pipeline

    example = _load_custom_policy()
    sd, dit = tiny_sd_pipeline(0), tiny_dit_pipeline(0)
    for pipe in (sd, dit):
        pipe.set_progress_bar_config(disable=True)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=3).eval()
    images = torch.randn(2, 3, 32, 32)  # (B, 3, H, W)

    def run_sd() -> torch.Tensor:
        embeds = tiny_prompt_embeds(seed=0)
        generator = torch.Generator().manual_seed(0)
        out = sd(prompt_embeds=embeds, guidance_scale=1.0, num_inference_steps=3, generator=generator, output_type="pt")
        return out.images

    def run_dit() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return dit(class_labels=[1], num_inference_steps=3, generator=generator, output_type="pt").images

    for target, run in ((sd, run_sd), (dit, run_dit), (vit, lambda: vit(images))):
        with torch.no_grad():
            plain = run()
            with tokenmerge.apply(target, example.make_config(seed=0)) as handle:
                merged = run()
                tokens = dict(handle.state.merged_tokens)
            again = run()
        assert torch.isfinite(merged).all()
        assert tokens and any(n_out < n_in for n_in, n_out in tokens.values()), tokens
        assert torch.equal(again, plain)
    # The README's grid composition, given a sequence matcher and the ViT's default placement.
    from tokenmerge.placements import SubLayers
    from tokenmerge.policies import AlternatingBipartite, EveryK, RandomGrid, SimilarityThreshold

    grid_config = tokenmerge.MergeConfig(
        matcher=RandomGrid(sx=2, sy=2),
        threshold=SimilarityThreshold(0.8),
        cache=EveryK(3),
        placement=SubLayers(attn=True, cross_attn=True),
        seed=0,
    )
    with pytest.raises(tokenmerge.TokenMergeError):
        with tokenmerge.apply(vit, grid_config), torch.no_grad():
            vit(images)
    with tokenmerge.apply(vit, grid_config.replace(matcher=AlternatingBipartite(), placement=None)), torch.no_grad():
        assert torch.isfinite(vit(images)).all()
