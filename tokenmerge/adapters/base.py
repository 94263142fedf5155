"""The adapter interface: where a model family's quirks live, and nowhere else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..config import MergeConfig
from ..hooks import HookSet
from ..state import MergeState

__all__ = ["Adapter"]


class Adapter(ABC):
    """Applies a `MergeConfig` to one family of models through hooks.

    Subclasses say which targets they accept, check a config against a target without
    changing anything, and attach hooks. `tokenmerge.apply` calls `check` before it
    removes an earlier config, so a rejected config leaves the model as it was.
    """

    #: Short name shown in errors and summaries.
    name: str = "adapter"
    #: The model classes this adapter handles, for error messages.
    supported: tuple[str, ...] = ()

    @abstractmethod
    def accepts(self, target: Any) -> bool:
        """Whether this adapter handles ``target``."""

    def check(self, target: Any, config: MergeConfig) -> None:  # noqa: B027 - optional
        """Raise `TokenMergeError` if ``config`` asks for something ``target`` lacks. Changes nothing."""

    @abstractmethod
    def attach(self, target: Any, config: MergeConfig, state: MergeState, hooks: HookSet) -> None:
        """Register the hooks that apply ``config`` to ``target`` into ``hooks``."""

    def model_of(self, target: Any) -> Any:
        """The module that carries the hooks (a pipeline's denoiser, say); ``target`` by default."""
        return target
