"""`tokenmerge.tools.vis`: group pictures, PNG writing and the shipped sample image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tokenmerge
from tokenmerge import TokenMergeError
from tokenmerge.adapters.vit import merge_record
from tokenmerge.tools import vis


def gradient_image(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 20, y * 20, (x + y) * 10], axis=-1).astype(np.uint8)  # (H, W, 3)


def test_draw_groups_fills_each_group_with_its_mean_colour_and_outlines_it() -> None:
    image = gradient_image(8, 8)  # 2x2 pixels per patch of a 4x4 grid
    groups = np.zeros((4, 4), dtype=int)
    groups[:, 2:] = 1  # left half, right half
    groups[3, 3] = 7  # a single patch
    out = vis.draw_groups(image, groups, (4, 4), outline=(255, 0, 255))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    pixel_groups = np.repeat(np.repeat(groups, 2, axis=0), 2, axis=1)  # (8, 8)
    outline = np.all(out == (255, 0, 255), axis=-1)
    assert outline[:, 3].all()  # the border between the halves, on the left side
    assert outline[6:, 5].all() and outline[5, 6:].all()  # around the single patch
    assert not outline[:, :3].any()
    for group in (0, 1, 7):
        members = pixel_groups == group
        mean = np.rint(image[members].mean(axis=0))
        assert np.array_equal(out[members & ~outline], np.broadcast_to(mean, out[members & ~outline].shape))
    plain = vis.draw_groups(image, groups.reshape(-1), (4, 4), outline=None)
    assert np.array_equal(plain[0, 0], np.rint(image[pixel_groups == 0].mean(axis=0)))


def test_draw_groups_accepts_tensors_in_0_1_and_channels_first() -> None:
    image = gradient_image(8, 12)
    groups = torch.arange(12).reshape(2, 6) // 2
    expected = vis.draw_groups(image, groups, (2, 6))
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    assert np.abs(vis.draw_groups(as_tensor, groups, (2, 6)).astype(int) - expected).max() <= 1
    with pytest.raises(TokenMergeError, match="one entry per patch"):
        vis.draw_groups(image, groups[:, :5], (2, 6))


def test_save_png_round_trips_through_pillow(tmp_path: Path) -> None:
    image = gradient_image(5, 7)
    path = vis.save_png(tmp_path / "deep" / "picture.png", image)
    with Image.open(path) as saved:
        assert saved.mode == "RGB" and saved.size == (7, 5)
        assert np.array_equal(np.asarray(saved), image)


def test_sample_image_ships_with_the_package() -> None:
    asset = Path(tokenmerge.__file__).parent / "tools" / "assets" / vis.SAMPLE_IMAGE
    assert asset.stat().st_size < 150_000
    image = vis.load_sample_image()
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and image.std() > 20
    assert vis.load_sample_image(size=32).shape == (32, 32, 3)


def test_visualize_draws_the_groups_of_a_merged_forward(timm_tiny_vit: Callable[..., nn.Module]) -> None:
    model = timm_tiny_vit()
    image = vis.load_sample_image(size=32)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # (1, 3, 32, 32)
    with tokenmerge.apply(model, tokenmerge.ToMe(r=12, trace_source=True)), torch.no_grad():
        model(batch)
        record = merge_record(model)
    assert record is not None
    groups = record.patch_groups()[0]  # (64,)
    out = vis.visualize(image, record)
    assert out.shape == image.shape
    assert np.array_equal(out, vis.draw_groups(image, groups, (8, 8)))
    assert len(np.unique(groups.numpy())) == record.num_tokens - 1
