"""`MergeConfig`: a merging policy as plain data."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import TokenMergeError, check, check_bool, check_instance, check_int, is_int
from .placements import DOWNSAMPLES, KeyValues, Placement, ResidualRange, SubLayers, TokenStream
from .plan import MERGE_MODES, MergeMode
from .policies.base import Matcher, PairCache, ThresholdPolicy
from .policies.caches import NoCache

__all__ = ["MergeConfig", "LEGACY_FIELDS", "MAX_SEED"]

#: Largest seed: what `torch.Generator.manual_seed` takes as a non-negative int64 (the
#: counter-based partitions of `tokenmerge.policies.rng` hash any int).
MAX_SEED = 2**63 - 1


class _Deprecated:
    """The default of a deprecated field: not given."""

    def __repr__(self) -> str:
        return "<deprecated>"


_NOT_GIVEN: Any = _Deprecated()

#: The deprecated fields of `MergeConfig` and the values they meant when not given.
LEGACY_FIELDS: dict[str, Any] = {
    "merge_attn": True,
    "merge_crossattn": False,
    "merge_mlp": False,
    "max_downsample": 1,
    "blocks": None,
    "prop_attn": True,
    "trace_source": False,
    "kv_only": False,
    "options": {},
}

#: ``options`` keys each family default reads (the rest have no placement field).
_OPTION_KEYS: dict[type[Placement], tuple[str, ...]] = {SubLayers: ("grid", "protected"), TokenStream: ("dense",)}


_LEGACY_BOOLS = ("merge_attn", "merge_crossattn", "merge_mlp", "prop_attn", "trace_source", "kv_only")


def _check_legacy(given: dict[str, Any]) -> None:
    """Types and ranges of the deprecated fields ``given`` (before they are compared or translated)."""
    for name, value in given.items():
        if name in _LEGACY_BOOLS:
            check_bool(name, value)
        elif name == "max_downsample":
            check(
                isinstance(value, int) and not isinstance(value, bool) and value in DOWNSAMPLES,
                f"max_downsample must be 1, 2, 4 or 8 (an int); got {value!r}",
            )
        elif name == "blocks" and value is not None:
            ok = isinstance(value, tuple) and len(value) == 2 and all(is_int(b) and b >= 0 for b in value)
            check(
                ok and value[0] <= value[1],
                f"blocks must be None or (first, last) with 0 <= first <= last, two ints (not bools); got {value!r}",
            )
        elif name == "options":
            check_instance("options", value, dict, "a dict (e.g. {'protected': 1})")
            keys = [k for k in value if not isinstance(k, str)]
            check(not keys, f"options keys must be str; got {keys!r}")


def _legacy_of(placement: Placement | None, given: dict[str, Any]) -> dict[str, Any]:
    """The deprecated fields' values that ``placement`` (or, without one, ``given``) amounts to."""
    values = {**LEGACY_FIELDS, "options": {}}
    if placement is None:
        values.update(given)
        values["options"] = dict(values["options"])
    elif isinstance(placement, SubLayers):
        values.update(
            merge_attn=placement.attn,
            merge_crossattn=placement.cross_attn,
            merge_mlp=placement.mlp,
            max_downsample=placement.max_downsample,
        )
        if placement.protected:
            values["options"]["protected"] = placement.protected
        if placement.grid is not None:
            values["options"]["grid"] = placement.grid
    elif isinstance(placement, KeyValues):
        values.update(kv_only=True, max_downsample=placement.max_downsample)
    elif isinstance(placement, ResidualRange):
        values.update(blocks=placement.blocks, prop_attn=placement.prop_attn)
    elif isinstance(placement, TokenStream):
        values.update(blocks=placement.blocks, prop_attn=placement.prop_attn, trace_source=placement.trace_source)
        if placement.dense is not None:
            values["options"]["dense"] = placement.dense
    return values


def _legacy_property(name: str) -> property:
    def get(self: MergeConfig) -> Any:
        return _legacy_of(self.placement, self._legacy)[name]

    get.__doc__ = (
        f"Deprecated: what the placement amounts to for the old field ``{name}`` (read-only); "
        "set ``placement`` instead."
    )
    return property(get)


@dataclass(init=False, repr=False)
class MergeConfig:
    """A merging policy composed from a matcher, a threshold policy and a pair cache, and where it merges.

    The presets (`ToMe`, `ToMeSD`, `CAToMe`, `ToDo`) return one; build your own for a
    custom composition. *Where* tokens merge is the ``placement``
    (`tokenmerge.placements`): each adapter accepts the placements its models can
    honour and refuses the others at `tokenmerge.apply` time.

    The fields the placements replaced (``merge_attn`` to ``options`` below) still
    work: given a value other than their old default they raise a `DeprecationWarning`,
    and they are translated when the config is applied, for the model's family (see
    `placement_for`). Read back, they show what the placement amounts to. They cannot
    be combined with ``placement``.

    Args:
        matcher: splits tokens into sources and destinations (`Matcher`).
        threshold: decides how many sources merge (`ThresholdPolicy`).
        cache: decides when plans are recomputed (`PairCache`); `NoCache` by default.
        mode: how merged tokens combine: ``"mean"``, ``"weighted"`` (by token size)
            or ``"sum"``.
        seed: seed of the generator random matchers draw from (None: fresh entropy;
            else an int in ``[0, 2**63)``, `MAX_SEED` at most); merging never touches
            the global RNG or the user's generator. The generator is re-seeded at the
            start of every generation, so identical calls give identical results.
        merge_attn: deprecated, `SubLayers.attn`.
        merge_crossattn: deprecated, `SubLayers.cross_attn`.
        merge_mlp: deprecated, `SubLayers.mlp`.
        max_downsample: deprecated, `SubLayers.max_downsample` / `KeyValues.max_downsample`.
        blocks: deprecated, `ResidualRange` on DiT/PixArt, `TokenStream.blocks` on a ViT.
        prop_attn: deprecated, `TokenStream.prop_attn` / `ResidualRange.prop_attn`.
        trace_source: deprecated, `TokenStream.trace_source`.
        kv_only: deprecated, `KeyValues`.
        options: deprecated: ``'dense'`` is `TokenStream.dense`, ``'protected'`` and
            ``'grid'`` are `SubLayers.protected` and `SubLayers.grid`.
        placement: where merging acts: `SubLayers`, `KeyValues`, `ResidualRange` or
            `TokenStream`; None lets the adapter pick its family's default
            (`SubLayers()` for diffusion models and block stacks, `TokenStream()` for
            a ViT).
    """

    matcher: Matcher
    threshold: ThresholdPolicy
    cache: PairCache = field(default_factory=NoCache)
    mode: MergeMode = "mean"
    seed: int | None = None
    placement: Placement | None = None
    #: The deprecated fields given a value other than their old default (carried over by `replace`).
    _legacy: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init__(
        self,
        matcher: Matcher,
        threshold: ThresholdPolicy,
        cache: PairCache | None = None,
        mode: MergeMode = "mean",
        seed: int | None = None,
        merge_attn: bool = _NOT_GIVEN,
        merge_crossattn: bool = _NOT_GIVEN,
        merge_mlp: bool = _NOT_GIVEN,
        max_downsample: int = _NOT_GIVEN,
        blocks: tuple[int, int] | None = _NOT_GIVEN,
        prop_attn: bool = _NOT_GIVEN,
        trace_source: bool = _NOT_GIVEN,
        kv_only: bool = _NOT_GIVEN,
        options: dict[str, Any] = _NOT_GIVEN,
        placement: Placement | None = None,
        *,
        _legacy: dict[str, Any] | None = None,
    ) -> None:
        old = (merge_attn, merge_crossattn, merge_mlp, max_downsample, blocks, prop_attn, trace_source, kv_only)
        given = {name: value for name, value in zip(LEGACY_FIELDS, (*old, options)) if value is not _NOT_GIVEN}
        _check_legacy(given)  # first: a tensor or a str compared with the old default would crash or pass
        self.matcher = matcher
        self.threshold = threshold
        self.cache = NoCache() if cache is None else cache
        self.mode = mode
        self.seed = seed
        self.placement = placement
        changed = {name: value for name, value in given.items() if value != LEGACY_FIELDS[name]}
        if placement is not None and changed:
            shown = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            raise TokenMergeError(
                f"placement={placement!r} cannot be combined with the deprecated fields {shown}: "
                "put those settings into the placement"
            )
        self._legacy = _merge_legacy(dict(_legacy or {}), given, stacklevel=3)
        self.validate()

    merge_attn = _legacy_property("merge_attn")
    merge_crossattn = _legacy_property("merge_crossattn")
    merge_mlp = _legacy_property("merge_mlp")
    max_downsample = _legacy_property("max_downsample")
    blocks = _legacy_property("blocks")
    prop_attn = _legacy_property("prop_attn")
    trace_source = _legacy_property("trace_source")
    kv_only = _legacy_property("kv_only")
    options = _legacy_property("options")

    def __repr__(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in ("matcher", "threshold", "cache", "mode", "seed")]
        if self.placement is not None or not self._legacy:
            parts.append(f"placement={self.placement!r}")
        parts += [f"{name}={value!r}" for name, value in self._legacy.items()]
        return f"MergeConfig({', '.join(parts)})"

    def validate(self) -> None:
        """Raise `TokenMergeError` naming the first argument that is out of range."""
        check(isinstance(self.matcher, Matcher), f"matcher must be a tokenmerge.policies.Matcher; got {self.matcher!r}")
        check(
            isinstance(self.threshold, ThresholdPolicy),
            f"threshold must be a tokenmerge.policies.ThresholdPolicy; got {self.threshold!r}",
        )
        check(isinstance(self.cache, PairCache), f"cache must be a tokenmerge.policies.PairCache; got {self.cache!r}")
        check(self.mode in MERGE_MODES, f"mode must be one of {MERGE_MODES}; got {self.mode!r}")
        check_int("seed", self.seed, 0, MAX_SEED, allow_none=True)
        check(
            self.placement is None or isinstance(self.placement, Placement),
            "placement must be None or a tokenmerge.placements.Placement (SubLayers, KeyValues, ResidualRange, "
            f"TokenStream); got {self.placement!r}",
        )
        if self.placement is not None:
            self.placement.validate()
            shown = ", ".join(f"{k}={v!r}" for k, v in self._legacy.items())
            check(
                not self._legacy,
                f"placement={self.placement.describe()} cannot be combined with the deprecated fields {shown}: "
                "put those settings into the placement",
            )
        _check_legacy(self._legacy)
        self.threshold.validate(self.matcher)

    def placement_for(self, default: type[Placement], family: str = "this model") -> Placement:
        """The placement in effect on a model family whose default placement is ``default``.

        An explicit ``placement`` is returned as it is (the adapter then accepts or
        refuses its type). Without one, the deprecated fields are translated:
        ``blocks`` to `ResidualRange` (or `TokenStream.blocks` when ``default`` is
        `TokenStream`), ``kv_only`` to `KeyValues`, the rest to ``default``.

        Args:
            default: the family's default placement class (`SubLayers` or `TokenStream`).
            family: the model family, for error messages (e.g. ``"a ViT"``).

        Raises:
            TokenMergeError: when a deprecated field has no counterpart in the family's
                placements (``kv_only`` on a ViT, ``trace_source`` on a UNet, say).
        """
        if self.placement is not None:
            return self.placement
        old = _legacy_of(None, self._legacy)
        options = dict(old["options"])
        allowed = _OPTION_KEYS.get(default, ())
        unknown = sorted(set(options) - set(allowed))
        check(not unknown, f"options for {family} may only contain {list(allowed)}; got {unknown}")
        if issubclass(default, TokenStream):
            check(not old["merge_crossattn"], f"merge_crossattn must be False: {family} has no cross-attention")
            check(not old["kv_only"], f"kv_only is not supported on {family}: tokens merge in the residual stream")
            dense = options.get("dense")
            check(dense is None or isinstance(dense, bool), f"options['dense'] must be a bool; got {dense!r}")
            return TokenStream(
                blocks=old["blocks"],
                prop_attn=bool(old["prop_attn"]),
                trace_source=bool(old["trace_source"]),
                dense=dense,
            )
        check(
            not old["trace_source"],
            f"trace_source is not supported for {family}: it keeps token sources in a ViT's TokenStream",
        )
        if old["blocks"] is not None:
            check(not old["kv_only"], "kv_only cannot be combined with blocks (block-range merging)")
            first, last = old["blocks"]
            return ResidualRange(first, last, prop_attn=bool(old["prop_attn"]))
        if old["kv_only"]:
            check(bool(old["merge_attn"]), "kv_only merges self-attention keys/values: merge_attn must be True")
            return KeyValues(max_downsample=old["max_downsample"])
        return SubLayers(
            attn=bool(old["merge_attn"]),
            cross_attn=bool(old["merge_crossattn"]),
            mlp=bool(old["merge_mlp"]),
            max_downsample=old["max_downsample"],
            protected=options.get("protected", 0),
            grid=options.get("grid"),
        )

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with some fields changed (validated again).

        Changing a deprecated field of a config that has a placement turns the
        placement back into the deprecated fields it amounts to, then applies the
        change (with a `DeprecationWarning`); giving ``placement`` drops the
        deprecated fields.
        """
        legacy_changes = {name: changes.pop(name) for name in list(changes) if name in LEGACY_FIELDS}
        if "placement" in changes:
            check(
                not legacy_changes,
                f"placement cannot be combined with the deprecated fields {sorted(legacy_changes)}",
            )
            legacy: dict[str, Any] = {}
        elif legacy_changes:
            current = self.placement
            base = {k: v for k, v in _legacy_of(current, self._legacy).items() if v != LEGACY_FIELDS[k]}
            legacy = _merge_legacy(base, legacy_changes, stacklevel=3)
            changes["placement"] = None
        else:
            legacy = dict(self._legacy)
        current = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_legacy"}
        unknown = sorted(set(changes) - set(current))
        check(not unknown, f"MergeConfig has no field {', '.join(map(repr, unknown))}; fields: {sorted(current)}")
        return MergeConfig(**{**current, **changes}, _legacy=legacy)

    def fresh_cache(self) -> PairCache:
        """An empty copy of the configured cache, for one model."""
        cache = copy.deepcopy(self.cache)
        cache.reset()
        return cache


def _merge_legacy(base: dict[str, Any], given: dict[str, Any], stacklevel: int) -> dict[str, Any]:
    """``base`` updated with the deprecated fields ``given``; warns for the values other than the old default."""
    changed = {name: value for name, value in given.items() if value != LEGACY_FIELDS[name]}
    if changed:
        shown = ", ".join(f"{name}={value!r}" for name, value in changed.items())
        warnings.warn(
            f"MergeConfig fields {shown} are deprecated: pass placement= instead (tokenmerge.placements: "
            "SubLayers, KeyValues, ResidualRange, TokenStream)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
    merged = {**base, **given}
    return {name: value for name, value in merged.items() if value != LEGACY_FIELDS[name]}
