"""Each source's most similar destination, without materialising the similarity matrix.

Bipartite soft matching needs, for every source token, the destination with the largest
dot product (cosine, on unit vectors) and that value. The plain PyTorch form writes the
whole ``(B, Ns, Nd)`` similarity matrix and reads it back for the row maximum: at SD 1.5's
1024 px top level that is 2 x 12288 x 4096 half floats, 200 MB written and read per
merging layer. On a CUDA GPU with Triton, `best_match` instead runs one fused kernel that
keeps a running maximum per row while it multiplies tile by tile (like flash attention
without the softmax), so only the ``(B, Ns)`` results reach memory.

The kernel is registered as the custom operator ``tokenmerge::best_match`` (its CPU
implementation and the fallback everywhere else is the PyTorch form), so `torch.compile`
treats it as one opaque node: no graph break, and CUDA graphs capture it.

Set ``TOKENMERGE_TRITON=0`` to always use the PyTorch form, ``=1`` to use the kernel for
every size. By default it is used where the matrix it does not write would be large:
from ``2**28`` similarity entries (512 MB in half precision; SD 1.5 at 2048 px, batch 2,
has 1.6e9). Below that, cuBLAS and a row maximum were faster on an H100 (SD 1.5 at
1024 px, batch 2, 1e8 entries: 0.225 ms against the kernel's 0.259 ms; BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from torch import Tensor

__all__ = [
    "best_match",
    "best_match_reference",
    "triton_enabled",
    "set_triton_mode",
    "MIN_ENTRIES",
    "MIN_ENTRIES_EAGER",
    "KERNEL_DEVICES",
]

#: Similarity entries (``B * Ns * Nd``) from which the fused kernel is used by default in a
#: compiled graph, and in eager mode. Both follow the H100 run in BENCHMARKS.md: at
#: 1e8 entries (SD 1.5, 1024 px, batch 2) the PyTorch form took 0.225 ms and the kernel
#: 0.259 ms, at 6e6 (512 px) 0.038 ms and 0.085 ms (eager, launches included); so the
#: kernel is kept for sizes where the matrix itself is the problem (512 MB and more).
MIN_ENTRIES = 1 << 28
MIN_ENTRIES_EAGER = 1 << 28


def best_match_reference(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """The PyTorch form: ``(src @ dst^T).max(-1)``; ``(B, Ns, C), (B, Nd, C) -> (B, Ns), (B, Ns)``."""
    similarity = src @ dst.transpose(-1, -2)  # (B, Ns, Nd)
    score, best = similarity.max(dim=-1)  # (B, Ns), (B, Ns)
    return score, best


#: Read once: `torch.compile` then sees constants, never an environment lookup. Change it
#: with `set_triton_mode`.
_MODE = os.environ.get("TOKENMERGE_TRITON", "auto")
_TRITON = importlib.util.find_spec("triton") is not None
#: Devices the fused kernel runs on.
KERNEL_DEVICES: tuple[str, ...] = ("cuda",)


def set_triton_mode(mode: str) -> None:
    """``"auto"`` (the kernel from `MIN_ENTRIES` up), ``"1"`` (always) or ``"0"`` (never); as ``TOKENMERGE_TRITON``."""
    global _MODE
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"mode must be 'auto', '0' or '1'; got {mode!r}")
    _MODE = mode


def triton_enabled(src: Tensor, dst: Tensor) -> bool:
    """Whether `best_match` runs the fused kernel for these inputs (static facts only: traceable)."""
    if _MODE == "0" or _OP is None or _KERNEL_FAILED or not _TRITON or src.device.type not in KERNEL_DEVICES:
        return False
    if src.dtype not in (torch.float16, torch.bfloat16) or dst.dtype != src.dtype:  # float32 keeps exact products
        return False
    if src.dim() != 3 or dst.dim() != 3 or src.shape[1] == 0 or dst.shape[1] == 0:
        return False
    entries = src.shape[0] * src.shape[1] * dst.shape[1]
    return _MODE == "1" or entries >= (MIN_ENTRIES if torch.compiler.is_compiling() else MIN_ENTRIES_EAGER)


def best_match(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``src`` ``(B, Ns, C)``, the largest dot product with a row of ``dst`` ``(B, Nd, C)``.

    Returns:
        ``score (B, Ns)`` in ``src``'s dtype and ``best (B, Ns)`` int64, the index of the
        destination that attains it (ties: either). ``Nd`` must be at least 1.
    """
    if triton_enabled(src, dst):
        return torch.ops.tokenmerge.best_match.default(src, dst)
    return best_match_reference(src, dst)


def launch_kernel(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Run the fused Triton kernel (`tokenmerge.policies._best_match_triton`); float32 scores, int64 indices."""
    from ._best_match_triton import launch

    return launch(src, dst)


_KERNEL_FAILED = False


def _kernel_failed(error: Exception) -> None:
    """Switch the fused kernel off for the process after it raised, with one warning."""
    global _KERNEL_FAILED
    _KERNEL_FAILED = True
    warnings.warn(
        f"tokenmerge: the fused Triton best-match kernel failed ({type(error).__name__}: {error}); "
        "using the PyTorch form from now on",
        RuntimeWarning,
        stacklevel=3,
    )


def _register() -> object | None:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:  # torch < 2.4: the PyTorch form only
        return None

    @custom_op("tokenmerge::best_match", mutates_args=())
    def op(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
        score, best = best_match_reference(src, dst)
        return score, best

    @op.register_kernel("cuda")
    def _(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
        if not _KERNEL_FAILED:
            try:
                score, index = launch_kernel(src, dst)
                return score.to(src.dtype), index
            except Exception as error:  # noqa: BLE001 - a Triton or driver mismatch must not break merging
                _kernel_failed(error)
        return best_match_reference(src, dst)

    @op.register_fake
    def _(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
        shape = (src.shape[0], src.shape[1])
        return src.new_empty(shape), src.new_empty(shape, dtype=torch.int64)

    return op


_OP = _register()
