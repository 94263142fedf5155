"""The rows of a benchmark: plain, tokenmerge methods from short specs, their ideals, tomesd.

A method spec is ``NAME[:VALUE][,key=value...]``, for instance ``tomesd:0.5``,
``catome:0.7,buckets=4``, ``tome:13``, ``todo:2`` or ``block:0.5,blocks=2-25``:

=========  ==========================================  =====================================
NAME       builds                                      VALUE
=========  ==========================================  =====================================
tomesd     `tokenmerge.ToMeSD`                         ratio
catome     `tokenmerge.CAToMe`                         threshold
tome       `tokenmerge.ToMe`                           r per block
todo       `tokenmerge.ToDo`                           downsample factor
block      ToMeSD's matcher over a block range         ratio (patch transformers' residual stream)
=========  ==========================================  =====================================

The keys are the preset's keyword arguments (``max_downsample=2``, ``merge_mlp=1``
(on/off arguments as 0/1 or true/false; 0/1 become bools here, the presets take bools only),
``recompute_at=0/10/20``, ``seed=1``); ``block`` takes ``blocks=FIRST-LAST`` (default:
all but the first and last 1/14 of the blocks) and ``prop_attn`` (default off: a mask
takes SDPA off its flash kernel). The ``tomesd`` *library* is a separate row kind
(`Method.tomesd`), used only as a reference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import presets
from ..api import apply
from ..config import MergeConfig
from ..errors import TokenMergeError
from ..placements import ResidualRange
from ..policies.caches import NoCache
from ..policies.matchers import RandomGrid
from ..policies.thresholds import FixedRatio
from .ideal import IdealMatcher, TokenCounts

__all__ = ["Method", "parse_method", "tomesd_available", "mean_token_counts", "merged_fraction"]

Detach = Callable[[], None]


@dataclass
class Method:
    """One row kind of the benchmark.

    Attributes:
        label: the name in tables.
        kind: ``"plain"``, ``"tokenmerge"``, ``"ideal"`` or ``"tomesd"``.
        spec: the spec it was parsed from (tomesd: its ratio; ideal: its method's label).
        build: model -> `MergeConfig` (tokenmerge and ideal rows).
        ratio: tomesd's ratio.
        ideal_of: for an ideal row, the label of the method whose token counts it replays.
        stateful: True when the config caches plans or reads values (planning runs outside
            compiled graphs; timed over whole schedules).
    """

    label: str
    kind: str
    spec: str = ""
    build: Callable[[nn.Module], MergeConfig] | None = None
    ratio: float | None = None
    ideal_of: str | None = None
    stateful: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def plain(cls) -> Method:
        """The unpatched model."""
        return cls(label="plain", kind="plain", spec="plain")

    @classmethod
    def tomesd(cls, ratio: float) -> Method:
        """The tomesd library at ``ratio`` (its defaults otherwise), as a reference row."""
        return cls(label=f"tomesd lib r={ratio:g}", kind="tomesd", spec=f"tomesd-lib:{ratio:g}", ratio=float(ratio))

    @classmethod
    def ideal(cls, of: Method, counts: Mapping[str, int], config: MergeConfig) -> Method:
        """The zero-overhead reference at ``counts`` (layer -> tokens removed) with ``config``'s hooks."""
        ideal_config = config.replace(matcher=IdealMatcher(), threshold=TokenCounts(dict(counts)), cache=NoCache())
        return cls(
            label=f"ideal@{of.label}",
            kind="ideal",
            spec=f"ideal:{of.spec}",
            build=lambda model: ideal_config,
            ideal_of=of.label,
        )

    def attach(self, model: nn.Module) -> tuple[Detach, Any]:
        """Patch ``model`` for this row; returns ``(detach, handle)`` (handle: the `MergeHandle` or None)."""
        if self.kind == "plain":
            return (lambda: None), None
        if self.kind == "tomesd":
            import tomesd

            tomesd.apply_patch(model, ratio=self.ratio)
            return (lambda: tomesd.remove_patch(model)), None
        assert self.build is not None
        handle = apply(model, self.build(model))
        return handle.remove, handle


def tomesd_available() -> bool:
    """Whether the tomesd library is importable."""
    return importlib.util.find_spec("tomesd") is not None


# ---------------------------------------------------------------------- parsing
def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "/" in text:
        return tuple(int(v) for v in text.split("/") if v)
    if "-" in text[1:] and all(part.isdigit() for part in text.split("-")):
        first, last = text.split("-")
        return (int(first), int(last))
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


#: The presets' on/off arguments: a spec may write them 0/1 (``merge_mlp=1``), as for tomesd.
_FLAGS = ("merge_attn", "merge_crossattn", "merge_mlp", "use_rand", "prop_attn", "trace_source")


def _flags_to_bools(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the on/off arguments given as 0/1 turned into bools (the presets take bools only)."""
    return {k: bool(v) if k in _FLAGS and type(v) is int and v in (0, 1) else v for k, v in kwargs.items()}


#: The block lists of the patch transformers, in the order they run (one index space across them:
#: Flux's 19 double-stream blocks are 0-18, its 38 single-stream blocks 19-56; Wan's are ``blocks``).
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def _block_range(model: nn.Module, blocks: tuple[int, int] | None) -> tuple[int, int]:
    count = sum(len(getattr(model, name, [])) for name in _BLOCK_LISTS)
    if count == 0:
        raise TokenMergeError(
            "method 'block' needs a patch transformer (DiT, PixArt, Flux, SD3, Wan) with transformer_blocks or blocks"
        )
    if blocks is not None:
        return blocks
    margin = count // 14
    return (margin, count - 1 - margin)


def _block_config(ratio: float, seed: int, kwargs: dict[str, Any]) -> Callable[[nn.Module], MergeConfig]:
    blocks = kwargs.pop("blocks", None)
    prop_attn = kwargs.pop("prop_attn", False)
    sx, sy, st = kwargs.pop("sx", 2), kwargs.pop("sy", 2), kwargs.pop("st", 1)  # checked by RandomGrid
    use_rand = kwargs.pop("use_rand", True)
    mode = kwargs.pop("mode", "mean")
    if kwargs:
        raise TokenMergeError(
            f"method 'block' takes blocks, prop_attn, sx, sy, st, use_rand, mode, seed; got {sorted(kwargs)}"
        )

    def build(model: nn.Module) -> MergeConfig:
        return MergeConfig(
            matcher=RandomGrid(sx=sx, sy=sy, use_rand=use_rand, st=st),
            threshold=FixedRatio(ratio),
            mode=mode,
            seed=seed,
            placement=ResidualRange(*_block_range(model, blocks), prop_attn=prop_attn),
        )

    # Validate what can be validated before the model is known (the block range needs it).
    MergeConfig(matcher=RandomGrid(sx=sx, sy=sy, use_rand=use_rand, st=st), threshold=FixedRatio(ratio), mode=mode)
    return build


_PRESETS: dict[str, tuple[str, Callable[..., MergeConfig], str]] = {
    "tomesd": ("ToMeSD", presets.ToMeSD, "ratio"),
    "catome": ("CAToMe", presets.CAToMe, "threshold"),
    "tome": ("ToMe", presets.ToMe, "r"),
    "todo": ("ToDo", presets.ToDo, "downsample"),
}


def parse_method(spec: str, seed: int = 0) -> Method:
    """A `Method` from a spec string (see the module docstring); `TokenMergeError` on a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise TokenMergeError(f"method must be a spec like 'tomesd:0.5' or 'catome:0.7,buckets=4'; got {spec!r}")
    head, *options = [part.strip() for part in spec.split(",")]
    name, _, value = head.partition(":")
    name = name.lower()
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or not key:
            raise TokenMergeError(f"method options must be key=value; got {option!r} in {spec!r}")
        kwargs[key.strip()] = _value(text.strip())
    seed = int(kwargs.pop("seed", seed))
    if name == "plain":
        return Method.plain()
    if name == "block":
        ratio = float(_value(value)) if value else 0.5
        build = _block_config(ratio, seed, _flags_to_bools(kwargs))  # labels keep the spec's 0/1
        label = "block r=" + f"{ratio:g}" + "".join(f",{k}={_show(v)}" for k, v in kwargs.items())
        return Method(label=label, kind="tokenmerge", spec=spec, build=build)
    if name not in _PRESETS:
        raise TokenMergeError(
            f"method name must be one of plain, block, {', '.join(_PRESETS)}; got {name!r} in {spec!r}"
        )
    title, preset, first = _PRESETS[name]
    if value:
        kwargs = {first: _value(value), **kwargs}
    kwargs["seed"] = seed
    try:
        config = preset(**_flags_to_bools(kwargs))  # labels keep the spec's 0/1
    except TypeError as error:
        raise TokenMergeError(f"method {spec!r}: {error}") from None
    shown = {k: v for k, v in kwargs.items() if k != "seed"}
    label = title + "(" + ", ".join(_show(v) if k == first else f"{k}={_show(v)}" for k, v in shown.items()) + ")"
    stateful = not (config.cache.stateless and config.threshold.traceable and config.matcher.traceable)
    return Method(label=label, kind="tokenmerge", spec=spec, build=lambda model: config, stateful=stateful)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------- token counts
def mean_token_counts(snapshots: list[dict[str, tuple[int, int]]]) -> dict[str, int]:
    """Per layer, the tokens removed averaged over ``snapshots`` of `MergeState.merged_tokens`, rounded."""
    totals: dict[str, list[int]] = {}
    for snapshot in snapshots:
        for layer, (num_in, num_out) in snapshot.items():
            totals.setdefault(layer, []).append(num_in - num_out)
    return {layer: round(sum(values) / len(values)) for layer, values in totals.items()}


def merged_fraction(tokens: Mapping[str, tuple[int, int]] | None) -> float | None:
    """Tokens removed over tokens entering, summed over the merging layers (None if unknown)."""
    if not tokens:
        return None
    total_in = sum(num_in for num_in, _ in tokens.values())
    removed = sum(num_in - num_out for num_in, num_out in tokens.values())
    return removed / total_in if total_in else None
