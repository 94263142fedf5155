"""`tokenmerge fidelity` data-parallel under accelerate, and its --prompts mode on a saved pipeline.

Two CPU processes (gloo) must give the rows of one process with the same seeds, bit for bit
but for the timing columns: each seed's noise depends on the seed only, the main process
gathers every image in seed order and scores them once. Every process runs with one CPU
thread (torchrun's default for several processes), and so does the one-process reference:
float reductions then add up in the same order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenmerge.tools import fidelity
from tokenmerge.tools.distributed import Processes
from tokenmerge.tools.tiny import TEXT_DIM, tiny_sd_unet, tiny_vae

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "speedup")


# ---------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


def _one_process(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenmerge.tools.fidelity", *argv]
    return subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _two_processes(argv: list[str]) -> subprocess.CompletedProcess[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "tokenmerge.tools.fidelity", *argv]
    return subprocess.run(launch, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _untimed_table(stdout: str) -> list[list[str]]:
    """The table's cells without the fastest-seconds and speed-up columns."""
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("|")]
    assert rows and rows[0][6].strip() == "fastest s" and rows[0][7].strip() == "speed-up"
    return [cells[:6] + cells[8:] for cells in rows]


def _assert_same_results(one: subprocess.CompletedProcess[str], two: subprocess.CompletedProcess[str]) -> None:
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| model |") == 1  # only the main process prints the table
    assert _untimed_table(two.stdout) == _untimed_table(one.stdout)
    assert "[process 1/2]" in two.stderr and "[process 0/2]" in two.stderr


def _assert_same_json(one_path: Path, two_path: Path, processes: int = 2) -> list[dict[str, Any]]:
    one, two = json.loads(one_path.read_text()), json.loads(two_path.read_text())
    assert len(one["rows"]) == len(two["rows"]) >= 2
    for row_one, row_two in zip(one["rows"], two["rows"]):
        assert {k: v for k, v in row_one.items() if k not in TIMING} == {
            k: v for k, v in row_two.items() if k not in TIMING
        }  # bit for bit: equal floats
        assert row_two["seconds"] > 0 and row_two["speedup"] > 0
    (meta_one,), (meta_two,) = one["runs"], two["runs"]
    assert meta_one.pop("processes") == 1 and meta_two.pop("processes") == processes
    assert meta_one == meta_two
    return one["rows"]


# ---------------------------------------------------------------------------- one process
def test_one_process_shares_everything_and_gathers_itself() -> None:
    processes = Processes.current()
    assert processes.state is None and processes.count == 1 and processes.index == 0 and processes.is_main
    assert processes.share([3, 1, 2]) == [3, 1, 2] and processes.share([]) == []
    assert processes.gather({"a": 1}) == [{"a": 1}]
    assert processes.device("cpu") == torch.device("cpu")
    lines: list[str] = []
    processes.progress(lines.append)("seed 0 done")
    processes.progress(None)("dropped")
    assert lines == ["seed 0 done"]
    with processes.main_first():
        processes.wait()


# ---------------------------------------------------------------------------- two processes
def test_two_cpu_processes_equal_one_process_on_the_zoo_dit(tmp_path: Path) -> None:
    # 3 seeds over 2 processes: shares of 2 and 1, gathered back in seed order.
    argv = ["--models", "dit-photos", "--seeds", "3", "--steps", "2", "--images-per-seed", "1"]
    argv += ["--families", "ToMeSD", "--ratios", "0.5"]
    one = _one_process([*argv, "--json", str(tmp_path / "one.json")])
    two = _two_processes([*argv, "--json", str(tmp_path / "two.json")])
    _assert_same_results(one, two)
    rows = _assert_same_json(tmp_path / "one.json", tmp_path / "two.json")
    assert [row["method"] for row in rows] == ["plain", "ToMeSD r=0.5"]
    assert rows[1]["psnr"] < 100 and rows[1]["distance"] > 0  # the merged row differs: a real comparison
    assert "dit-photos: seed 2 done" in two.stderr and "[process 1/2] dit-photos: seed 2" in two.stderr


# ---------------------------------------------------------------------------- --prompts FILE --model DIR
def _tiny_text_to_image(directory: Path) -> Path:
    """A tiny Stable Diffusion pipeline with a CLIP text encoder and tokenizer built offline, saved."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": len(letters) + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (directory / "vocab").mkdir(parents=True)
    (directory / "vocab" / "vocab.json").write_text(json.dumps(vocab))
    (directory / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab" / "vocab.json"), str(directory / "vocab" / "merges.txt"), model_max_length=12
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(0),
        text_encoder=CLIPTextModel(config).eval(),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(0),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "pipe")
    return directory / "pipe"


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a saved tiny text-to-image pipeline."""
    return _tiny_text_to_image(tmp_path_factory.mktemp("tiny-sd"))


def _prompt_argv(pipe_dir: Path, prompts: Path) -> list[str]:
    prompts.write_text("a red cat\n\nthe blue sea  \n")
    argv = ["--prompts", str(prompts), "--model", str(pipe_dir), "--seeds", "2", "--steps", "2"]
    return argv + ["--images-per-seed", "1", "--families", "ToMeSD", "--ratios", "0.5", "--guidance", "5"]


def test_prompts_mode_on_a_saved_pipeline(
    saved_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fidelity.read_prompts(_write(tmp_path / "p.txt", "a\n\n b \n")) == ["a", "b"]
    out = tmp_path / "prompts.json"
    code = fidelity.main([*_prompt_argv(saved_pipeline, tmp_path / "prompts.txt"), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"| {saved_pipeline} | ToMeSD r=0.5 |" in captured.out
    payload = json.loads(out.read_text())
    plain, merged = payload["rows"]
    assert plain["method"] == "plain" and plain["psnr"] == "inf" and plain["distance"] == pytest.approx(0.0, abs=1e-6)
    assert merged["merged"] == pytest.approx(0.5, abs=0.02)  # ToMeSD r=0.5 on the 16x16 level
    assert 0 < merged["psnr"] < 100 and merged["distance"] > 0
    (meta,) = payload["runs"]
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["prompts"] == 2 and meta["seeds"] == [0, 1]
    assert "prompt 1 seed 1 done" in captured.err


def test_prompts_change_the_images(saved_pipeline: Path) -> None:
    pipe = fidelity.load_pipeline(saved_pipeline)
    assert fidelity.pipeline_kind(pipe) == ("unet", 0)
    images = [
        pipe(p, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
        for p in ("a red cat", "the blue sea")
    ]
    assert not torch.equal(images[0], images[1])  # the text encoder reaches the UNet


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_prompts_mode_errors(saved_pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fidelity.main(["--model", str(saved_pipeline)]) == 2
    assert "--model needs --prompts" in capsys.readouterr().err
    assert fidelity.main(["--prompts", str(tmp_path / "missing.txt"), "--model", str(saved_pipeline)]) == 2
    assert "--prompts must name a text file" in capsys.readouterr().err
    assert fidelity.main(["--prompts", str(_write(tmp_path / "empty.txt", "\n \n")), "--model", "x"]) == 2
    assert "at least one prompt" in capsys.readouterr().err
    assert fidelity.main(["--prompts", str(_write(tmp_path / "one.txt", "a cat\n"))]) == 2
    assert "--prompts needs --model" in capsys.readouterr().err


def test_two_cpu_processes_equal_one_process_with_prompts(saved_pipeline: Path, tmp_path: Path) -> None:
    # 2 prompts x 2 seeds = 4 generations, 2 per process.
    argv = _prompt_argv(saved_pipeline, tmp_path / "prompts.txt")
    one = _one_process([*argv, "--json", str(tmp_path / "one.json")])
    two = _two_processes([*argv, "--json", str(tmp_path / "two.json")])
    _assert_same_results(one, two)
    _assert_same_json(tmp_path / "one.json", tmp_path / "two.json")
