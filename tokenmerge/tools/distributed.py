"""Data-parallel runs of the evaluation tools: one process, or the processes of ``accelerate launch``.

`Processes.current` is a single process in a plain run and wraps accelerate's
``PartialState`` when the run was started by ``accelerate launch`` (or ``torchrun``: the
``WORLD_SIZE`` environment variable is above 1). The evaluation tools use it to

* give each process its share of the work items (`Processes.share`: contiguous slices in
  item order, as accelerate's ``split_between_processes``);
* put each process on its own GPU (`Processes.device`);
* send every process's results to the main process (`Processes.gather`), which computes
  the metrics once and alone prints and writes them.

accelerate is needed only for several processes (``pip install accelerate``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..errors import TokenMergeError
from .common import resolve_device

__all__ = ["Processes"]

T = TypeVar("T")


class Processes:
    """The processes of one run and how they share work.

    Args:
        state: an ``accelerate.PartialState`` of a launched run, or None for one process.
    """

    def __init__(self, state: Any = None) -> None:
        self.state = state

    @classmethod
    def current(cls, cpu: bool | None = None) -> Processes:
        """One process, or accelerate's state when started with several (``WORLD_SIZE`` > 1).

        Args:
            cpu: the processes run on the CPU and talk through gloo (accelerate's
                ``MULTI_CPU``); None: when CUDA is not available. Otherwise accelerate picks
                the GPU backend (NCCL) and gives each process its GPU.

        Raises:
            TokenMergeError: when several processes were launched and accelerate is missing.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        try:
            from accelerate import PartialState
        except ImportError:
            raise TokenMergeError(
                "several processes (WORLD_SIZE > 1) need accelerate: pip install accelerate"
            ) from None
        if cpu is None:
            cpu = not torch.cuda.is_available()
        return cls(PartialState(cpu=cpu))

    @property
    def count(self) -> int:
        """How many processes run."""
        return 1 if self.state is None else int(self.state.num_processes)

    @property
    def index(self) -> int:
        """This process's rank (0 on the main process)."""
        return 0 if self.state is None else int(self.state.process_index)

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that scores, prints and writes)."""
        return self.index == 0

    def device(self, requested: str | torch.device) -> torch.device:
        """The device this process runs on for a requested one.

        One process: `resolve_device(requested)`. Several: a CUDA request (``cuda``,
        ``cuda:N``, or ``auto`` with a GPU) becomes this process's own GPU (accelerate's
        ``state.device``, the local rank's); a CPU request stays on the CPU.
        """
        resolved = resolve_device(requested)
        if self.state is not None and resolved.type == "cuda":
            return torch.device(self.state.device)
        return resolved

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous share of ``items`` (all of them for one process).

        The first ``len(items) % count`` processes get one item more; a process may get none.
        """
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def gather(self, obj: T) -> list[T] | None:
        """Every process's ``obj`` in process order on the main process; None on the others.

        Objects are pickled (tensors should be on the CPU); only the main process holds them all.
        """
        if self.state is None:
            return [obj]
        import torch.distributed as dist

        received: list[Any] | None = [None] * self.count if self.is_main else None
        dist.gather_object(obj, received, dst=0)
        return received

    def wait(self) -> None:
        """Wait until every process gets here."""
        if self.state is not None:
            self.state.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process first, then on the others (downloads, caches)."""
        if self.state is None:
            yield
            return
        with self.state.main_process_first():
            yield

    def progress(self, log: Callable[[str], None] | None) -> Callable[[str], None]:
        """``log`` for progress lines, prefixed with ``[process i/n]`` when several run; silent for None."""
        if log is None:
            return lambda _line: None
        if self.state is None:
            return log
        prefix = f"[process {self.index}/{self.count}] "
        return lambda line: log(prefix + line)

    def __repr__(self) -> str:
        return f"Processes(index={self.index}, count={self.count})"
