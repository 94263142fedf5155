"""The adapter interface: where a model family's quirks live, and nowhere else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..config import MergeConfig
from ..errors import TokenMergeError
from ..hooks import HookSet
from ..placements import Placement
from ..state import MergeState

__all__ = ["Adapter", "check_layer_counts"]


def _threshold_policies(policy: Any) -> list[Any]:
    """``policy`` and, for a `Scheduled` one, the policies of its stages and its default."""
    found = [policy]
    for _, stage in getattr(policy, "stages", None) or []:
        found += _threshold_policies(stage)
    default = getattr(policy, "default", None)
    if default is not None and default is not policy:
        found += _threshold_policies(default)
    return found


def check_layer_counts(config: MergeConfig, num_layers: int, where: str) -> None:
    """Refuse a per-layer ``r`` (`FixedCount`, also inside `Scheduled`) whose length is not ``num_layers``.

    Every adapter calls it from `Adapter.check` with the number of layers that merge
    in the target (ViT blocks in ``TokenStream.blocks``, UNet/DiT blocks within
    ``max_downsample``, one plan per `ResidualRange`), so the mistake is reported at
    `tokenmerge.apply`, not at the first forward.

    Args:
        config: the config being applied.
        num_layers: the number of merging layers of the target.
        where: what those layers are, for the message (``"UNet2DConditionModel merges in 3 blocks"``).
    """
    from ..policies.thresholds import FixedCount, layer_schedule  # the ViT's own check, reused

    for policy in _threshold_policies(config.threshold):
        if isinstance(policy, FixedCount):
            try:
                layer_schedule(policy.r, num_layers)
            except TokenMergeError as error:
                raise TokenMergeError(f"{error}: {where}") from None


class Adapter(ABC):
    """Applies a `MergeConfig` to one family of models through hooks.

    Subclasses say which targets they accept, check a config against a target without
    changing anything, and attach hooks. `tokenmerge.apply` calls `check` before it
    removes an earlier config, so a rejected config leaves the model as it was.

    An adapter that honours placements lists their classes in ``placements`` (the
    first is its default; `placements_for` may narrow them per target) and reads the
    one in effect with `placement`, which refuses the others.
    """

    #: Short name shown in errors and summaries.
    name: str = "adapter"
    #: The model classes this adapter handles, for error messages.
    supported: tuple[str, ...] = ()
    #: The `Placement` classes this adapter can honour; the first is its default.
    placements: tuple[type[Placement], ...] = ()

    @abstractmethod
    def accepts(self, target: Any) -> bool:
        """Whether this adapter handles ``target``."""

    def check(self, target: Any, config: MergeConfig) -> None:  # noqa: B027 - optional
        """Raise `TokenMergeError` if ``config`` asks for something ``target`` lacks. Changes nothing."""

    @abstractmethod
    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Register the hooks that apply ``config`` to ``target`` into ``hooks``."""

    def placements_for(self, target: Any) -> tuple[type[Placement], ...]:
        """The placement classes ``target`` can honour (``placements`` by default); the first is its default."""
        return self.placements

    def family(self, target: Any) -> str:
        """How ``target``'s family is named in error messages (its class name by default)."""
        return type(self.model_of(target)).__name__

    def placement(self, target: Any, config: MergeConfig) -> Placement:
        """The placement ``config`` has on ``target``: its own, or its deprecated fields translated.

        Raises:
            TokenMergeError: naming the placement and the ones ``target`` accepts when
                it cannot honour it (or when a deprecated field has no counterpart).
        """
        accepted = self.placements_for(target)
        if not accepted:
            raise TokenMergeError(f"adapter {self.name!r} declares no placements (Adapter.placements)")
        family = self.family(target)
        placement = config.placement_for(accepted[0], family=family)
        if not isinstance(placement, accepted):
            names = ", ".join(cls.__name__ for cls in accepted)
            raise TokenMergeError(
                f"placement {placement.describe()} ({placement.form}) is not supported by {family}; it accepts {names}"
            )
        return placement

    def model_of(self, target: Any) -> Any:
        """The module that carries the hooks (a pipeline's denoiser, say); ``target`` by default."""
        return target
