"""The ``tokenmerge`` command: ``demo``, ``visualize`` and ``bench``.

Every command has ``--help``. A user error (a bad argument, a file that cannot be read,
a config a model cannot honour, a missing optional dependency) prints one line on
stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import TokenMergeError
from .common import device_argument

__all__ = ["main", "build_parser", "run_script", "user_error", "OneLineParser", "EXIT_USAGE", "QUICK_DEFAULTS"]

#: Exit status of a user error (the same as argparse's).
EXIT_USAGE = 2

#: Optional dependencies and the extra that installs each.
_EXTRAS = {
    "diffusers": "diffusers",
    "transformers": "diffusers",
    "accelerate": "diffusers",
    "timm": "timm",
    "PIL": "timm",
}


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr, exit status 2 (the command's and the examples')."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see 'PROG --help')`` and exit with status 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int, wanted: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``; errors read ``must be {wanted}; got ...``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wanted}; got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    lowered = {c.lower(): c for c in choices}

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"must name at least one of {', '.join(choices)}")
        unknown = [n for n in names if n.lower() not in lowered]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return [lowered[n.lower()] for n in names]

    return parse


# ---------------------------------------------------------------------- demo
def _add_demo(sub: Any) -> None:
    from .demo import MODEL_NAMES, PRESET_NAMES

    parser = sub.add_parser(
        "demo",
        help="merge tokens in small built-in models and print what it buys",
        description=(
            "Build small models (a diffusion UNet, a DiT and a ViT) without downloading anything, apply each "
            "preset, and print per model: tokens per merged layer, time against the plain model and how close the "
            "output stays to the plain output. The trained models of tokenmerge.tools.zoo are used where their weights "
            "are installed, random-weight ones otherwise. Writes a PNG of the images the trained models generate "
            "with and without each preset, and a PNG of merged token groups. Uses the GPU when there is one."
        ),
    )
    parser.add_argument(
        "--models",
        type=_csv(MODEL_NAMES),
        default=list(MODEL_NAMES),
        metavar="LIST",
        help=f"comma-separated models to run (default: {','.join(MODEL_NAMES)})",
    )
    parser.add_argument(
        "--presets",
        type=_csv(PRESET_NAMES),
        default=list(PRESET_NAMES),
        metavar="LIST",
        help=f"comma-separated presets (default: all that apply: {','.join(PRESET_NAMES)})",
    )
    parser.add_argument(
        "--device", type=device_argument, default="auto", help="auto (GPU if present), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="denoising steps per generation (default: 8 for the trained models, 4 for random-weight ones)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timing rounds, each timing the plain model and every preset once; times are medians and a "
        "speed-up is shown only where the rounds agree within 15%% (default: 5 on a CPU, 10 on a GPU)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of weights, inputs and merging")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tokenmerge-demo.png"),
        help="where to write the picture of merged tokens (default: ./tokenmerge-demo.png)",
    )
    parser.add_argument(
        "--grid",
        type=Path,
        default=Path("tokenmerge-demo-images.png"),
        help="where to write the trained models' images with and without each preset "
        "(default: ./tokenmerge-demo-images.png)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build every model with random weights, even where tokenmerge.tools.zoo's trained ones are installed",
    )
    parser.add_argument("--zoo-weights", type=Path, default=None, help="read the trained models' weights from here")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        models=args.models,
        presets=args.presets,
        device=args.device,
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
        stream=sys.stdout,
        zoo=not args.random_weights,
        weights_dir=args.zoo_weights,
        grid=args.grid,
    )
    return 0


# ---------------------------------------------------------------------- bench, fidelity
#: Commands that live in their own module: (name, module, add-arguments function, main function, help).
_MODULE_COMMANDS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "bench",
        "tokenmerge.tools.bench",
        "add_bench_arguments",
        "bench_main",
        "time merging against the plain model, eager and compiled, with memory and fidelity",
    ),
    (
        "fidelity",
        "tokenmerge.tools.fidelity",
        "add_fidelity_arguments",
        "fidelity_main",
        "image quality of every method on the trained reference models (PSNR, SSIM, distance)",
    ),
)


#: Defaults of ``tokenmerge bench`` and ``tokenmerge fidelity`` on a CPU: each finishes in about
#: three minutes on two cores. On a GPU, or with ``--full``, the modules' own (full) defaults apply.
QUICK_DEFAULTS: dict[str, dict[str, Any]] = {
    "bench": {"compile_modes": ["eager"], "warmup": 1, "repeats": 5, "schedule": 10, "sample_steps": 8},
    "fidelity": {
        "seeds": 1,
        "images_per_seed": 2,
        "steps": 10,
        "ratios": "0.5",
        "thresholds": "0.7",
    },
}


def _shown(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


class _QuickOrFull:
    """Runs a command with `QUICK_DEFAULTS` on a CPU and its module's own defaults on a GPU or with ``--full``.

    Only the options left at their default change; the choice is printed on stderr first.
    """

    def __init__(
        self, name: str, run: Callable[[argparse.Namespace], int], full: dict[str, Any], options: dict[str, str]
    ) -> None:
        self.name, self.run, self.full, self.options = name, run, full, options

    def __call__(self, args: argparse.Namespace) -> int:
        from .common import resolve_device

        quick = not args.full and resolve_device(getattr(args, "device", "cpu")).type == "cpu"
        chosen = QUICK_DEFAULTS[self.name] if quick else self.full
        unset = [dest for dest in chosen if getattr(args, dest) is None]
        for dest in unset:
            setattr(args, dest, chosen[dest])
        if quick and unset:
            options = " ".join(f"{self.options[dest]} {_shown(chosen[dest])}" for dest in unset)
            print(
                f"tokenmerge {self.name}: CPU sizes ({options}; about 3 minutes on two cores); --full: full sizes",
                file=sys.stderr,
                flush=True,
            )
        return self.run(args)


def _with_defaults_shown(parser: argparse.ArgumentParser, quick: dict[str, Any]) -> dict[str, Any]:
    """Write every option's default into its help; options in ``quick`` get both defaults.

    Returns the full defaults of the options in ``quick`` (their parser default becomes None).
    """
    full: dict[str, Any] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in ("help", "full") or not action.option_strings:
            continue
        text = (action.help or "").replace("%(default)s", _shown(action.default))
        text = re.sub(r"\s*\(default: [^)]*\)|;\s*default: .*$", "", text)
        if action.dest in quick:
            full[action.dest] = action.default
            action.default = None
            text += f" (default: {_shown(quick[action.dest])} on a CPU, {_shown(full[action.dest])} with --full)"
        elif (
            action.default is not None
            and action.default is not False
            and action.default != ""
            and ("default" not in text)
        ):
            text += f" (default: {_shown(action.default)})"
        action.help = text.strip().replace("%", "%%")
    return full


def _add_module_commands(sub: Any) -> None:
    """Register each command of `_MODULE_COMMANDS` whose module is part of this installation."""
    for name, module_name, add, run, help_text in _MODULE_COMMANDS:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip().split("\n\n")[0]
        parser = sub.add_parser(name, help=help_text, description=doc)
        getattr(module, add)(parser)
        quick = QUICK_DEFAULTS.get(name, {})
        parser.add_argument(
            "--full",
            action="store_true",
            help="the full sizes on a CPU too (a GPU always takes them); without it a CPU run takes the smaller "
            "defaults shown above, about 3 minutes on two cores",
        )
        full = _with_defaults_shown(parser, quick)
        options = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
        command = getattr(module, run)
        parser.set_defaults(run=_QuickOrFull(name, command, full, options) if quick else command)


# ---------------------------------------------------------------------- visualize
def _add_visualize(sub: Any) -> None:
    parser = sub.add_parser(
        "visualize",
        help="draw the token groups a ViT merges over an image",
        description=(
            "Run a timm Vision Transformer with ToMe over IMAGE, keeping which patches each merged token covers, "
            "and write a PNG: the image beside its merged groups, each filled with its mean colour. The ViT is the "
            "trained reference ViT shipped with tokenmerge (vit-photos) unless --arch names a timm architecture "
            "(seeded random weights, or --checkpoint's local state dict); nothing is downloaded."
        ),
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="an image file (PNG, JPEG, ...)")
    parser.add_argument("--r", type=_non_negative_int, default=None, help="tokens merged per block (default: 8 and 12)")
    parser.add_argument(
        "--arch",
        default=None,
        help="timm architecture with seeded random weights or --checkpoint (default: the trained vit-photos; "
        "vit_tiny_patch16_224 with --checkpoint)",
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="local state dict for --arch")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (default: IMAGE-merged.png beside it)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--device", type=device_argument, default="auto", help="auto (GPU if present), cpu, cuda, cuda:N or mps"
    )
    parser.set_defaults(run=_run_visualize)


def _run_visualize(args: argparse.Namespace) -> int:
    from .demo import visualize_image

    if not args.image.is_file():
        raise TokenMergeError(f"IMAGE must be an existing image file; got {str(args.image)!r} (no such file)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise TokenMergeError(f"--checkpoint must be an existing file; got {str(args.checkpoint)!r} (no such file)")
    out = args.out if args.out is not None else args.image.with_name(f"{args.image.stem}-merged.png")
    written = visualize_image(
        args.image, out, args.r, arch=args.arch, checkpoint=args.checkpoint, seed=args.seed, device=args.device
    )
    print(f"wrote {written.resolve()}")
    return 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The ``tokenmerge`` argument parser with every available sub-command."""
    from .. import __version__

    parser = OneLineParser(
        prog="tokenmerge",
        description="Token merging (ToMe, ToMeSD, CA-ToMe, ToDo) for diffusers and timm models.",
        epilog="Start with 'tokenmerge demo'. Each command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"tokenmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_visualize, _add_module_commands):
        add(sub)
    return parser


def _missing_dependency(error: ModuleNotFoundError) -> str | None:
    top = (error.name or "").split(".")[0]
    if top in _EXTRAS:
        return f"this command needs {top}: pip install 'tokenmerge[{_EXTRAS[top]}]'"
    return None


def user_error(error: BaseException) -> str | None:
    """The one line a user error prints, or None when ``error`` is not one (a bug: its traceback shows)."""
    if isinstance(error, TokenMergeError):
        return str(error)
    if isinstance(error, ModuleNotFoundError):
        return _missing_dependency(error)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokenmerge`` command; returns the exit status.

    Args:
        argv: the arguments (without the program name); ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 on a user error (one line on stderr), 130 when interrupted.
    """

    def run() -> int:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)

    return _run_reporting("tokenmerge", run)


def run_script(main: Callable[[], object], prog: str, load_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run an example script's ``main()`` and exit: a user error is one line on stderr, status 2.

    Args:
        main: the script's entry point.
        prog: the name in the error line (``sd.py``).
        load_errors: more exception types that are the user's to fix (a model that
            cannot be found or read: ``OSError``), printed as one line too.
    """

    def run() -> int:
        try:
            result = main()
        except load_errors as error:
            raise TokenMergeError(str(error).strip().splitlines()[0]) from None
        return result if isinstance(result, int) else 0

    sys.exit(_run_reporting(prog, run))


def _run_reporting(prog: str, run: Callable[[], int]) -> int:
    """``run()``, with user errors as one line on stderr (status 2) and an interrupt as status 130."""
    try:
        return run()
    except (TokenMergeError, ModuleNotFoundError) as error:
        message = user_error(error)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m tokenmerge.tools.cli (accelerate launch -m tokenmerge.tools.cli ...)
    raise SystemExit(main())
