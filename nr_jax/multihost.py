"""Several processes as one JAX job (`jax.distributed`), started from the run's config.

nr_jax runs multi-controller JAX: every process runs the same program on the same global batches
(their order is a pure function of seed and epoch), the batch is sharded over all devices of all
processes and the state is replicated on each of them (`nr_jax.steps.Steps`), so the host-side
NR decision and surgery see the same arrays, and with the same key compute the same new state,
on every process. Files of the run are written by process 0 only; checkpoints by orbax on every
process with process 0 as its primary host (`nr_jax.checkpoint`).

`start(config)` forms the job from the config's fields, never from environment variables: what
is left unset there ("" / 0 / -1) `jax.distributed.initialize` detects on its own (TPU pods,
SLURM, Open MPI; it also reads `JAX_COORDINATOR_ADDRESS`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

__all__ = ["replicate", "start"]

log = logging.getLogger("nr_jax")


def start(config: ml_collections.ConfigDict) -> None:
    """Joins this process to the job `config` describes; does nothing unless `config.distributed`
    or once the job has started.

    Must run before anything asks jax for its devices (`jax.distributed.initialize`'s rule).
    The job checks its own health: a process that sends no heartbeat for
    `config.heartbeat_timeout_seconds` is declared dead and jax terminates every other process
    (exit status non-zero; the coordinator's log names the lost process, e.g. "The following
    tasks are unhealthy (stopped sending heartbeats): 1", the others' log that the coordinator,
    process 0, is gone). A process that ends (done, or failed while the others wait for it in a
    collective) waits `config.shutdown_timeout_seconds` for the others, then the job fails.

    Args:
      config: the run configuration; its fields `distributed`, `coordinator_address`,
        `coordinator_bind_address`, `num_processes`, `process_id` and
        `heartbeat_timeout_seconds` (`nr_jax.config.base_config`).
    """
    if not config.distributed or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id < 0 else config.process_id,
        coordinator_bind_address=config.coordinator_bind_address or None,
        heartbeat_timeout_seconds=config.heartbeat_timeout_seconds,
        shutdown_timeout_seconds=config.shutdown_timeout_seconds,
    )
    log.info(
        "process %d of %d: %d local devices of %d (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """`tree` with every leaf replicated over `sharding`'s devices (a replicated sharding).

    In a one-process job that is `jax.device_put`. Across processes jax cannot put an array
    committed to one local device onto other processes' devices; each process then builds the
    global array from its own host copy, which must be the same on every process (it is: the
    state is a pure function of the config, the seed and the data order). Leaves already placed
    so are kept; typed PRNG keys are rebuilt from their key data.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
