"""Host arrays for surgery (`nr_jax.hostmem`): aligned, zero, disjoint; the GC pause restores."""

import gc

import jax
import numpy as np
import pytest

from nr_jax import hostmem


def test_arena_arrays_are_aligned_zero_and_disjoint():
    arena = hostmem.Arena()
    specs = [((3, 5), np.float32), ((7,), np.int32), ((0,), np.float32), ((2, 3, 4), np.float64)]
    specs += [((1 << 20,), np.float32), ((1 << 22,), np.float32)]  # a second buffer, then a third
    arrays = [arena.zeros(shape, dtype) for shape, dtype in specs]
    for a, (shape, dtype) in zip(arrays, specs, strict=True):
        assert a.shape == shape and a.dtype == dtype and not a.any()
        assert a.ctypes.data % hostmem.ALIGN == 0 and a.flags.c_contiguous and a.flags.writeable
    for i, a in enumerate(arrays):
        a[...] = i + 1
    for i, a in enumerate(arrays):  # no array overlaps another
        assert (a == i + 1).all()
    assert len({id(a.base.base) for a in arrays[:4]}) == 1  # the small ones share one buffer


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host aliasing is CPU-only")
def test_device_put_adopts_arena_arrays_without_copying():
    arena = hostmem.Arena()
    arena.zeros((5,), np.uint8)  # the next array starts past an odd offset
    a = arena.zeros((64, 3), np.float32)
    assert jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data  # adopted, not copied
    b = np.zeros((65, 3), np.float32)[1:]  # a 12-byte offset: not aligned, so copied
    assert jax.device_put(b).unsafe_buffer_pointer() != b.ctypes.data


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with hostmem.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with hostmem.gc_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
