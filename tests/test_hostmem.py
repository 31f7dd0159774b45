"""Host memory for surgery (`nr_jax.hostmem`): aligned zero arrays; the GC pause restores."""

import gc

import jax
import numpy as np
import pytest

from nr_jax import hostmem


def test_aligned_zeros_are_aligned_zero_and_writable():
    for shape, dtype in [((3, 5), np.float32), ((7,), np.int32), ((2, 3, 4), np.float64)]:
        a = hostmem.aligned_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and not a.any()
        assert a.ctypes.data % hostmem.ALIGN == 0 and a.flags.c_contiguous and a.flags.writeable
    assert hostmem.aligned_zeros((0, 4), np.float32).shape == (0, 4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host aliasing is CPU-only")
def test_device_put_adopts_aligned_arrays_without_copying():
    a = hostmem.aligned_zeros((64, 3), np.float32)
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
