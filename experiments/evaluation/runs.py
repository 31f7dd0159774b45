"""The runs of a table: one arm of `eval_table` for one architecture and seed, in order.

A run is named `<arch>_<arm>_s<seed>`; it trains in `<runs_root>/<table>/<run>/` and writes its
result to `<results_root>/<table>/<run>.json`. `plan` orders them so that every arm that depends
on the NR run (`eval_table.DEPENDS_ON_NR`) comes after it; `config_for` builds a run's config.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from experiments.configs import eval_table
from experiments.evaluation.provenance import read_json

log = logging.getLogger("experiments.evaluate")


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
