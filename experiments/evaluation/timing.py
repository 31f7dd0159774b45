"""Step times of the table's architectures: one jitted train step and one eval batch.

For `python -m experiments.evaluate --step_time`: accuracy runs may share the machine, so their
wall times are not figures to quote; state cost as steps x the step time measured here on a
quiet machine.
"""

from __future__ import annotations

import time

from experiments.configs import eval_table


def step_time(arch: str, width: float, nr: bool, steps: int = 30, warmup: int = 5) -> dict:
    """Median seconds of one jitted train step (batch of the table, synthetic images) and of one
    eval batch, for `arch` at width multiplier `width` (NR search step if `nr`, else baseline)."""
    import jax
    import numpy as np

    from nr_jax import train

    config = eval_table.base(arch)
    config.model_kwargs.width_multiplier = width
    config.nr.enabled = nr
    trainer = train.Trainer(config, workdir="")
    shape = trainer.info.image_shape
    state = trainer.place(
        train.init_state(trainer.model, trainer.tx, config, shape, jax.random.key(0))
    )
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        images = rng.normal(size=(n, *shape)).astype(np.float32)
        labels = rng.integers(0, 10, n).astype(np.int32)
        return {"image": images, "label": labels, "mask": np.ones(n, np.float32)}

    train_batch, eval_batch, times = batch(config.batch_size), batch(config.eval_batch_size), []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = trainer.steps.train(state, train_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    evals = []
    for _ in range(warmup + 5):
        t = time.perf_counter()
        jax.block_until_ready(trainer.steps.eval(state.variables, eval_batch))
        evals.append(time.perf_counter() - t)
    return {
        "train_step_s": float(np.median(times[warmup:])),
        "eval_batch_s": float(np.median(evals[warmup:])),
    }
