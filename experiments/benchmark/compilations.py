"""2. Compilations of the train/eval steps in a short run with one rejuvenation."""

from __future__ import annotations

import nr_jax
from experiments.benchmark.common import FLAGS, force_rejuvenation, make_trainer, synthetic_batch


def compilations() -> dict:
    trainer, state = make_trainer("vgg_fmnist")
    batch = synthetic_batch(FLAGS.batch)
    for epoch in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
        state = state.replace(opt_state=nr_jax.set_lambda(state.opt_state, 1e-3 * epoch))
    state, _ = force_rejuvenation(trainer, state)
    for _ in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
    return {"width_configurations": 2, "traces": dict(trainer.counter)}
