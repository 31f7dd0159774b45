"""Run reporting: metrics for machines (JSONL and TensorBoard, keyed by step), lines for people.

`MetricWriter` appends one JSON record per call to `<workdir>/metrics.jsonl` and, when tensorboardX
is installed, the numeric fields to TensorBoard event files in `<workdir>/tb/`. A resumed run first
drops the records that a killed process logged after its last checkpoint (and purges them from
TensorBoard), so that the file equals an uninterrupted run's. `clu.metric_writers` would do the
same but imports TensorFlow, which this project does not install.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from nr_jax.graph import ChannelGraph
from nr_jax.live import count

log = logging.getLogger("nr_jax")

REJUVENATIONS = "rejuvenations.json"  # every rejuvenation of a run (one per cycle), in order

EPOCH_LINE_KEYS = (
    "train_loss",
    "val_accuracy_sum",
    "test_accuracy_sum",
    "test_accuracy_old",
    "test_accuracy_new",
    "epoch_utilization",
    "lambda_next",
    "phase",
)


class MetricWriter:
    """Metrics keyed by step to `metrics.jsonl` (and TensorBoard event files when available).

    Only process 0 writes (multi-host runs); the others' writers do nothing.

    Args:
      workdir: the run directory.
      tensorboard: also write TensorBoard event files (needs tensorboardX).
      resume_step: the step of the checkpoint the run resumes from (0: a fresh run); records
        after it are dropped.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int = 0) -> None:
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_metrics(path, resume_step)  # drop what a killed run logged after its checkpoint
        self._file = open(path, "a")  # noqa: SIM115
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                # purge_step hides the events a killed run logged after its last checkpoint
                self._tb = SummaryWriter(
                    os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:  # pragma: no cover - optional
                log.info("tensorboardX not installed: no TensorBoard event files")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Appends `{"step": step, **metrics}` (arrays become Python numbers or lists)."""
        if self._file is None:
            return
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        """Closes the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_metrics(path: str, step: int) -> None:
    """Keeps the records of `path` up to `step` (atomically): a resumed run logs the rest again.

    Lines cut short by a kill are dropped too. A missing file is left missing.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            continue
    if len(keep) == len(lines):
        return
    log.info(
        "metrics.jsonl: dropping %d records logged after step %d", len(lines) - len(keep), step
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def to_python(v: Any) -> Any:
    """A JSON-able Python value for a scalar or array metric (lists for arrays)."""
    if isinstance(v, np.ndarray | jax.Array):
        v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def log_widths(graph: ChannelGraph, when: str) -> None:
    """Logs the widths and the parameter / MAC counts (at the start, after rejuvenation)."""
    c = count(graph)
    log.info("widths at %s: %s", when, graph.widths)
    log.info(
        "counts at %s: conv weights %d, total params %d, effective params %d, MACs %d "
        "(effective %d)",
        when,
        c.conv,
        c.total,
        c.effective,
        c.macs,
        c.effective_macs,
    )


def format_record(record: dict[str, Any]) -> str:
    """The human line of an epoch record: its main fields, floats to 4 significant digits."""
    return ", ".join(
        f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
        for k in EPOCH_LINE_KEYS
        if k in record
    )


def summarize(
    config: Any, graph: ChannelGraph, history: list[dict], extra: dict[str, Any]
) -> dict[str, Any]:
    """The run's `summary.json`: model, dataset, accuracies, counts, widths, rejuvenation.

    Args:
      config: the run configuration (`model`, `dataset`).
      graph: the final channel graph (counts and widths).
      history: the epoch records, oldest first.
      extra: further fields (epochs run, search epochs, phase, traces, wall time, ...).
    """
    final = history[-1] if history else {}
    summary = {
        "model": config.model,
        "dataset": config.dataset,
        **extra,
        "final_test_accuracy": final.get("test_accuracy_sum"),
        # with a validation split only the final epoch's record carries test figures (the
        # best-validation epoch's are in `extra["best_validation"]`)
        "best_test_accuracy": max(
            (h["test_accuracy_sum"] for h in history if "test_accuracy_sum" in h), default=None
        ),
        "counts": count(graph)._asdict(),
        "widths": graph.widths,
    }
    rej = next((h for h in history if h.get("rejuvenated")), None)
    if rej is not None:
        summary["rejuvenation_epoch"] = rej["epoch"]
        summary["utilization_at_rejuvenation"] = rej["epoch_utilization"]
    return summary


def read_rejuvenations(workdir: str) -> list[dict[str, Any]]:
    """Every rejuvenation of the run in `workdir`, in order (`rejuvenations.json`: `cycle`,
    `epoch` and the report of each); [] before the first."""
    path = os.path.join(workdir, REJUVENATIONS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
