"""Runs Neural Rejuvenation from a config file.

    python -m experiments.main --config experiments/configs/default.py --workdir runs/default
    python -m experiments.main --config experiments/configs/default.py --workdir runs/x \
        --config.nr.target=0.3 --config.epochs=4
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from nr_jax import train
from nr_jax.callbacks import Callbacks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str], callbacks: Callbacks | None = None) -> None:
    """Runs `--config` in `--workdir`; `callbacks` for launchers that wrap this entry point."""
    del argv
    logging.getLogger("nr_jax").setLevel(logging.INFO)
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, callbacks=callbacks)
    print(json.dumps(summary, indent=1, default=str))  # the run's result, for people and scripts


if __name__ == "__main__":
    app.run(main)
