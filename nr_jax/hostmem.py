"""Host arrays for surgery: zeroed, 64-byte aligned, carved from a few large buffers.

On CPU, `jax.device_put` adopts a 64-byte aligned host array without copying it (numpy's own
allocations are 16-byte aligned and get copied). An `Arena` hands out such arrays as views of a
few large buffers: one large buffer is filled faster than many fresh small ones, because numpy
asks the kernel for transparent huge pages from 4 MiB on (far fewer page faults) and a fresh
large buffer comes zeroed from the kernel. Measured on DenseNet-121's rejuvenation:
`experiments/results/parity_ab/README.md`, "Host allocation".

`gc_paused` holds off Python's cyclic garbage collector while surgery makes its thousands of
short-lived objects (no reference cycles among them): each collection the allocations trigger
scans every tracked object of the process, a cost that grows with the training process.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ALIGN", "Arena", "aligned_zeros", "gc_paused"]

ALIGN = 64  # bytes
_FIRST_CHUNK = 1 << 22  # 4 MiB: numpy's threshold for huge pages
_MAX_CHUNK = 1 << 28


def aligned_zeros(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """`np.zeros(shape, dtype)` at a 64-byte aligned address (a buffer of its own)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = np.zeros(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start : start + nbytes].view(dtype).reshape(shape)


class Arena:
    """Hands out zeroed, aligned arrays from buffers of growing size (4 MiB, doubling).

    A buffer is released when every array carved from it is; the unused tail of a buffer is
    address space only (the kernel backs pages when they are first written).
    """

    def __init__(self) -> None:
        self._buf = np.zeros(0, np.uint8)
        self._pos = 0
        self._next = _FIRST_CHUNK

    def zeros(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A zero array of `shape` and `dtype`, 64-byte aligned."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        need = -(-nbytes // ALIGN) * ALIGN
        if self._pos + need > self._buf.size:
            size = max(need, self._next)
            self._next = min(2 * size, _MAX_CHUNK)
            self._buf, self._pos = aligned_zeros((size,), np.uint8), 0
        out = self._buf[self._pos : self._pos + nbytes].view(dtype).reshape(shape)
        self._pos += need
        return out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disables the cyclic garbage collector inside the block (if it was enabled), then restores
    it. Reference counting still frees everything at once."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
