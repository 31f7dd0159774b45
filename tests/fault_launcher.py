"""Runs `experiments.main` and kills it with SIGKILL at a named point (crash-safety tests).

    python tests/fault_launcher.py --fault=<point>[@<n>] --config=... --workdir=...

kills the process the n-th time (1 by default) it reaches `<point>`; nothing is flushed or cleaned
up, so a test that resumes afterwards sees exactly what a killed job leaves behind. Before the
kill it prints "fault injection: killing the process at <point>" to stderr. The points are hooks
of `nr_jax.callbacks.Callbacks`:

* `train_step`: after an optimiser step (after that step's mid-epoch checkpoint, if any);
* `eval`: after a test batch;
* `after_rejuvenation`: right after the rejuvenation transform, before its checkpoint;
* `checkpoint_save`: *during* a checkpoint save: as the save starts, a watcher thread begins to
  poll the checkpoint directory and kills the process as soon as orbax's temporary directory of
  that step appears, i.e. while the arrays are being written;
* `after_checkpoint`: right after a checkpoint is committed;
* `end`: after the last epoch, before `summary.json` and the plots are written.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from absl import app, flags  # noqa: E402

from experiments import main as experiments_main  # noqa: E402  (defines --config, --workdir)
from nr_jax.callbacks import Callbacks  # noqa: E402

POINTS = ("train_step", "eval", "after_rejuvenation", "checkpoint_save", "after_checkpoint", "end")
flags.DEFINE_string("fault", None, "<point>[@<n>]: kill at the n-th time the run reaches point.")
FLAGS = flags.FLAGS


def kill(where: str) -> None:
    """SIGKILLs this process after saying why on stderr (the test reads it)."""
    for handler in logging.getLogger().handlers + logging.getLogger("nr_jax").handlers:
        handler.flush()
    print(f"fault injection: killing the process at {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def parse(spec: str) -> tuple[str, int]:
    name, _, n = spec.partition("@")
    if name not in POINTS or (n and not n.isdigit()) or n == "0":
        raise ValueError(f"--fault={spec!r}: expected <point>[@<n>] with point in {POINTS}, n >= 1")
    return name, int(n or 1)


def watch_save(directory: str, step: int) -> None:
    """Kills the process as soon as orbax's temporary directory of `step` exists (mid-write)."""
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


def fault_callbacks(spec: str) -> Callbacks:
    """Callbacks that kill the process at the n-th time the run reaches the point of `spec`."""
    name, n = parse(spec)
    hits = 0

    def due(point: str) -> bool:
        nonlocal hits
        if point != name:
            return False
        hits += 1
        return hits == n

    def on_checkpoint(event: str, step: int, directory: str) -> None:
        if event == "start" and due("checkpoint_save"):
            watch_save(directory, step)
        elif event == "end" and due("after_checkpoint"):
            kill("after_checkpoint")

    def at(point: str):
        return lambda *_: kill(point) if due(point) else None

    return Callbacks(
        on_train_step=at("train_step"),
        on_eval_batch=at("eval"),
        after_rejuvenation=at("after_rejuvenation"),
        on_checkpoint=on_checkpoint,
        at_end=at("end"),
    )


def launch(argv: list[str]) -> None:
    callbacks = fault_callbacks(FLAGS.fault) if FLAGS.fault else None
    experiments_main.main(argv, callbacks=callbacks)


if __name__ == "__main__":
    app.run(launch)
