"""The trained reference ViT: shipped weights reach their recorded accuracy, ToMe merges on it, r = 0 is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenmerge
from tokenmerge.adapters.vit import merge_record
from tokenmerge.tools import cli, fidelity_vit, vis, zoo
from tokenmerge.tools.zoo import classifier, photos, train, train_vit
from tokenmerge.tools.zoo.classifier import CLASSIFIER_SPECS
from tokenmerge.tools.zoo.specs import CLASS_NAMES

SPEC = CLASSIFIER_SPECS["vit-photos"]


def _synthetic_photo(name: str) -> np.ndarray:
    """A stand-in for a scikit-image photograph (no scikit-image needed): seeded colour and noise."""
    rng = np.random.default_rng(CLASS_NAMES.index(name))
    image = rng.integers(0, 255, size=3)[None, None, :] + rng.integers(0, 40, size=(120, 160, 3))
    return (image % 256).astype(np.uint8)  # (120, 160, 3)


@pytest.fixture
def zoo_synthetic_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train on synthetic photographs instead of scikit-image's."""
    monkeypatch.setattr(photos, "_load_one", _synthetic_photo)
    monkeypatch.setattr(photos, "_EXPORTED", {})


@pytest.fixture(scope="module")
def zoo_vit() -> torch.nn.Module:
    """The shipped reference ViT (float32, CPU)."""
    return zoo.load("vit-photos")


@pytest.fixture(scope="module")
def zoo_vit_crops() -> tuple[torch.Tensor, torch.Tensor]:
    """The fast held-out subset the weights' JSON records an accuracy for."""
    per_class = zoo.info("vit-photos")["evaluation"]["ci_per_class"]
    return classifier.eval_crops(per_class, SPEC.image_size)


def test_shipped_vit_is_small_and_records_its_training_and_accuracy() -> None:
    record = zoo.info("vit-photos")
    assert record["spec"] == SPEC.to_json()
    assert (zoo.WEIGHTS_DIR / "vit-photos.safetensors").stat().st_size <= 4 * 1024 * 1024
    assert (zoo.WEIGHTS_DIR / classifier.STRIPS_FILE).stat().st_size <= 2 * 1024 * 1024
    training = record["training"]
    assert training["command"].startswith("python examples/train_reference.py")
    assert "vit-photos" in training["command"] and training["train_seconds"] < 30 * 60
    evaluation = record["evaluation"]
    assert evaluation["per_class"] == train_vit.EVAL_PER_CLASS and evaluation["ci_per_class"] == train_vit.CI_PER_CLASS
    chance = 1 / len(CLASS_NAMES)
    assert evaluation["top1"] > 3 * chance and evaluation["ci_top1"] > 3 * chance  # trained, not random


def test_shipped_vit_reaches_its_recorded_accuracy(
    zoo_vit: torch.nn.Module, zoo_vit_crops: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = zoo_vit_crops
    assert images.shape == (len(CLASS_NAMES) * train_vit.CI_PER_CLASS, 3, 112, 112)
    recorded = zoo.info("vit-photos")["evaluation"]["ci_top1"]
    # One crop's worth of slack: another CPU may round a borderline logit the other way.
    assert classifier.accuracy(zoo_vit, images, labels) == pytest.approx(recorded, abs=1.01 / len(labels))


def test_load_gives_an_eval_vit_reading_unit_range_images(zoo_vit: torch.nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(zoo_vit, VisionTransformer) and not zoo_vit.training
    assert not any(p.requires_grad for p in zoo_vit.parameters())
    assert zoo_vit.pretrained_cfg["mean"] == (0.0, 0.0, 0.0) and zoo_vit.pretrained_cfg["std"] == (1.0, 1.0, 1.0)
    assert zoo.load("vit-photos", dtype=torch.float16).cls_token.dtype == torch.float16


def test_tome_merges_on_the_reference_vit_and_r_zero_is_exact(
    zoo_vit: torch.nn.Module, zoo_vit_crops: tuple[torch.Tensor, torch.Tensor]
) -> None:
    batch = zoo_vit_crops[0][:: len(zoo_vit_crops[0]) // 4]  # (4, 3, 112, 112), four classes
    with torch.no_grad():
        plain = zoo_vit(batch)
        with tokenmerge.apply(zoo_vit, tokenmerge.ToMe(r=0)):
            zero = zoo_vit(batch)
        with tokenmerge.apply(zoo_vit, tokenmerge.ToMe(r=8)):
            merged = zoo_vit(batch)
            record = merge_record(zoo_vit)
        after = zoo_vit(batch)
    assert torch.equal(zero, plain) and torch.equal(after, plain)
    assert record is not None and record.num_input == 197 and record.num_tokens == 197 - 12 * 8
    assert not torch.equal(merged, plain)


def test_eval_crops_are_seeded_prefixes_per_class() -> None:
    small, small_labels = classifier.eval_crops(1, 32)
    large, large_labels = classifier.eval_crops(2, 32)
    assert torch.equal(small, large[::2]) and torch.equal(small_labels, large_labels[::2])
    assert torch.equal(torch.bincount(large_labels), torch.full((len(CLASS_NAMES),), 2))
    assert float(large.min()) >= 0.0 and float(large.max()) <= 1.0
    other, _ = classifier.eval_crops(1, 32, seed=1)
    assert not torch.equal(other, small)


def test_training_regions_and_heldout_strips_split_each_photo(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    # (3, H, W) photos in [-1, 1] on the uint8 grid, one of every width parity
    shots = [torch.randint(0, 256, (3, 70, w), generator=generator).float() / 127.5 - 1 for w in (150, 151)]
    strips_path = classifier.write_heldout_strips(shots * 8, tmp_path / classifier.STRIPS_FILE)
    strips = classifier.heldout_strips(strips_path.parent)
    for photo, region, strip in zip(shots * 8, train_vit.training_regions(shots * 8), strips):
        split = photos.split_columns(photo.shape[-1])
        assert region.shape[-1] == split and strip.shape[-1] == photo.shape[-1] - split
        assert torch.allclose(torch.cat([region, strip], dim=-1), (photo + 1) / 2, atol=1e-6)


def test_sample_crops_stay_in_their_region_and_augment() -> None:
    black, white = torch.zeros(3, 80, 90), torch.ones(3, 80, 90)
    crops = classifier.sample_crops([black, white], torch.tensor([0, 1, 0, 1]), 16, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 3, 16, 16)
    assert float(crops[0::2].max()) == 0.0 and float(crops[1::2].min()) == 1.0
    ramp = torch.linspace(0, 1, 90).expand(3, 80, 90).contiguous()
    generator = torch.Generator().manual_seed(0)
    augmented = classifier.sample_crops([ramp], torch.zeros(32, dtype=torch.long), 16, generator, augment=True)
    flipped = augmented[:, 0, 0, 0] > augmented[:, 0, 0, -1]  # left brighter than right: flipped
    assert 0 < int(flipped.sum()) < 32


def test_training_script_trains_saves_and_scores_the_vit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo_synthetic_photos: None
) -> None:
    monkeypatch.setattr(train_vit, "EVAL_PER_CLASS", 2)
    monkeypatch.setattr(train_vit, "CI_PER_CLASS", 1)
    argv = ["--models", "vit-photos", "--steps", "2", "--batch-size", "2", "--threads", "2", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    record = json.loads((tmp_path / "vit-photos.json").read_text())
    training, evaluation = record["training"], record["evaluation"]
    assert training["steps"] == 2 and training["replay_command"].endswith("--models vit-photos --steps 2")
    assert np.isfinite(training["final_loss"]) and training["parameters"] == sum(
        p.numel() for p in zoo.load("vit-photos", weights_dir=tmp_path).parameters()
    )
    assert evaluation["per_class"] == 2 and 0.0 <= evaluation["top1"] <= 1.0
    images, labels = classifier.eval_crops(1, SPEC.image_size, weights_dir=tmp_path)
    model = zoo.load("vit-photos", weights_dir=tmp_path)
    assert classifier.accuracy(model, images, labels) == evaluation["ci_top1"]


def test_accuracy_benchmark_rows(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    result = fidelity_vit.run_accuracy(rs=(0, 8), per_class=1, batch_size=16, repeats=1, log=lines.append)
    rows = {row.method: row for row in result.rows}
    assert list(rows) == ["plain", "ToMe r=0", "ToMe r=8", "ToMe r=8 no-prop"]
    assert rows["ToMe r=0"].agreement == 1.0 and rows["ToMe r=0"].top1 == rows["plain"].top1
    assert rows["plain"].tokens == 197 and rows["ToMe r=8"].tokens == rows["ToMe r=8 no-prop"].tokens == 101
    assert all(row.ms > 0 and row.speedup > 0 for row in result.rows) and rows["plain"].speedup == 1.0
    assert len(lines) == 2 * len(result.rows) and lines[0].startswith("vit-photos: plain: top-1")
    table = fidelity_vit.format_accuracy_table(result.rows)
    assert "| ToMe r=8 no-prop | 8 | no |" in table
    with pytest.raises(tokenmerge.TokenMergeError, match="per_class"):
        fidelity_vit.run_accuracy(per_class=0)


def test_fidelity_command_runs_the_accuracy_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc.json"
    argv = ["fidelity", "--models", "vit-photos", "--r", "4", "--per-class", "1", "--repeats", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "| ToMe r=4 | 4 | yes |" in captured.out and "vit-photos: ToMe r=4 no-prop" in captured.err
    payload = json.loads(out.read_text())
    assert [row["method"] for row in payload["classifiers"][0]["rows"]] == ["plain", "ToMe r=4", "ToMe r=4 no-prop"]


def test_merge_picture_uses_the_trained_vit(zoo_vit: torch.nn.Module) -> None:
    pixels = vis.load_sample_image(224)
    picture = vis.merged_groups(zoo_vit, pixels, 8)
    assert picture.shape == (224, 224, 3) and not np.array_equal(picture, pixels)
    from tokenmerge.tools.demo import merged_groups_picture

    assert np.array_equal(merged_groups_picture(pixels, (8,), scale=1, labels=False)[:, 230:], picture)
