"""Strict JAX for every test: rank promotion raises, 4 CPU devices.

Compilation dominates the test time on CPU, so tests compile with XLA's backend optimisations off
and use the `rbg` PRNG (its kernels compile several times faster than threefry's); numerics are
unaffected at the tolerances the tests use.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_default_prng_impl", "rbg")
