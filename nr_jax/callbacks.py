"""Hooks into a run of `nr_jax.train.train_and_evaluate`, for monitoring and tests.

Every hook is optional and called on the host, in the training process, at a fixed point of the
run; none may change the run's state. `tests/fault_launcher.py` uses them to kill a real run at
each point and check that it resumes exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Optional callables that `train_and_evaluate(config, workdir, callbacks=...)` calls.

    Attributes:
      on_train_step: `on_train_step(step)` after every optimiser step, with the number of steps
        taken so far (after that step's mid-epoch checkpoint, if there is one). Called without a
        device sync: the step may still be running.
      on_eval_batch: `on_eval_batch(index)` after each batch of every evaluation, test and
        validation alike (index 0 first).
      after_rejuvenation: `after_rejuvenation()` right after the rejuvenation transform, before
        its epoch record and checkpoint are written.
      on_checkpoint: `on_checkpoint(event, step, directory)` around every checkpoint save:
        event "start" right before orbax writes step `step` under `directory`, "end" right after
        the step is committed (passed to `nr_jax.checkpoint.Checkpointer(on_save=...)`).
      at_end: `at_end()` after the last epoch, before `summary.json` (and the plots) are written.
    """

    on_train_step: Callable[[int], None] | None = None
    on_eval_batch: Callable[[int], None] | None = None
    after_rejuvenation: Callable[[], None] | None = None
    on_checkpoint: Callable[[str, int, str], None] | None = None
    at_end: Callable[[], None] | None = None
