"""Counts what reaches the terminal when a run falls back from a truncated newest checkpoint.

    python -m experiments.fallback_noise --repeats 20            # the array files' table on
    python -m experiments.fallback_noise --repeats 20 --no_table # the table deleted: orbax alone

Each repetition is a fresh process (the noise came from orbax's abandoned reads being collected
at exit or at a random later point) that opens a checkpoint directory whose newest step has its
array files cut in half, restores (falling back to the previous step) and exits. The state has
many leaves, so orbax reads many files concurrently. Prints, per repetition and in total, the
restored step and how many stderr lines hold "Traceback", "Exception ignored" or "Event loop is
closed". Issue 17: 20 repetitions, none of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import flags

from experiments import cli

flags.DEFINE_integer("repeats", 20, "Fresh processes, each one fallback.")
flags.DEFINE_boolean("table", True, "Keep the array files' table (--no_table: delete it first).")
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS

NOISE = ("Traceback", "Exception ignored", "Event loop is closed")
CHILD = """
import logging, sys
import numpy as np
from nr_jax.checkpoint import Checkpointer

logging.basicConfig(level=logging.WARNING)  # as a run's terminal: warnings shown
with Checkpointer(sys.argv[1]) as ckpt:
    shapes = {f"leaf_{i}": (256, 64 + i) for i in range(48)}
    abstract = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    _, _, step = ckpt.restore(lambda meta: abstract)
print(step)
"""


def prepare(directory: Path, table: bool) -> None:
    """Steps 1 and 2 of a 48-leaf state; step 2's array files truncated to half their size."""
    import numpy as np

    from nr_jax.checkpoint import Checkpointer

    rng = np.random.default_rng(0)
    with Checkpointer(directory) as ckpt:
        for step in (1, 2):
            state = {f"leaf_{i}": rng.standard_normal((256, 64 + i), np.float32) for i in range(48)}
            ckpt.save(step, state, {"step": step})
    for f in (directory / "2" / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    if not table:
        (directory / "2" / "nr_jax_files.json").unlink()


def main(argv: list[str]) -> None:
    del argv
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    total = dict.fromkeys(NOISE, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(FLAGS.repeats):
            directory = Path(tmp) / str(i)
            prepare(directory, FLAGS.table)
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(directory)],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            counts = {n: sum(n in line for line in proc.stderr.splitlines()) for n in NOISE}
            for n in NOISE:
                total[n] += counts[n]
            print(f"{i + 1:2d}: exit {proc.returncode}, step {proc.stdout.strip()}, {counts}")
    print(f"table {'on' if FLAGS.table else 'off'}, {FLAGS.repeats} fallbacks: {total}")


if __name__ == "__main__":
    cli.run(main)
