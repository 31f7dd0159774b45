"""Fault injection for crash-safety tests: kill the process with SIGKILL at a named point.

Set `NR_JAX_FAULT=<point>` or `NR_JAX_FAULT=<point>@<n>` (the n-th time this process reaches the
point; 1 by default) before starting a run; unset, every call here is a no-op. The kill is real
(`SIGKILL`, nothing is flushed or cleaned up), so a test that resumes afterwards sees exactly what
a killed job leaves behind. Points reached by `nr_jax.train` and `nr_jax.checkpoint`:

* `train_step`: after every optimiser step (after the mid-epoch checkpoint of that step, if any);
* `eval`: after the first test batch of every evaluation;
* `after_rejuvenation`: right after the rejuvenation transform, before its checkpoint is written;
* `checkpoint_save`: *during* a checkpoint save: a watcher thread kills the process as soon as
  orbax's temporary directory for the step appears, i.e. while the arrays are being written;
* `after_checkpoint`: right after a checkpoint is complete on disk;
* `end`: after the last epoch, before `summary.json` and the plots are written.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

ENV = "NR_JAX_FAULT"
POINTS = (
    "train_step",
    "eval",
    "after_rejuvenation",
    "checkpoint_save",
    "after_checkpoint",
    "end",
)
_hits: dict[str, int] = {}


def _spec() -> tuple[str, int] | None:
    raw = os.environ.get(ENV, "")
    if not raw:
        return None
    name, _, n = raw.partition("@")
    if name not in POINTS or (n and not n.isdigit()):
        raise ValueError(f"{ENV}={raw!r}: expected <point>[@<n>] with point in {POINTS}")
    return name, int(n or 1)


def kill(where: str) -> None:
    """SIGKILLs this process (after flushing the logs, so that the test can read why)."""
    logging.getLogger("nr_jax").error("fault injection: killing the process at %s", where)
    for handler in logging.getLogger().handlers + logging.getLogger("nr_jax").handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _due(name: str) -> bool:
    spec = _spec()
    if spec is None or spec[0] != name:
        return False
    _hits[name] = _hits.get(name, 0) + 1
    return _hits[name] == spec[1]


def point(name: str) -> None:
    """A named point of the run; kills the process if `NR_JAX_FAULT` asks for it here."""
    if _due(name):
        kill(name)


def watch_save(directory: str, step: int) -> None:
    """Called as a save of checkpoint `step` starts: with `NR_JAX_FAULT=checkpoint_save[@n]`,
    kills the process while orbax's temporary directory of that step exists (mid-write)."""
    if not _due("checkpoint_save"):
        return
    prefix = f"{step}.orbax-checkpoint-tmp"

    def watch() -> None:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                if any(e.startswith(prefix) for e in os.listdir(directory)):
                    kill(f"checkpoint_save of step {step}")
            except FileNotFoundError:
                pass
            time.sleep(0.0002)

    threading.Thread(target=watch, daemon=True).start()
