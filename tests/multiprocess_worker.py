"""One process of a multi-process `experiments.main` job, reporting what it saw (for
`tests/test_multiprocess.py`).

    python tests/multiprocess_worker.py --report=<path> [--fault=<point>[@<n>]] \
        --config=... --workdir=... --config.distributed=True ...

runs `experiments.main` as `tests/fault_launcher.py` does (`--fault` kills this process at a
point) and writes to `--report`, as JSON:

* `rejuvenated`: after each rejuvenation, this process's view of the new state as the trainer
  placed it: the plan (the report's dict) and, per leaf of the variables and the optimiser state,
  a SHA-256 of its values, its shape, dtype, the sharding's devices (ids), whether it is
  replicated, and whether every shard on this process's devices holds exactly those values;
* `writes`: the files this process opened for writing in the run directory, outside
  `checkpoints/` (orbax's), in the order it opened them.

The report is written at the rejuvenation and again at the process's exit (not when killed).
The wrapping (of `Trainer.epoch_end` and of `open`) lives here, not in the library.
"""

from __future__ import annotations

import atexit
import builtins
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fault_launcher, from anywhere

import fault_launcher  # noqa: E402  (puts the repository on the path; defines --fault)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import main as experiments_main  # noqa: E402
from nr_jax import train  # noqa: E402

flags.DEFINE_string("report", None, "Where to write this process's JSON report.")
FLAGS = flags.FLAGS
REPORT: dict[str, Any] = {"rejuvenated": [], "writes": []}


def leaf_digest(x: jax.Array) -> dict[str, Any]:
    """What this process holds of one replicated leaf (typed PRNG keys by their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    value = np.asarray(x)  # a replicated array's value is local to every process
    sha = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    shards_equal = all(
        np.array_equal(np.asarray(s.data), value[s.index]) for s in x.addressable_shards
    )
    return {
        "sha256": sha,
        "shape": list(value.shape),
        "dtype": str(value.dtype),
        "devices": sorted(d.id for d in x.sharding.device_set),
        "replicated": bool(x.sharding.is_fully_replicated),
        "local_shards_hold_the_value": shards_equal,
    }


def state_digest(state: train.TrainState) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path((state.variables, state.opt_state, state.rng))[0]
    return {jax.tree_util.keystr(path): leaf_digest(leaf) for path, leaf in flat}


def write_report() -> None:
    with builtins.open(FLAGS.report + ".tmp", "w") as f:
        json.dump(REPORT, f, indent=1)
    os.replace(FLAGS.report + ".tmp", FLAGS.report)


def watch_epoch_end() -> None:
    """Records the state the trainer placed after each rejuvenation."""
    epoch_end = train.Trainer.epoch_end

    def recording(self: train.Trainer, state: Any, key: jax.Array) -> Any:
        state, event = epoch_end(self, state, key)
        if "rejuvenation" in event:
            plan = json.loads(json.dumps(event["rejuvenation"].as_dict(), default=str))
            REPORT["rejuvenated"].append({"plan": plan, "state": state_digest(state)})
            write_report()
        return state, event

    train.Trainer.epoch_end = recording


def watch_writes(workdir: str) -> None:
    """Records every file opened for writing under `workdir` except in `checkpoints/`."""
    root, ckpt = os.path.abspath(workdir), os.path.join(os.path.abspath(workdir), "checkpoints")
    opener = builtins.open

    def recording_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+"):
            path = os.path.abspath(os.fspath(file))
            if path.startswith(root + os.sep) and not path.startswith(ckpt + os.sep):
                REPORT["writes"].append(os.path.relpath(path, root))
        return opener(file, mode, *args, **kwargs)

    builtins.open = io.open = recording_open


def launch(argv: list[str]) -> None:
    watch_epoch_end()
    watch_writes(FLAGS.workdir)
    atexit.register(write_report)  # before jax's shutdown (atexit runs last-in first)
    callbacks = fault_launcher.fault_callbacks(FLAGS.fault) if FLAGS.fault else None
    experiments_main.main(argv, callbacks=callbacks)


if __name__ == "__main__":
    app.run(launch)
