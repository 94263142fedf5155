"""The helpers the tools share (`tokenmerge.tools.common`, `tokenmerge.tools.tiny`): one of each, used everywhere."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from tokenmerge import TokenMergeError
from tokenmerge.tools import bench, cli, common, demo, fidelity
from tokenmerge.tools.zoo import train

# ---------------------------------------------------------------------------- PSNR


def test_psnr_on_known_inputs() -> None:
    zeros = torch.zeros(2, 3, 4, 4)
    assert common.PSNR_PEAK == 1.0
    assert common.psnr(zeros, zeros) == math.inf
    assert common.psnr(zeros + 0.1, zeros) == pytest.approx(20.0)  # MSE 0.01: 10 * log10(1 / 0.01)
    assert common.psnr(zeros + 1.0, zeros) == pytest.approx(0.0)  # an error as large as the peak
    half = torch.zeros(4)
    half[:2] = 0.5  # MSE = 0.125 over the pooled elements
    assert common.psnr(half, torch.zeros(4)) == pytest.approx(10 * math.log10(8.0))
    # A fixed peak: the figure depends on the error only, not on the reference's value range.
    reference = torch.linspace(-4, 4, 64)
    assert common.psnr(reference + 0.1, reference) == pytest.approx(20.0)
    low_precision = torch.full((8,), 0.3, dtype=torch.float16)  # computed in float64 whatever comes in
    assert common.psnr(low_precision, torch.full((8,), 0.2)) == pytest.approx(20.0, abs=0.1)


def test_psnr_refuses_different_shapes() -> None:
    with pytest.raises(TokenMergeError, match=r"output must have the reference's shape \(2, 3\); got \(3, 2\)"):
        common.psnr(torch.zeros(3, 2), torch.zeros(2, 3))


def test_every_tool_uses_the_one_psnr() -> None:
    assert demo.PSNR.measure is common.psnr
    assert bench.psnr is common.psnr
    assert fidelity.psnr_from_mse is common.psnr_from_mse  # pooled over the processes' squared errors
    assert common.psnr(torch.ones(2), torch.zeros(2)) == common.psnr_from_mse(1.0) == 0.0
    for module in (demo, bench, fidelity):
        assert "psnr" not in getattr(module, "__all__", ())  # not re-exported under a second name


# ---------------------------------------------------------------------------- devices

ACCEPTED = ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", torch.device("cpu")]
REFUSED = ["tpu", "gpu", "CPU", "cuda:", "cuda:x", "cuda:0:1", "", "meta", "xpu", " cpu"]


@pytest.mark.parametrize("name", ACCEPTED, ids=str)
def test_device_names_accepted(name: object) -> None:
    assert common.check_device_name(name) == str(name)  # type: ignore[arg-type]
    assert common.device_argument(str(name)) == str(name)


@pytest.mark.parametrize("name", REFUSED, ids=repr)
def test_device_names_refused_with_one_message(name: str) -> None:
    message = f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}"
    with pytest.raises(TokenMergeError) as raised:
        common.check_device_name(name)
    assert str(raised.value) == message
    with pytest.raises(TokenMergeError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        common.resolve_device(name)
    with pytest.raises(argparse.ArgumentTypeError) as parsed:
        common.device_argument(name)
    assert str(parsed.value) == message


def test_resolve_device() -> None:
    assert common.resolve_device("cpu") == torch.device("cpu")
    assert common.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert common.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert common.resolve_device() == common.resolve_device("auto")
    with pytest.raises(TokenMergeError, match="device must be a present device; got 'cuda:99'"):
        common.resolve_device("cuda:99")  # no machine has 100 GPUs
    if not torch.backends.mps.is_available():
        with pytest.raises(TokenMergeError, match="device must be a present device; got 'mps'"):
            common.resolve_device("mps")


def _device_types(parser: argparse.ArgumentParser) -> list[object]:
    found = []
    for action in parser._actions:
        if "--device" in action.option_strings:
            found.append(action.type)
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):  # sub-commands
            for sub in choices.values():
                found += _device_types(sub)
    return found


def test_every_command_line_takes_the_same_device_names(capsys: pytest.CaptureFixture[str]) -> None:
    types = _device_types(cli.build_parser())  # demo, visualize, bench, fidelity
    assert len(types) == 4 and all(t is common.device_argument for t in types)
    assert train.parse_args(["--device", "cuda:1", "--steps", "1"]).device == "cuda:1"  # the zoo's training script
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "tpu", "--steps", "1"])
    assert "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'" in capsys.readouterr().err


def test_every_tool_refuses_the_same_device() -> None:
    message = "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"
    with pytest.raises(TokenMergeError, match=message):
        demo.run_demo(models=["vit"], device="tpu", progress=False)
    with pytest.raises(TokenMergeError, match=message):
        demo.build_model("vit", "tpu")
    with pytest.raises(TokenMergeError, match=message):
        bench.run_bench("vit-tiny", device="tpu", progress=False)
    with pytest.raises(TokenMergeError, match=message):
        fidelity.run_fidelity("dit-photos", device="tpu")
    from tokenmerge.tools import zoo

    with pytest.raises(TokenMergeError, match=message):
        zoo.load("dit-photos", device="tpu")


# ---------------------------------------------------------------------------- seeding, progress, sync


def test_seeded_restores_the_callers_rng() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with common.seeded(0):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream went on as if untouched
    with common.seeded(0):
        assert torch.equal(torch.rand(3), inside)


def test_progress_bars_share_one_interface() -> None:
    bar = common.progress(3, "x", enabled=False)
    assert isinstance(bar, common.NoBar)
    with bar as same:
        same.total = 4
        for method in ("update", "set_description", "set_postfix_str", "clear", "refresh"):
            getattr(same, method)(*(("text",) if method.startswith("set") else ()))
    tqdm_bar = common.progress(3, "x", enabled=True)  # hidden: stderr is not a terminal here
    with tqdm_bar as same:
        same.total = 4
        same.update()
        same.set_description("y")
        same.set_postfix_str("z")
        same.clear()
        same.refresh()


def test_synchronize_on_the_cpu_is_a_no_op() -> None:
    common.synchronize("cpu")
    common.synchronize(torch.device("cpu"))


def test_no_tool_keeps_its_own_copy_of_a_shared_helper() -> None:
    from tokenmerge.tools import bench_timing

    for module in (demo, bench, bench_timing, fidelity, train):
        for name in ("_sync", "_synchronize", "_progress", "_NoBar", "_seeded", "_seeded_global_rng"):
            assert not hasattr(module, name), f"{module.__name__}.{name}"
    assert not hasattr(bench_timing, "resolve_device") or bench_timing.resolve_device is common.resolve_device
    assert demo.resolve_device is common.resolve_device and bench.resolve_device is common.resolve_device


# ---------------------------------------------------------------------------- tiny models


def test_tiny_builders_take_an_init_and_config_overrides() -> None:
    from tokenmerge.tools import tiny

    default = tiny.tiny_sd_unet(0)
    assert torch.equal(next(default.parameters()), next(tiny.tiny_sd_unet(0).parameters()))  # seeded
    two_levels = dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    wide = tiny.tiny_sd_unet(1, 32, init="default", **two_levels)
    assert wide.config.block_out_channels == (32, 64) and wide.config.sample_size == 32 and not wide.training
    again = tiny.tiny_sd_unet(1, 32, init="default", **two_levels)
    assert all(torch.equal(a, b) for a, b in zip(wide.parameters(), again.parameters()))
    assert all(p.any() for p in wide.parameters() if p.dim() > 1)  # no zero-initialised weight is left at zero
    dit = tiny.tiny_dit(0, 16, 2, init="default", num_attention_heads=4, attention_head_dim=16)
    assert dit.config.num_attention_heads == 4 and len(dit.transformer_blocks) == 2
    with pytest.raises(TokenMergeError, match="init must be one of normal, default; got 'zeros'"):
        tiny.tiny_dit(init="zeros")


def test_the_demo_builds_its_random_weight_models_with_tiny() -> None:
    unet = demo.build_model("unet", "cpu", steps=1, zoo=False)
    dit = demo.build_model("dit", "cpu", steps=1, zoo=False)
    assert type(unet.target).__name__ == "UNet2DConditionModel" and unet.target.config.block_out_channels == (32, 64)
    assert type(dit.target).__name__ == "DiTTransformer2DModel" and dit.target.config.num_attention_heads == 4
    assert unet.job().isfinite().all() and dit.job().isfinite().all()


# ---------------------------------------------------------------------------- the layout


def test_the_top_level_holds_the_core_and_the_tools_package_only() -> None:
    import subprocess
    import sys
    from pathlib import Path

    import tokenmerge
    import tokenmerge.policies

    package = Path(tokenmerge.__file__).parent
    tooling = ["cli.py", "demo.py", "vis.py", "fidelity.py", "zoo", "assets", *(p.name for p in package.glob("bench*"))]
    assert [name for name in tooling if (package / name).exists()] == []
    assert not (package / "policies" / "ideal.py").exists()  # now tokenmerge/tools/ideal.py
    assert not (package / "adapters" / "diffusion_tiny.py").exists()  # now tokenmerge/tools/tiny.py
    assert not hasattr(tokenmerge.policies, "IdealMatcher")  # benchmark machinery, not a user's policy
    code = (
        "import sys, tokenmerge, tokenmerge.policies, tokenmerge.adapters; "
        "core = sorted(m for m in sys.modules if m.startswith('tokenmerge.tools')); "
        "import tokenmerge.tools; "
        "tools = sorted(m for m in sys.modules if m.startswith('tokenmerge.tools.')); "
        "print(core, tools, sorted(m for m in ('diffusers', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] [] []"  # the core never imports the tools; the tools package imports nothing
