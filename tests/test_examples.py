"""Every script in examples/ runs: ``--help``, and its tiny-model path.

Examples are discovered, so a new one is covered without editing this file. The tiny
path is ``--tiny`` when the example's help offers it, else the script with no arguments.
Each runs in a fresh interpreter in a temporary folder (whatever it writes lands there),
with the repository on ``PYTHONPATH`` and nothing downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


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


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_help_then_tiny_path(script: Path, tmp_path: Path) -> None:
    helped = _run(script, ["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "usage:" in helped.stdout.lower()
    if "--model" in script.read_text(encoding="utf-8"):
        assert "--model" in helped.stdout, "an example that loads checkpoints takes --model"
    args = ["--tiny"] if "--tiny" in helped.stdout else []
    ran = _run(script, args, tmp_path)
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
