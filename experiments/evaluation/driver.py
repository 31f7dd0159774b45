"""Runs a table's runs one after another: skip the finished, resume the interrupted, branch.

A run whose result file exists is skipped (`MixedCodeError` if other code wrote it); an
interrupted one resumes in its run directory from its newest checkpoint; the slimming control
branches from the NR run's last checkpoint of the search (`keep_search_checkpoint`,
`branch_from_search`). One driver per table (`TableLock`); with `Table.commit` each result file is
committed when its run finishes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from experiments.evaluation import provenance
from experiments.evaluation.results import build_result
from experiments.evaluation.runs import Run, config_for

SEARCH_CHECKPOINT = "search_checkpoint"  # in an NR run directory: its last checkpoint of the search

log = logging.getLogger("experiments.evaluate")

TrainFn = Callable[..., dict[str, Any]]  # train_and_evaluate(config, workdir, *, callbacks)


def keep_search_checkpoint(workdir: Path) -> None:
    """Copies the newest valid checkpoint of `workdir` to `workdir/search_checkpoint/<step>`.

    Called by an NR run right after its rejuvenation, before the epoch's own checkpoint is saved:
    the newest checkpoint on disk is then the last one of the search (the slimming control
    branches from it). Reads with its own `Checkpointer`, which changes nothing on disk.
    """
    from nr_jax.checkpoint import Checkpointer

    with Checkpointer(workdir / "checkpoints") as ckpt:
        step = ckpt.latest_step()
    dest = workdir / SEARCH_CHECKPOINT
    if dest.exists():
        shutil.rmtree(dest)
    if step is None:  # a search of one epoch without mid-epoch checkpoints: nothing to keep
        log.warning("%s: no checkpoint before the rejuvenation to branch from", workdir)
        return
    shutil.copytree(workdir / "checkpoints" / str(step), dest / str(step))


def branch_from_search(workdir: Path, nr_workdir: Path) -> int | None:
    """Starts `workdir` (fresh, marker written) from the NR run's search checkpoint: the step
    directory and the metric records (the trainer drops those after the step on resuming).

    Returns the step branched from, or None when the NR run kept none (then it starts afresh).
    """
    src = nr_workdir / SEARCH_CHECKPOINT
    steps = sorted(int(p.name) for p in src.iterdir() if p.name.isdigit()) if src.is_dir() else []
    if not steps:
        return None
    shutil.copytree(src / str(steps[-1]), workdir / "checkpoints" / str(steps[-1]))
    shutil.copyfile(nr_workdir / "metrics.jsonl", workdir / "metrics.jsonl")
    return steps[-1]


def run_one(
    run: Run, config: Any, fingerprint: str, results_root: Path, runs_root: Path, train_fn: TrainFn
) -> tuple[str, dict[str, Any]]:
    """Skips, resumes or starts `run`; returns ("skipped" | "finished", its result)."""
    path = run.result_path(results_root)
    if path.exists():
        result = provenance.read_json(path)
        if result.get("fingerprint") != fingerprint:
            raise provenance.MixedCodeError(
                f"{path}: fingerprint {result.get('fingerprint')}, not {fingerprint}"
            )
        return "skipped", result
    config_json = json.loads(config.to_json_best_effort())
    workdir = run.workdir(runs_root)
    resumed = provenance.prepare_workdir(workdir, fingerprint, config_json)
    log.info("%s %s in %s", "resuming" if resumed else "starting", run.name, workdir)
    if run.arm == "slimming" and not resumed:
        nr_workdir = Run(run.table, run.arch, "nr", run.seed).workdir(runs_root)
        step = branch_from_search(workdir, nr_workdir)
        log.info("%s: branched from %s at step %s", run.name, nr_workdir, step)
    kwargs = {}
    if run.arm == "nr":
        from nr_jax.callbacks import Callbacks

        kwargs["callbacks"] = Callbacks(after_rejuvenation=lambda: keep_search_checkpoint(workdir))
    summary = train_fn(config, str(workdir), **kwargs)
    result = build_result(run, config_json, summary, workdir, fingerprint)
    provenance.write_json(path, result)
    return "finished", result


@dataclasses.dataclass(frozen=True)
class Table:
    """Where a table lives and how its runs train."""

    name: str
    results_root: Path
    runs_root: Path
    quick: bool = False
    commit: bool = False
    train_fn: TrainFn | None = None  # default: nr_jax.train.train_and_evaluate


def run_table(table: Table, runs: list[Run]) -> Iterator[tuple[Run, str, dict]]:
    """Runs `runs` one after another under the table's lock; yields (run, status, result)."""
    fingerprint = provenance.code_fingerprint()
    train_fn = table.train_fn
    if train_fn is None:
        from nr_jax import train

        train_fn = train.train_and_evaluate
    with TableLock(table.runs_root / table.name):
        provenance.check_table(table.results_root / table.name, fingerprint)
        for run in runs:
            config = config_for(run, table.results_root, table.quick)
            status, result = run_one(
                run, config, fingerprint, table.results_root, table.runs_root, train_fn
            )
            if status == "finished" and table.commit:
                _git_commit_result(run.result_path(table.results_root), run)
            yield run, status, result


class TableLock:
    """An exclusive lock on `<dir>/.lock` (one driver per table; released if the process dies)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / ".lock"

    def __enter__(self) -> TableLock:
        self.file = open(self.path, "w")  # noqa: SIM115
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.file.close()
            raise RuntimeError(f"another driver holds {self.path}: one driver per table") from e
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _git_commit_result(path: Path, run: Run) -> None:
    """Commits the result file in the repository that holds it (also when the driver runs from
    a pinned worktree with `--results_dir` in the main checkout). A failure (another commit
    holding the index lock) is retried, then only logged: the file is written, and a later
    commit picks it up."""
    message = f"experiments/results/{run.table}: {run.name} finished"
    for attempt in range(5):
        add = subprocess.run(["git", "add", path.name], cwd=path.parent, capture_output=True)
        done = add.returncode == 0 and (
            subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", path.name],
                cwd=path.parent,
                capture_output=True,
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(2.0 * (attempt + 1))
    log.warning("could not commit %s (commit it by hand)", path)
