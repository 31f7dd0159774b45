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
this driver, `experiments/main.py` and `experiments/configs/**/*.py`, nothing else (so committing
results or unrelated files does not change it). The driver skips runs whose result file exists,
resumes interrupted ones, and refuses (`MixedCodeError`) to resume a run directory, or to add to a
table, written by code with another fingerprint: move them away or use a new `--table`. Accuracy
runs are deterministic, so they may share the machine; their wall times are then not figures to
quote (state cost as steps x the step time of `--step_time` on a quiet machine).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from absl import app, flags

from experiments.configs import eval_table

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT_GLOBS = (
    "nr_jax/**/*.py",
    "experiments/evaluate.py",
    "experiments/main.py",
    "experiments/configs/**/*.py",
)
MARKER = "fingerprint.json"  # in every run directory: the code and config that started it
SEARCH_CHECKPOINT = "search_checkpoint"  # in an NR run directory: its last checkpoint of the search
VERSIONED = ("jax", "jaxlib", "flax", "optax", "grain", "numpy")

log = logging.getLogger("experiments.evaluate")


class MixedCodeError(RuntimeError):
    """A run directory or a table was written by code with another fingerprint (or config)."""


def fingerprint_files(root: Path = ROOT) -> list[Path]:
    """The files whose contents decide results, sorted by their path relative to `root`."""
    files = {p for pattern in FINGERPRINT_GLOBS for p in root.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 over (relative path, contents) of `fingerprint_files(root)`, 16 hex digits."""
    h = hashlib.sha256()
    for p in fingerprint_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """HEAD's commit and whether the fingerprinted files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        paths = [p.relative_to(root).as_posix() for p in fingerprint_files(root)]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def versions() -> dict[str, str]:
    """Versions of the packages that compute the results."""
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a table: an arm of `eval_table` for one architecture and seed."""

    table: str
    arch: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.arm.replace(':', '-')}_s{self.seed}"

    @property
    def validation_only(self) -> bool:
        """Sweep runs choose settings: their result files carry no test figures."""
        return self.arm.startswith("sweep:")

    def result_path(self, results_root: Path) -> Path:
        return results_root / self.table / f"{self.name}.json"

    def workdir(self, runs_root: Path) -> Path:
        return runs_root / self.table / self.name


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def check_table(table_dir: Path, fingerprint: str) -> None:
    """Refuses to add to a table whose finished results come from other code."""
    for path in sorted(table_dir.glob("*.json")):
        found = read_json(path).get("fingerprint")
        if found != fingerprint:
            raise MixedCodeError(
                f"{path} was written by code with fingerprint {found}, this code is "
                f"{fingerprint}: a table never mixes code; move {table_dir} away or use a new "
                "--table"
            )


def prepare_workdir(workdir: Path, fingerprint: str, config_json: Any) -> bool:
    """Creates the run directory with its marker, or checks the marker of an existing one.

    Returns whether the run resumes (the directory existed). Raises `MixedCodeError` when the
    existing directory was started by other code, with another config, or has no marker.
    """
    marker = workdir / MARKER
    if marker.exists():
        found = read_json(marker)
        if found["fingerprint"] != fingerprint:
            raise MixedCodeError(
                f"{workdir} was started by code with fingerprint {found['fingerprint']}, this "
                f"code is {fingerprint}: refusing to resume it (move it away to start afresh)"
            )
        if found["config"] != config_json:
            raise MixedCodeError(f"{workdir} was started with another config: refusing to resume")
        return True
    if workdir.exists() and any(workdir.iterdir()):
        raise MixedCodeError(f"{workdir} exists without {MARKER}: refusing to resume unknown code")
    write_json(marker, {"fingerprint": fingerprint, "config": config_json})
    return False


def read_epochs(workdir: Path) -> list[dict[str, Any]]:
    """The epoch records of `metrics.jsonl` (keys without their "epoch/" prefix, with "step")."""
    records = []
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "epoch/epoch" in r:
                epoch = {k[len("epoch/") :]: v for k, v in r.items() if k.startswith("epoch/")}
                records.append({"step": r["step"], **epoch})
    return records


def training_cost(summary: dict[str, Any], steps_per_epoch: int, batch: int) -> dict[str, Any]:
    """Steps and conv training MACs (forward + backward taken as 3 forward passes).

    Before rejuvenation a step computes the allocated network's MACs (masked channels are still
    computed); after it, the effective MACs of the blocks actually computed (removed scheme).
    """
    steps = steps_per_epoch * summary["epochs_run"]
    rej = summary.get("rejuvenation")
    if rej:
        before, after = rej["counts_before"]["macs"], rej["counts_after"]["effective_macs"]
        steps_before = steps_per_epoch * summary["rejuvenation_epoch"]
    else:
        before = after = summary["counts"]["effective_macs"]
        steps_before = steps
    per_image = 3  # forward + backward
    return {
        "steps": steps,
        "macs_per_step_before": per_image * batch * before,
        "macs_per_step_after": per_image * batch * after,
        "train_macs": per_image * batch * (steps_before * before + (steps - steps_before) * after),
    }


def _strip_test(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_test(v) for k, v in obj.items() if not k.startswith("test_")}
    if isinstance(obj, list):
        return [_strip_test(v) for v in obj]
    return obj


def build_result(
    run: Run, config_json: Any, summary: dict[str, Any], workdir: Path, fingerprint: str
) -> dict[str, Any]:
    """The result file of a finished run (sweep runs: validation figures only)."""
    epochs = read_epochs(workdir)
    spe = epochs[0]["step"]  # steps of the first epoch = steps per epoch
    last = epochs[-1]
    rej = summary.get("rejuvenation")
    result = {
        "table": run.table,
        "run": run.name,
        "arch": run.arch,
        "arm": run.arm,
        "seed": run.seed,
        "fingerprint": fingerprint,
        **git_commit(),
        "versions": versions(),
        "config": config_json,
        "epochs": epochs,
        "final": {"epoch": last["epoch"], **{k: v for k, v in last.items() if "test_" in k}},
        "best_validation": summary.get("best_validation"),
        "epochs_run": summary["epochs_run"],
        "search_epochs": summary["search_epochs"],
        "steps_per_epoch": spe,
        "cost": training_cost(summary, spe, config_json["batch_size"]),
        "counts": summary["counts"],
        "widths": summary["widths"],
        "utilization_at_rejuvenation": summary.get("utilization_at_rejuvenation"),
        "rejuvenation": None if rej is None else {k: rej[k] for k in ("r", "widths_after")},
        "wall_time_s": summary.get("wall_time_s"),  # not a figure to quote (shared machine)
    }
    if run.validation_only:  # the metrics only: the config keeps its `test_limit`
        for key in ("epochs", "final", "best_validation"):
            result[key] = _strip_test(result[key])
    return result


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
        result = read_json(path)
        if result.get("fingerprint") != fingerprint:
            raise MixedCodeError(
                f"{path}: fingerprint {result.get('fingerprint')}, not {fingerprint}"
            )
        return "skipped", result
    config_json = json.loads(config.to_json_best_effort())
    workdir = run.workdir(runs_root)
    resumed = prepare_workdir(workdir, fingerprint, config_json)
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
    write_json(path, result)
    return "finished", result


def plan(table: str, archs: list[str], arms: list[str], seeds: list[int]) -> list[Run]:
    """The runs in order: per architecture and seed, the NR run before the arms that need it.

    `arms` may hold "sweep" (every `eval_table.SWEEP` entry); arms in `eval_table.NOT_DONE` are
    left out with a warning.
    """
    expanded = []
    for arm in arms:
        expanded += [f"sweep:{s}" for s in eval_table.SWEEP] if arm == "sweep" else [arm]
    for arm in [a for a in expanded if a in eval_table.NOT_DONE]:
        log.warning("arm %s left out: %s", arm, eval_table.NOT_DONE[arm])
    order = {a: i for i, a in enumerate(eval_table.ARMS)}
    ready = sorted(
        (a for a in expanded if a not in eval_table.NOT_DONE), key=lambda a: order.get(a, -1)
    )
    return [Run(table, arch, arm, seed) for arch in archs for seed in seeds for arm in ready]


def config_for(run: Run, results_root: Path, quick: bool) -> Any:
    """The run's config; arms that depend on the NR run read its finished result file."""
    nr_result = None
    if run.arm in eval_table.DEPENDS_ON_NR:
        nr_path = Run(run.table, run.arch, "nr", run.seed).result_path(results_root)
        if not nr_path.exists():
            raise FileNotFoundError(f"{run.name} needs the finished NR run {nr_path}")
        nr_result = read_json(nr_path)
    config = eval_table.get_config(run.arm, run.arch, run.seed, nr_result)
    return eval_table.quick(config) if quick else config


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
    fingerprint = code_fingerprint()
    train_fn = table.train_fn
    if train_fn is None:
        from nr_jax import train

        train_fn = train.train_and_evaluate
    with TableLock(table.runs_root / table.name):
        check_table(table.results_root / table.name, fingerprint)
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


def step_time(arch: str, width: float, nr: bool, steps: int = 30, warmup: int = 5) -> dict:
    """Median seconds of one jitted train step (batch of the table, synthetic images) and of one
    eval batch, for `arch` at width multiplier `width` (NR search step if `nr`, else baseline)."""
    import jax
    import numpy as np

    from nr_jax import train

    config = eval_table.base(arch)
    config.model_kwargs.width_multiplier = width
    config.nr.enabled = nr
    trainer = train.Trainer(config, workdir="")
    shape = trainer.info.image_shape
    state = trainer.place(
        train.init_state(trainer.model, trainer.tx, config, shape, jax.random.key(0))
    )
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        images = rng.normal(size=(n, *shape)).astype(np.float32)
        labels = rng.integers(0, 10, n).astype(np.int32)
        return {"image": images, "label": labels, "mask": np.ones(n, np.float32)}

    train_batch, eval_batch, times = batch(config.batch_size), batch(config.eval_batch_size), []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = trainer.steps.train(state, train_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    evals = []
    for _ in range(warmup + 5):
        t = time.perf_counter()
        jax.block_until_ready(trainer.steps.eval(state.variables, eval_batch))
        evals.append(time.perf_counter() - t)
    return {
        "train_step_s": float(np.median(times[warmup:])),
        "eval_batch_s": float(np.median(evals[warmup:])),
    }


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
