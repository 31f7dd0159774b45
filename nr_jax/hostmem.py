"""Host-side memory for surgery: aligned new arrays, and the cyclic GC held off meanwhile.

`aligned_zeros`: on CPU, `jax.device_put` adopts a 64-byte aligned host array without copying it
(numpy's own allocations are 16-byte aligned and get copied; measured when it was introduced:
ResNet-50's rejuvenation 0.2 s faster).

`gc_paused`: surgery makes thousands of short-lived objects (no reference cycles among them);
the collections their allocations trigger scan every tracked object of the process, a cost that
grows with the training process around it. Measured on DenseNet-121's rejuvenation:
`experiments/results/parity_ab/README.md`, "Host memory".
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ALIGN", "aligned_zeros", "gc_paused"]

ALIGN = 64  # bytes


def aligned_zeros(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """`np.zeros(shape, dtype)` at a 64-byte aligned address (a buffer of its own)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = np.zeros(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start : start + nbytes].view(dtype).reshape(shape)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disables the cyclic garbage collector inside the block (if it was enabled), then restores
    it; usable as a decorator. Reference counting still frees everything at once."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
