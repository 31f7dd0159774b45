"""Runs Neural Rejuvenation from a config file.

    python -m experiments.main --config experiments/configs/default.py --workdir runs/default
    python -m experiments.main --config experiments/configs/default.py --workdir runs/x \
        --config.nr.target=0.3 --config.epochs=4

One process of a job over several processes or hosts (one command per process, the same
`--workdir` on a shared file system; experiments/README.md, "Launch on several processes or hosts"):

    python -m experiments.main --config experiments/configs/default.py --workdir /shared/x \
        --config.distributed=True --config.coordinator_address=10.0.0.1:1234 \
        --config.num_processes=2 --config.process_id=0

A refused input (a flag, config field or value, name or model keyword that is not allowed, a
missing dataset, a workdir that is a file or holds another model's checkpoint) is one line on
stderr, `error: ...`, with exit status 2, and nothing is written; a failure during the run is one
line with exit status 1; `--debug` adds the Python traceback.
"""

from __future__ import annotations

import json
import logging

from absl import flags
from ml_collections import config_flags

from experiments import cli
from nr_jax.callbacks import Callbacks
from nr_jax.config import validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(cli)  # --debug, listed by --help


def main(argv: list[str], callbacks: Callbacks | None = None) -> None:
    """Runs `--config` in `--workdir`; `callbacks` for launchers that wrap this entry point."""
    del argv
    # refused values exit before the trainer's modules are imported (and, in a multi-process
    # job, before jax.distributed starts: the device checks wait for the job)
    validate(FLAGS.config)
    from nr_jax import train

    logging.getLogger("nr_jax").setLevel(logging.INFO)
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, callbacks=callbacks)
    print(json.dumps(summary, indent=1, default=str))  # the run's result, for people and scripts


if __name__ == "__main__":
    cli.run(main)
