"""examples/vit_eval.py and examples/vit_visualize.py, run in-process on a tiny model and a generated folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import timm
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=2)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vit_eval_reports_top1_and_throughput_with_and_without_merging(timm_image_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 1.0]))  # always class_b: 3 of the 6 images
    checkpoint = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), checkpoint)
    args = ["--arch", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--model-kwargs", json.dumps(TINY)]
    args += ["--data", str(timm_image_folder), "--r", "8,0.5", "--batch-size", "4", "--workers", "0"]
    args += ["--warmup", "1", "--device", "cpu", "--json", str(tmp_path / "out.json")]
    results = load_example("vit_eval").main(args)
    assert results["r"] == (8, 0.5)
    for run in ("plain", "tome"):
        assert results[run]["images"] == 6 and results[run]["top1"] == 50.0 and results[run]["images_per_s"] > 0
    assert json.loads((tmp_path / "out.json").read_text())["tome"]["top1"] == 50.0


def test_vit_eval_parses_every_form_of_r() -> None:
    parse_r = load_example("vit_eval").parse_r
    assert parse_r("13") == 13 and parse_r("[1, 2]") == [1, 2] and parse_r("16,-0.5") == (16, -0.5)


def test_vit_visualize_writes_the_input_beside_the_groups(tmp_path: Path) -> None:
    out = tmp_path / "merged.png"
    args = ["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--r", "10", "--out", str(out)]
    assert load_example("vit_visualize").main(args) == out
    with Image.open(out) as picture:
        pixels = np.asarray(picture)
    assert pixels.shape == (32, 32 + 8 + 32, 3)
    assert not np.array_equal(pixels[:, :32], pixels[:, 40:])  # groups drawn over the right-hand copy
