"""The Triton kernel behind `tokenmerge.policies.best_match` (imported only when it runs).

One program takes ``BLOCK_M`` source rows of one batch element and walks over every
destination tile: a tile of dot products (``tl.dot``, float32 accumulation) is reduced
to its row maxima and argmaxes at once and folded into a running best, so the
``(B, Ns, Nd)`` similarity matrix never reaches memory.

On a GPU the block sizes are autotuned per ``(Ns, Nd, C)``; under Triton's CPU
interpreter (``TRITON_INTERPRET=1``, used by the tests) one small fixed configuration runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["launch", "best_match_kernel"]

_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 64, 64, 4, 3),
    (128, 128, 32, 8, 3),
    (64, 64, 64, 4, 2),
]
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


@triton.jit
def best_match_kernel(
    src_ptr,
    dst_ptr,
    score_ptr,
    idx_ptr,
    Ns,
    Nd,
    C,
    s_b,
    s_n,
    s_c,
    d_b,
    d_n,
    d_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row maxima and argmaxes of ``src[b] @ dst[b]^T`` for BLOCK_M rows of batch element ``b``."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(0, Nd, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                src_ptr + b * s_b + rm[:, None] * s_n + kk[None, :] * s_c,
                mask=(rm[:, None] < Ns) & (kk[None, :] < C),
                other=0.0,
            )
            d = tl.load(
                dst_ptr + b * d_b + rn[None, :] * d_n + kk[:, None] * d_c,
                mask=(rn[None, :] < Nd) & (kk[:, None] < C),
                other=0.0,
            )
            acc += tl.dot(a, d)
        acc = tl.where(rn[None, :] < Nd, acc, float("-inf"))
        tile_best = tl.max(acc, 1)
        tile_arg = tl.argmax(acc, 1) + n0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    out = b * Ns + rm
    tl.store(score_ptr + out, best, mask=rm < Ns)
    tl.store(idx_ptr + out, arg.to(tl.int64), mask=rm < Ns)


_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _CONFIGS
    ],
    key=["Ns", "Nd", "C"],
)(best_match_kernel)


def launch(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """For ``src (B, Ns, C)`` and ``dst (B, Nd, C)``: float32 ``score (B, Ns)`` and int64 ``best (B, Ns)``."""
    batch, num_src, channels = src.shape
    num_dst = dst.shape[1]
    score = torch.empty(batch, num_src, device=src.device, dtype=torch.float32)
    index = torch.empty(batch, num_src, device=src.device, dtype=torch.int64)
    args = (src, dst, score, index, num_src, num_dst, channels, *src.stride(), *dst.stride())
    if src.device.type == "cpu":  # Triton's interpreter: one small fixed configuration
        grid = (triton.cdiv(num_src, _INTERPRETER_BLOCKS["BLOCK_M"]), batch)
        best_match_kernel[grid](*args, **_INTERPRETER_BLOCKS)
    else:
        _tuned[lambda meta: (triton.cdiv(num_src, meta["BLOCK_M"]), batch)](*args)
    return score, index
