"""The fidelity harness: metrics, methods, a CI-sized run, and ratio 0 equal to unmerged bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tokenmerge
from tokenmerge.tools import fidelity, zoo
from tokenmerge.tools.fidelity import CA_TOME_CONFIGS, FidelityMethod


@pytest.fixture(scope="module")
def fidelity_dit() -> object:
    """The shipped DiT reference pipeline."""
    return zoo.load("dit-photos")


@pytest.fixture(scope="module")
def fidelity_dit_plain(fidelity_dit: object) -> torch.Tensor:
    """Unmerged DiT images (seed 0, 2 steps, guidance 3)."""
    return _sample(fidelity_dit, steps=2)


@pytest.fixture(scope="module")
def fidelity_unet() -> object:
    """The shipped UNet reference pipeline."""
    return zoo.load("unet-photos")


def _sample(pipe: object, seed: int = 0, steps: int = 3, guidance: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe([5], num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt").images


# ---------------------------------------------------------------------------- metrics
def test_ssim() -> None:  # PSNR: tests/test_tools_common.py
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    assert torch.allclose(fidelity.ssim(images, images), torch.ones(2))
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert bool((fidelity.ssim(noisy, images) < 0.95).all())


def test_frechet_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=generator)
    assert fidelity.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + 2.0  # same covariance, mean moved by 2 in each of 8 dims
    assert fidelity.frechet_distance(shifted, a) == pytest.approx(32.0, rel=1e-6)
    with pytest.raises(tokenmerge.TokenMergeError, match="at least 2"):
        fidelity.frechet_distance(a[:1], a)


def test_random_features_are_fixed_and_separate_distributions() -> None:
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fidelity.RandomFeatures(0)(images), fidelity.RandomFeatures(0)(images))
    heldout = zoo.heldout()[0]
    near = fidelity.feature_distance(heldout[::2], heldout[1::2])
    far = fidelity.feature_distance(torch.rand_like(heldout[::2]), heldout[1::2])
    assert near < far


def test_inception_fid_needs_local_weights(tmp_path: Path) -> None:
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(tokenmerge.TokenMergeError, match="weights_path"):
        fidelity.inception_fid(images, images, None)
    with pytest.raises(tokenmerge.TokenMergeError, match="nothing is downloaded"):
        fidelity.inception_fid(images, images, tmp_path / "missing.pth")


# ---------------------------------------------------------------------------- methods
def test_cache_schedules_scale_from_50_steps() -> None:
    assert fidelity.scale_schedule(CA_TOME_CONFIGS["C3"], 50) == CA_TOME_CONFIGS["C3"]
    assert fidelity.scale_schedule(CA_TOME_CONFIGS["C3"], 25) == (0, 4, 5, 6, 10, 12, 15, 17, 22, 23, 24)
    assert fidelity.scale_schedule(CA_TOME_CONFIGS["C1"], 4) == (0, 1, 2)


def test_default_methods_cover_every_family() -> None:
    unet = fidelity.default_methods("unet", 25)
    dit = fidelity.default_methods("dit", 25, num_blocks=6)
    labels = [m.label for m in unet]
    for name in ("C1", "C2", "C3"):
        assert f"CAToMe T=0.7 {name}" in labels
    assert {m.family for m in unet} == {"plain", "ToMeSD", "CAToMe", "ToDo", "tomesd (library)", "ca-tome (official)"}
    assert {m.family for m in dit} == {"plain", "ToMeSD", "CAToMe", "ToDo", "block"}
    block = next(m for m in dit if m.family == "block")
    assert block.config is not None and block.config.blocks == (1, 4)
    with pytest.raises(tokenmerge.TokenMergeError, match="kind"):
        fidelity.default_methods("pixart", 25)


# ---------------------------------------------------------------------------- bit-for-bit at ratio 0
def test_ratio_zero_equals_unmerged_bit_for_bit_unet(fidelity_unet: object) -> None:
    plain = _sample(fidelity_unet, steps=2, guidance=1.0)
    with tokenmerge.apply(fidelity_unet, tokenmerge.ToMeSD(ratio=0.0, seed=0)) as handle:
        merged = _sample(fidelity_unet, steps=2, guidance=1.0)
        assert handle.state.plans_computed == 2 * 3  # the hooks ran: 3 top-level blocks, 2 steps
    assert torch.equal(merged, plain)


@pytest.mark.parametrize(
    "config",
    [
        tokenmerge.ToMeSD(ratio=0.0, seed=0),
        tokenmerge.ToDo(downsample=2, ratio=0.0),
        fidelity._block_config(0.0, (1, 4), seed=0),
    ],
    ids=["tomesd", "todo", "block"],
)
def test_ratio_zero_equals_unmerged_bit_for_bit_dit(
    fidelity_dit: object, fidelity_dit_plain: torch.Tensor, config: tokenmerge.MergeConfig
) -> None:
    with tokenmerge.apply(fidelity_dit, config) as handle:
        merged = _sample(fidelity_dit, steps=2)
        assert handle.state.plans_computed > 0  # the hooks ran
    assert torch.equal(merged, fidelity_dit_plain)


# ---------------------------------------------------------------------------- the harness in CI
def test_harness_two_seeds_four_steps() -> None:
    methods = [
        FidelityMethod("ToMeSD r=0.5", "ToMeSD", "ratio 0.5", tokenmerge.ToMeSD(0.5, seed=0)),
        FidelityMethod(
            "CAToMe C3",
            "CAToMe",
            "0.7",
            tokenmerge.CAToMe(0.7, recompute_at=fidelity.scale_schedule(CA_TOME_CONFIGS["C3"], 4), seed=0),
        ),
    ]
    lines: list[str] = []
    result = fidelity.run_fidelity(
        "dit-photos",
        seeds=(0, 1),
        num_steps=4,
        guidance_scale=1.0,
        images_per_seed=1,
        methods=methods,
        log=lines.append,
    )
    rows = {row.method: row for row in result.rows}
    assert list(rows) == ["plain", "ToMeSD r=0.5", "CAToMe C3"]
    plain = rows["plain"]
    assert plain.psnr == math.inf and plain.ssim == pytest.approx(1.0) and plain.merged == 0.0 and plain.speedup == 1.0
    for row in result.rows[1:]:
        assert row.psnr is not None and 5.0 < row.psnr < math.inf
        assert row.ssim is not None and -1.0 <= row.ssim < 1.0
        assert row.seconds is not None and row.seconds > 0 and row.speedup is not None
        assert row.merged is not None and 0.0 < row.merged <= 0.75
    assert rows["ToMeSD r=0.5"].merged == pytest.approx(0.5, abs=0.01)
    assert all(row.distance is not None and row.distance >= 0 for row in result.rows)
    assert len([line for line in lines if "PSNR" in line]) == 3 and "dit-photos: seed 1 done" in lines
    table = fidelity.format_table(result.rows)
    assert table.count("\n") == 4 and "| inf |" in table
    payload = json.dumps(result.to_json())
    assert '"psnr": "inf"' in payload and result.meta["num_steps"] == 4


def test_harness_library_rows_on_the_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    by_label = {m.label: m for m in fidelity.default_methods("unet", 1)}
    methods = [by_label["tomesd lib r=0.5"], by_label["ca-tome lib T=0.7 C3"]]
    real = fidelity._library_available
    monkeypatch.setattr(fidelity, "_library_available", lambda name: "absent" if name == "ca-tome" else real(name))
    result = fidelity.run_fidelity(
        "unet-photos", seeds=(0,), num_steps=1, guidance_scale=1.0, images_per_seed=1, methods=methods, distance=False
    )
    tomesd_row, catome_row = result.rows[1], result.rows[2]
    assert tomesd_row.psnr is not None and tomesd_row.psnr < math.inf and tomesd_row.note == ""
    assert catome_row.psnr is None and catome_row.note == "absent"


def test_command_line_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["--models", "dit-photos", "--seeds", "1", "--steps", "1", "--images-per-seed", "1"]
    code = fidelity.main([*argv, "--families", "ToDo", "--no-distance", "--json", str(out)])
    assert code == 0
    assert "| dit-photos | ToDo 2x2 |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["plain", "ToDo 2x2"]
    assert fidelity.main(["--models", "sd-photos"]) == 2
    assert "--models must name" in capsys.readouterr().err
    assert fidelity.main(["--models", "dit-photos", "--ratios", "half"]) == 2
    assert "--ratios must be" in capsys.readouterr().err
