"""The shipped reference models load offline and sample deterministically; the training script runs."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenmerge
from tokenmerge.tools import zoo
from tokenmerge.tools.zoo import photos, train
from tokenmerge.tools.zoo.classifier import CLASSIFIER_SPECS
from tokenmerge.tools.zoo.specs import CLASS_NAMES, SPECS


@pytest.fixture
def zoo_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenmerge.tools.zoo tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def zoo_pipes() -> dict[str, object]:
    """Both shipped diffusion pipelines, loaded once (float32, CPU); the ViT: tests/test_zoo_vit.py."""
    return {name: zoo.load(name) for name in SPECS}


def test_shipped_weights_fit_the_budget_and_record_their_training() -> None:
    files = sorted(zoo.WEIGHTS_DIR.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(zoo.names())
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    for name in zoo.names():
        record = zoo.info(name)
        spec = SPECS[name] if name in SPECS else CLASSIFIER_SPECS[name]
        assert record["spec"] == spec.to_json()
        training = record["training"]
        assert training["command"].startswith("python examples/train_reference.py")
        assert training["steps"] >= 1 and np.isfinite(training["final_loss"])
        assert training["hardware"] and training["train_seconds"] > 0
        assert len(training["loss_curve"]) >= 1


def test_attention_heads_are_32_channels_wide(zoo_pipes: dict[str, object]) -> None:
    # diffusers' UNet2DConditionModel reads `attention_head_dim` as a number of heads: a spec
    # that said 32 there once gave 32 heads of width 1 at the top level.
    from diffusers.models.attention_processor import Attention

    for name, pipe in zoo_pipes.items():
        denoiser = pipe.transformer if name.startswith("dit") else pipe.unet  # type: ignore[attr-defined]
        widths = {m.inner_dim // m.heads for m in denoiser.modules() if isinstance(m, Attention)}
        assert widths == {32}, (name, widths)


@pytest.mark.parametrize("name", ["dit-photos", "unet-photos"])
def test_load_offline_and_sample_deterministically(name: str, zoo_no_network: None) -> None:
    pipe = zoo.load(name)
    assert pipe.class_names == list(CLASS_NAMES)
    denoiser = pipe.transformer if name.startswith("dit") else pipe.unet
    assert not denoiser.training and not any(p.requires_grad for p in denoiser.parameters())

    guidance = 2.0 if name.startswith("dit") else 1.0  # the UNet is the costly one on a CPU: no doubled batch

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            ["grass"], num_inference_steps=1, guidance_scale=guidance, generator=generator, output_type="pt"
        ).images

    first, again, other = sample(0), sample(0), sample(1)
    assert first.shape == (1, 3, 64, 64) and first.dtype == torch.float32
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_pipeline_outputs_and_guidance_off(zoo_pipes: dict[str, object]) -> None:
    pipe = zoo_pipes["dit-photos"]
    generator = torch.Generator().manual_seed(0)
    out = pipe([0, "coffee"], num_inference_steps=1, guidance_scale=1.0, generator=generator, output_type="np")
    assert out.images.shape == (2, 64, 64, 3)
    pil = pipe(3, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (64, 64)


def test_bad_arguments_raise_token_merge_error(zoo_pipes: dict[str, object]) -> None:
    pipe = zoo_pipes["dit-photos"]
    with pytest.raises(tokenmerge.TokenMergeError, match="name must be one of"):
        zoo.load("sd-photos")
    with pytest.raises(tokenmerge.TokenMergeError, match="dtype"):
        zoo.load("dit-photos", dtype=torch.int64)
    with pytest.raises(tokenmerge.TokenMergeError, match="unknown class name"):
        pipe(["not-a-photo"], num_inference_steps=1)
    with pytest.raises(tokenmerge.TokenMergeError, match="class_labels"):
        pipe([len(CLASS_NAMES)], num_inference_steps=1)
    with pytest.raises(tokenmerge.TokenMergeError, match="output_type"):
        pipe([0], num_inference_steps=1, output_type="latent")
    with pytest.raises(tokenmerge.TokenMergeError, match="weights_dir"):
        zoo.load("dit-photos", weights_dir="/nonexistent")


def test_load_casts_to_the_requested_dtype() -> None:
    pipe = zoo.load("unet-photos", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.class_tokens.dtype == torch.float16


def test_heldout_crops_are_four_per_class() -> None:
    images, labels = zoo.heldout()
    assert images.shape == (4 * len(CLASS_NAMES), 3, 64, 64)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(torch.bincount(labels), torch.full((len(CLASS_NAMES),), 4))


# ---------------------------------------------------------------------------- training script
def _synthetic_photo(name: str) -> np.ndarray:
    """A stand-in for a scikit-image photograph (no scikit-image needed): a seeded colour gradient."""
    rng = np.random.default_rng(CLASS_NAMES.index(name))
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0, 60, 160)[None, :, None]
    image = (base[None, None, :] + ramp + rng.integers(0, 30, size=(120, 160, 3))) % 256
    return image.astype(np.uint8)  # (120, 160, 3)


_REAL_LOAD_ONE = photos._load_one


@pytest.fixture
def zoo_synthetic_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train on synthetic photographs instead of scikit-image's."""
    monkeypatch.setattr(photos, "_load_one", _synthetic_photo)
    monkeypatch.setattr(photos, "_EXPORTED", {})


def test_photos_export_and_load_without_scikit_image(
    tmp_path: Path, zoo_synthetic_photos: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = Path(train.DEFAULT_PHOTOS)
    assert train.main(["--export-photos", str(path)]) == 0
    monkeypatch.setattr(photos, "_load_one", _REAL_LOAD_ONE)
    monkeypatch.setitem(sys.modules, "skimage", None)  # scikit-image absent
    with pytest.raises(tokenmerge.TokenMergeError, match="scikit-image"):
        photos.load_photos(["coffee"])
    photos.use_photos(path)
    loaded = photos.load_photos(["coffee"])[0]  # (3, H, W) in [-1, 1]
    expected = torch.from_numpy(_synthetic_photo("coffee")).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(loaded, expected)
    with pytest.raises(tokenmerge.TokenMergeError, match="photos must name"):
        photos.use_photos(tmp_path / "missing.npz")
    monkeypatch.setattr(photos, "_EXPORTED", {})  # training finds the exported file by itself
    argv = ["--models", "dit-photos", "--steps", "1", "--batch-size", "1", "--progressive", "8:0.9", "--out", "w"]
    assert train.main(argv) == 0
    assert "coffee" in photos._EXPORTED


def test_crops_respect_the_holdout_split(zoo_synthetic_photos: None) -> None:
    loaded = photos.load_photos(["astronaut"])
    marker = loaded[0].clone()
    split = photos.split_columns(marker.shape[-1])
    marker[:, :, split:] = 1.0  # the held-out strip is white, the rest darker
    marker[:, :, :split] = -1.0
    generator = torch.Generator().manual_seed(0)
    train_crops, labels = photos.random_crops([marker], 16, 16, generator)
    held_crops, _ = photos.random_crops([marker], 16, 16, generator, heldout=True)
    assert float(train_crops.max()) == -1.0 and float(held_crops.min()) == 1.0
    assert labels.tolist() == [0] * 16


def _train(out: Path, *extra: str) -> dict:
    code = train.main(["--models", "dit-photos", "--batch-size", "1", "--bank-size", "4", "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "dit-photos.json").read_text())


def test_training_is_deterministic_and_loadable(tmp_path: Path, zoo_synthetic_photos: None) -> None:
    first = _train(tmp_path / "a", "--steps", "2", "--progressive", "8:0.9", "--autocast", "bf16")
    _train(tmp_path / "b", "--steps", "2", "--progressive", "8:0.9", "--autocast", "bf16")
    assert (tmp_path / "a" / "dit-photos.safetensors").read_bytes() == (
        tmp_path / "b" / "dit-photos.safetensors"
    ).read_bytes()
    training = first["training"]
    assert training["steps"] == 2 and training["autocast"] == "bf16"
    assert training["phases"] == [{"first_step": 0, "resolution": 8, "batch_size": 8}]
    assert training["replay_command"].endswith("--models dit-photos --steps 2")
    assert np.isfinite(training["final_loss"])
    pipe = zoo.load("dit-photos", weights_dir=tmp_path / "a")
    image = pipe([1], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()
    with np.load(tmp_path / "a" / "heldout_crops.npz") as data:
        assert data["images"].shape == (4 * len(CLASS_NAMES), 64, 64, 3)


def test_training_unet_path(tmp_path: Path, zoo_synthetic_photos: None) -> None:
    argv = [
        "--models",
        "unet-photos",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--bank-size",
        "2",
        "--progressive",
        "8:0.9",
    ]
    assert train.main([*argv, "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "unet-photos.json").read_text())["training"]["steps"] == 1
    keys = set(zoo.load("unet-photos", weights_dir=tmp_path).class_tokens.state_dict())
    assert keys == {"table.weight"}


def test_training_within_a_time_budget(tmp_path: Path, zoo_synthetic_photos: None) -> None:
    training = _train(tmp_path, "--minutes", "0.02", "--progressive", "8:0.9")["training"]
    assert training["steps"] >= 1 and training["planned_steps"] >= 1
    assert training["command"].endswith("--minutes 0.02 --progressive 8:0.9")
    assert not torch.are_deterministic_algorithms_enabled()  # the script restores the global flag


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--steps, --minutes"),
        (["--steps", "0"], "--steps must be"),
        (["--steps", "1", "--models", "sd"], "unknown"),
        (["--steps", "1", "--progressive", "12:0.5"], "RES:FRACTION"),
        (["--steps", "1", "--progressive", "16:0.6,32:0.5"], "sum to less than 1"),
    ],
)
def test_training_arguments_are_validated(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_replan_shrinks_to_fit_and_moves_phases_forward() -> None:
    seconds = {16: 1.0, 64: 4.0}
    assert train._replan([(16, 0.5)], 100, 64, 10, seconds, 1e9) == 100
    shorter = train._replan([(16, 0.5)], 100, 64, 10, seconds, 60.0)
    assert 10 < shorter < 100
    phases = train._phases([(16, 0.5)], shorter, 64)
    cost = sum(seconds[train._resolution_at(phases, s)] for s in range(10, shorter))
    assert cost <= 60.0
