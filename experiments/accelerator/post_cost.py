"""Section `post`: the train step after a rejuvenation with the cross connections removed and
with cross-attention, against the dense network of the same allocated widths.

Every unit loses `setting.dead_frac` of its channels through γ = 0, then is rejuvenated
(`experiments.benchmark.common.force_rejuvenation`: U about 0.25 at a half), so the three schemes
share one plan of widths; their steps are timed in interleaved repetitions
(`experiments.benchmark.common.interleaved`).
"""

from __future__ import annotations

import time
from typing import Any

from experiments.accelerator.deadline import Deadline
from experiments.accelerator.settings import Setting
from experiments.benchmark.common import (
    force_rejuvenation,
    interleaved,
    make_trainer,
    synthetic_batch,
    time_steps,
)
from nr_jax import data as nr_data

TITLE = "Post-rejuvenation step time against dense"
GOAL_RATIO = 0.6  # issue 15: the removed-cross step at or below 0.6 of dense


def run(setting: Setting, deadline: Deadline, result: dict[str, Any]) -> None:
    """Rejuvenates and compiles each scheme, then times them together."""
    model, dataset, n = setting.post_family
    info = nr_data.DATASET_INFO[dataset]
    batch = synthetic_batch(n, info.image_shape[0], info.image_shape[2], info.num_classes)
    result.update(model=model, batch=n, setup_s={})
    cands, reports = {}, {}
    for scheme in setting.post_schemes:
        deadline.check(f"rejuvenating {scheme}")
        t = time.perf_counter()
        trainer, state = make_trainer(model, True, scheme, dataset, n)
        state, reports[scheme] = force_rejuvenation(trainer, state, setting.dead_frac)
        state, _ = time_steps(trainer.steps.train, state, batch, 1)  # compiled here
        cands[scheme] = (trainer.steps.train, state)
        result["setup_s"][scheme] = round(time.perf_counter() - t, 2)
    report = reports[setting.post_schemes[0]]
    counts = report.counts_after
    result.update(
        utilization=report.utilization,
        effective_macs_ratio=counts.effective_macs / counts.macs,
        macs_dense=counts.macs,
        macs_removed=counts.effective_macs,
    )
    deadline.check("timing")
    times = interleaved(cands, batch, setting.reps, setting.steps)
    result["ms_per_step"] = {k: 1e3 * t for k, t in times.items()}
    for scheme in setting.post_schemes:
        if scheme != "dense" and "dense" in times:
            result[f"{scheme}_vs_dense"] = times[scheme] / times["dense"]


def goal(result: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's removed-vs-dense goal against the measured ratio (None if not measured)."""
    ratio = result.get("removed_vs_dense")
    if ratio is None:
        return None
    return {
        "goal": f"removed-cross step <= {GOAL_RATIO} of dense",
        "measured": round(ratio, 3),
        "met": ratio <= GOAL_RATIO,
    }


def summary(result: dict[str, Any]) -> str:
    ratios = ", ".join(
        f"{k.replace('_vs_dense', '')}/dense {v:.2f}"
        for k, v in result.items()
        if k.endswith("_vs_dense")
    )
    return (
        f"{result['model']} batch {result['batch']}, U {result['utilization']:.3f}: "
        f"{ratios} (effective MACs/dense {result['effective_macs_ratio']:.2f})"
    )


def markdown(result: dict[str, Any]) -> list[str]:
    ms = result["ms_per_step"]
    schemes = list(ms)
    return [
        f"{result['model']}, batch {result['batch']}, U {result['utilization']:.3f}, effective "
        f"MACs of the removed scheme / dense {result['effective_macs_ratio']:.2f}.",
        "",
        "| "
        + " | ".join(f"{s} ms" for s in schemes)
        + " | "
        + " | ".join(f"{s}/dense" for s in schemes if s != "dense")
        + " |",
        "|---" * (2 * len(schemes) - 1) + "|",
        "| "
        + " | ".join(f"{ms[s]:.2f}" for s in schemes)
        + " | "
        + " | ".join(f"{result[f'{s}_vs_dense']:.2f}" for s in schemes if s != "dense")
        + " |",
    ]
