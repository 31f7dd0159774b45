"""Carries unfinished runs of a table across machines that do not keep their disks.

    python -m experiments.carry_runs save --table eval --runs_dir /work/runs
    python -m experiments.carry_runs restore --table eval --runs_dir /work/runs

`save` packs every run directory of `<runs_dir>/<table>/` that a later driver still needs into
`experiments/results/<table>/carry/<run>.tar.gz`, for committing (a few MB each for the
Fashion-MNIST tables): a run without a result file (interrupted: its marker, metrics and newest
checkpoints), and a finished NR run whose slimming control has not finished (its search
checkpoint, which the control branches from). Stop the driver first, so that no checkpoint is
half written. `restore` unpacks those whose run directory is absent;
the driver then resumes them from their newest checkpoint, with the marker's checks (the same
code fingerprint and config, else it refuses). A restored run's result records the machine that
started it (`machine_at_start`) when it finishes on another kind. Archives no longer needed are
removed by either command.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

from experiments.evaluation.runs import Run

ROOT = Path(__file__).resolve().parents[1]


def _carry_dir(results_dir: Path, table: str) -> Path:
    return results_dir / table / "carry"


def needed(run: str, results_dir: Path, table: str) -> bool:
    """Whether a later driver needs the run directory `run` (see the module docstring)."""
    if not (results_dir / table / f"{run}.json").exists():
        return True
    arch, sep, seed = run.partition("_nr_s")  # `Run.name` of an NR run: <arch>_nr_s<seed>
    if not (sep and seed.isdigit()):
        return False
    slimming = Run(table, arch, "slimming", int(seed)).result_path(results_dir)
    return not slimming.exists()


def _drop_unneeded(results_dir: Path, table: str) -> None:
    for archive in sorted(_carry_dir(results_dir, table).glob("*.tar.gz")):
        if not needed(archive.name.removesuffix(".tar.gz"), results_dir, table):
            archive.unlink()


def save(table: str, runs_dir: Path, results_dir: Path) -> list[Path]:
    """Packs the table's run directories that are still needed; returns the archives written."""
    _drop_unneeded(results_dir, table)
    out = []
    for workdir in sorted(p for p in (runs_dir / table).iterdir() if p.is_dir()):
        if not needed(workdir.name, results_dir, table):
            continue
        archive = _carry_dir(results_dir, table) / f"{workdir.name}.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(workdir, arcname=workdir.name)
        tmp.replace(archive)
        out.append(archive)
    return out


def restore(table: str, runs_dir: Path, results_dir: Path) -> list[Path]:
    """Unpacks the table's carried runs whose run directory is absent; returns those restored."""
    _drop_unneeded(results_dir, table)
    out = []
    for archive in sorted(_carry_dir(results_dir, table).glob("*.tar.gz")):
        workdir = runs_dir / table / archive.name.removesuffix(".tar.gz")
        if workdir.exists():
            continue
        workdir.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(workdir.parent, filter="data")
        out.append(workdir)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("save", "restore"))
    p.add_argument("--table", required=True)
    p.add_argument("--runs_dir", type=Path, required=True)
    p.add_argument("--results_dir", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)
    if args.command == "save" and not (args.runs_dir / args.table).is_dir():
        p.error(f"no run directories in {args.runs_dir / args.table}")
    fn = save if args.command == "save" else restore
    for path in fn(args.table, args.runs_dir, args.results_dir):
        print(f"{args.command}d {path}")


if __name__ == "__main__":
    main()
