"""The evaluation driver (issue 14): one small JSON result file per finished run, resumable.

    python -m experiments.evaluate --table eval --archs vgg,resnet --seeds 0,1,2
    python -m experiments.evaluate --table eval --detach       # in the background, log in runs/
    python -m experiments.evaluate --table sweep --archs vgg --arms sweep --seeds 0
    python -m experiments.evaluate --step_time --archs vgg,resnet --widths 1,1.5,2

Runs are the configs of `experiments/configs/eval_table.py` (arch x arm x seed), one after another.
Each trains in `runs/<table>/<run>/` (with checkpoints: an interrupted run resumes there from its
newest checkpoint) and, once finished, writes `experiments/results/<table>/<run>.json`: config,
seed, commit, code fingerprint, per-epoch train and validation metrics, test metrics at the final
and best-validation epochs, counts, steps and training cost (conv MACs).

The code fingerprint (`code_fingerprint`) hashes the files that decide results: `nr_jax/**/*.py`,
this driver (this command line and its parts, `experiments/evaluation/*.py`), `experiments/main.py`
and `experiments/configs/**/*.py`, nothing else (so committing results or unrelated files does not
change it). The driver skips runs whose result file exists,
resumes interrupted ones, and refuses (`MixedCodeError`) to resume a run directory, or to add to a
table, written by code with another fingerprint: move them away or use a new `--table`. Accuracy
runs are deterministic, so they may share the machine; their wall times are then not figures to
quote (state cost as steps x the step time of `--step_time` on a quiet machine).

This module is the command line (its flags are defined here only; `experiments.eval_report` adopts
them); the work is done in `experiments/evaluation/` and re-exported here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments.configs import eval_table

# re-exported: the driver's parts, importable from here as before (tests, eval_report)
from experiments.evaluation.driver import (  # noqa: F401
    SEARCH_CHECKPOINT,
    Table,
    TableLock,
    TrainFn,
    branch_from_search,
    keep_search_checkpoint,
    run_one,
    run_table,
)
from experiments.evaluation.provenance import (  # noqa: F401
    FINGERPRINT_GLOBS,
    MARKER,
    ROOT,
    VERSIONED,
    MixedCodeError,
    check_table,
    code_fingerprint,
    fingerprint_files,
    git_commit,
    prepare_workdir,
    read_json,
    versions,
    write_json,
)
from experiments.evaluation.results import build_result, read_epochs, training_cost  # noqa: F401
from experiments.evaluation.runs import Run, config_for, plan  # noqa: F401
from experiments.evaluation.timing import step_time  # noqa: F401

log = logging.getLogger("experiments.evaluate")

FLAGS = flags.FLAGS
flags.DEFINE_string("table", "eval", "Table name: experiments/results/<table>/, runs/<table>/.")
flags.DEFINE_list("archs", ["vgg", "resnet"], "Architectures (keys of eval_table.ARCHS).")
flags.DEFINE_list("arms", list(eval_table.ARMS), "Arms (eval_table.ARMS, 'sweep:<name>', 'sweep').")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_boolean("quick", False, "Shrink every run to CPU-minutes (table <table>_quick).")
flags.DEFINE_boolean("commit", False, "git-commit each result file when its run finishes.")
flags.DEFINE_boolean("detach", False, "Start this command in the background and return.")
flags.DEFINE_string("results_dir", str(ROOT / "experiments" / "results"), "Results root.")
flags.DEFINE_string("runs_dir", str(ROOT / "runs"), "Run directories root (checkpoints).")
flags.DEFINE_boolean("step_time", False, "Measure step times of --archs at --widths; no runs.")
flags.DEFINE_list("widths", ["1.0", "1.5", "2.0"], "Width multipliers for --step_time.")


def _detach(argv: list[str]) -> None:
    """Starts the same command without --detach in a new session (as nohup), logging to runs/."""
    log_dir = Path(FLAGS.runs_dir) / FLAGS.table
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"driver_{time.strftime('%Y%m%d_%H%M%S')}.log"
    args = [a for a in argv[1:] if not a.startswith("--detach")]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.evaluate", *args, "--nodetach"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    print(f"driver started in the background: pid {proc.pid}, log {log_path}")


def main(argv: list[str]) -> None:
    del argv  # flags only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if FLAGS.detach:
        return _detach(sys.argv)
    if FLAGS.step_time:
        for arch in FLAGS.archs:
            for width in map(float, FLAGS.widths):
                for nr in (True, False):
                    measured = step_time(arch, width, nr)
                    print(json.dumps({"arch": arch, "width": width, "nr": nr, **measured}))
        return None
    name = FLAGS.table + ("_quick" if FLAGS.quick else "")
    table = Table(name, Path(FLAGS.results_dir), Path(FLAGS.runs_dir), FLAGS.quick, FLAGS.commit)
    runs = plan(name, FLAGS.archs, FLAGS.arms, [int(s) for s in FLAGS.seeds])
    log.info("table %s: %d runs, code fingerprint %s", name, len(runs), code_fingerprint())
    for run, status, result in run_table(table, runs):
        best = (result.get("best_validation") or {}).get("val_accuracy_sum")
        log.info("%s: %s (best validation accuracy %s)", run.name, status, best)
    return None


if __name__ == "__main__":
    app.run(main)
