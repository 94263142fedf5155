"""A counter-based random number generator made of plain integer tensor ops.

Random partitions (ToMeSD's random destination in every cell) must not draw from a
`torch.Generator` inside a model's forward: `torch.compile` cannot trace one (a graph
break) and CUDA graphs cannot replay one. Here a draw is a pure function of a key —
the config's seed, the layer, and the denoising timestep the model was called with —
so it is the same in eager mode, under `torch.compile` and in a CUDA-graph replay,
on every device, and it never touches the global RNG.

All arithmetic stays in ``[0, 2**31)`` on int64 tensors, so no product overflows and
every backend computes the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["hash_int", "hash_randint", "timestep_key", "partition_key", "PARTITIONS"]

#: Distinct random partitions a grid matcher draws from per grid shape (a power of two).
PARTITIONS = 64

_MASK = 0x7FFFFFFF  # 31 bits: every product below fits in int64
_MUL = 0x45D9F3B  # 27-bit odd multiplier of a well-mixing integer hash


def hash_int(value: int) -> int:
    """The 31-bit hash of a Python int (the same function as on tensors)."""
    x = value & _MASK
    x = ((x ^ (x >> 16)) * _MUL) & _MASK
    x = ((x ^ (x >> 16)) * _MUL) & _MASK
    return x ^ (x >> 16)


def _hash_tensor(x: Tensor) -> Tensor:
    """`hash_int` element-wise on an int64 tensor with values in ``[0, 2**31)``."""
    x = ((x ^ (x >> 16)) * _MUL) & _MASK
    x = ((x ^ (x >> 16)) * _MUL) & _MASK
    return x ^ (x >> 16)


def timestep_key(timestep: Tensor | float | int | None, hashed: bool = False) -> Tensor | int:
    """A 31-bit key from a timestep: a Python int, or an int64 tensor of shape ``(1,)``.

    A tensor timestep (scalar or one per batch element; the first is used) stays on its
    device: reading it on the host would synchronise. Timesteps are keyed to 1/1024, so
    flow-matching sigmas in [0, 1] give distinct keys too. ``hashed=True`` returns
    `hash_int` of the key instead. In eager mode the result for the last timestep tensor
    is kept while that same tensor object comes back unchanged (every layer of one
    denoiser call), so its few kernels run once per call, not once per layer. An
    inference tensor (made under `torch.inference_mode`) has no version counter to
    tell an in-place update (``t -= 200``) apart, so this function computes its key
    afresh every time; `partition_key`, which knows the layer, keeps it per call.
    """
    if timestep is None:
        return hash_int(0) if hashed else 0
    if not isinstance(timestep, Tensor):
        key = int(round(float(timestep) * 1024.0)) & _MASK
        return hash_int(key) if hashed else key
    if torch.compiler.is_compiling():
        return _tensor_keys(timestep)[int(hashed)]
    return _eager_keys(timestep)[int(hashed)]


def _eager_keys(timestep: Tensor, step: int | None = None, layer: Any = None) -> tuple[Tensor, Tensor]:
    """`_tensor_keys` of an eager tensor timestep, reused while it is certainly unchanged.

    A tensor with a version counter: reused while the same object comes back at the same
    version. An inference tensor has none (an in-place ``t -= 200`` leaves no trace
    without reading its value, which would synchronise, and cannot be read at all on
    the ``meta`` device); its keys are reused only by a caller that names the ``layer``
    asking, at the same ``step``, for a layer that has not asked since they were
    computed: every merging layer plans once per denoiser call, so a layer asking again
    means a new call, whose timestep may have changed in place.
    """
    last = _LAST_KEYS
    if timestep.is_inference():
        version = None
        same_call = layer is not None and last[2] == step and layer not in last[3]
        fresh = last[0] is timestep and last[1] is None and same_call
    else:
        version = timestep._version
        fresh = last[0] is timestep and last[1] == version
    if fresh:
        if layer is not None:
            last[3].add(layer)
        return last[4], last[5]
    key, hashed = _tensor_keys(timestep)
    last[:] = [timestep, version, step, set() if layer is None else {layer}, key, hashed]
    return key, hashed


def _tensor_keys(timestep: Tensor) -> tuple[Tensor, Tensor]:
    """The key of a tensor timestep and its hash, both ``(1,)`` int64 on its device."""
    first = timestep.detach().reshape(-1)[:1].to(torch.float32)  # (1,)
    key = (first * 1024.0).round().to(torch.int64) & _MASK  # (1,)
    return key, _hash_tensor(key)


#: ``[timestep tensor, its version, step, layers served, its key, the key's hash]`` of the
#: last eager key computation (a strong reference, so the tensor's id cannot be reused by
#: another while it is kept; the version counter catches in-place updates, and for
#: inference tensors, which keep none, the step and the layers served; see `_eager_keys`).
_LAST_KEYS: list[Any] = [None, None, None, set(), None, None]


def hash_randint(
    high: int, shape: tuple[int, ...], key: Tensor | int, device: torch.device | str | None = None
) -> Tensor:
    """Integers uniform in ``[0, high)`` of ``shape``, a pure function of ``key``.

    Args:
        high: exclusive upper bound, ``1 <= high < 2**16`` (cells are small).
        shape: output shape.
        key: a Python int or an int64 tensor of one element (as from `timestep_key`
            combined with `hash_int` of the other key parts); a tensor key keeps the
            draw on its device without a host read.
        device: where to build the result (a tensor key's device wins).
    """
    if isinstance(key, Tensor):
        device = key.device
    numel = 1
    for size in shape:
        numel *= size
    counter = torch.arange(numel, device=device, dtype=torch.int64)  # (numel,)
    mixed_key = _hash_tensor(key.reshape(-1)[:1] & _MASK) if isinstance(key, Tensor) else hash_int(key)
    bits = _hash_tensor((_hash_tensor(counter) + mixed_key) & _MASK)  # (numel,)
    return (bits % high).reshape(shape)


def partition_key(seed: int, layer_index: int, timestep: Tensor | float | None, step: int | None) -> Tensor | int:
    """Which of the `PARTITIONS` random partitions a layer uses at a timestep: an int in ``[0, PARTITIONS)``.

    The hashed timestep (or ``step`` when there is no timestep, else 0) plus a hash of
    ``(seed, layer_index)``, modulo `PARTITIONS`: every layer and timestep gets its own
    draw. A tensor timestep gives an int64 tensor of shape ``(1,)`` on its device (no
    host read; its hash is computed once per denoiser call, see `timestep_key`, and each
    layer adds two element-wise ops, also for an inference tensor updated in place
    between calls); a number gives a Python int.
    """
    static = hash_int(hash_int(seed) + layer_index)  # a Python int
    if timestep is None:
        hashed: Tensor | int = hash_int(step or 0)
    elif isinstance(timestep, Tensor) and not torch.compiler.is_compiling():
        hashed = _eager_keys(timestep, step, (seed, layer_index))[1]
    else:
        hashed = timestep_key(timestep, hashed=True)
    return (hashed + static) & (PARTITIONS - 1)  # the same arithmetic on a tensor or an int
