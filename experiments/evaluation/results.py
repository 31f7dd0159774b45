"""The result file of a finished run: epochs, final and best-validation figures, counts, cost.

Per-epoch train and validation metrics from the run's `metrics.jsonl`, test metrics at the final
and best-validation epochs (none for sweep runs, which choose settings), counts, steps and the
training cost in conv MACs, with the run's config, seed, commit, code fingerprint and versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.evaluation.provenance import MARKER, git_commit, machine, read_json, versions
from experiments.evaluation.runs import Run


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


def _machines(workdir: Path) -> dict[str, Any]:
    """The machine that finished the run, and the one that started it where that differs (a run
    resumed on another CPU kind is not bit-identical to one run through)."""
    now = machine()
    marker = workdir / MARKER
    start = read_json(marker).get("machine") if marker.exists() else None
    return {"machine": now} if start in (None, now) else {"machine": now, "machine_at_start": start}


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
        **_machines(workdir),
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
