"""Plots of a run, written as PNG into its directory (`plot_run(workdir)`).

* `utilization.png`: utilisation and λ over training steps, with the rejuvenation marked;
* `accuracy.png`: validation accuracy per epoch (test accuracy for runs without a validation
  split), summed logits and the old/new heads after NR;
* `widths.png`: per-unit widths before the (last) rejuvenation, survivors, and widths after;
* `cycles.png` (runs with `nr.cycles` > 1): the utilisation at each rejuvenation and r, and every
  unit's width across the cycles (from `rejuvenations.json`, one entry per rejuvenation);
* `gammas.png`: histograms of BN |γ| per unit at rejuvenation time (log scale), with the liveness
  threshold of each unit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from nr_jax.metrics import read_rejuvenations


def _records(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(workdir: str) -> list[str]:
    """Writes every plot the run's files allow; returns the paths written."""
    records = _records(workdir)
    written = []
    cycles = read_rejuvenations(workdir)
    if not cycles and os.path.exists(os.path.join(workdir, "rejuvenation.json")):
        with open(
            os.path.join(workdir, "rejuvenation.json")
        ) as f:  # runs before rejuvenations.json
            cycles = [json.load(f)]
    rejuvenation = cycles[-1] if cycles else None
    plt = _plt()
    steps = [r for r in records if "train/utilization" in r or "train/loss" in r]
    epochs = [r for r in records if "epoch/epoch" in r]
    rej_steps = [r["step"] for r in epochs if r.get("epoch/rejuvenated")]
    rej_epochs = [r["epoch/epoch"] for r in epochs if r.get("epoch/rejuvenated")]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = [r["step"] for r in steps]
        if any("train/utilization" in r for r in steps):
            ax.plot(x, [r.get("train/utilization", np.nan) for r in steps], label="utilisation")
        ax.set_xlabel("step")
        ax.set_ylabel("utilisation")
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("train/lambda", 0.0) for r in steps], color="C1", label="λ")
        ax2.set_ylabel("λ", color="C1")
        for i, step in enumerate(rej_steps):
            ax.axvline(step, color="k", ls="--", lw=1, label="rejuvenation" if i == 0 else None)
        ax.legend(loc="upper right")
        ax.set_title("utilisation and sparsity coefficient")
        written.append(_save(fig, workdir, "utilization.png"))
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        e = [r["epoch/epoch"] for r in epochs]
        split = "val" if any("epoch/val_accuracy_sum" in r for r in epochs) else "test"
        for key, label in (("sum", "summed"), ("old", "old head"), ("new", "new head")):
            ys = [r.get(f"epoch/{split}_accuracy_{key}", np.nan) for r in epochs]
            if not all(np.isnan(ys)):
                ax.plot(e, ys, marker="o", ms=3, label=label)
        for i, epoch in enumerate(rej_epochs):
            ax.axvline(epoch, color="k", ls="--", lw=1, label="rejuvenation" if i == 0 else None)
        name = "validation" if split == "val" else "test"
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} accuracy")
        ax.legend()
        ax.set_title(f"{name} accuracy")
        written.append(_save(fig, workdir, "accuracy.png"))
    if rejuvenation is not None:
        names = list(rejuvenation["widths_before"])
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
        ax.bar(x - 0.27, [rejuvenation["widths_before"][n] for n in names], 0.27, label="before")
        ax.bar(x, [rejuvenation["survivors"][n] for n in names], 0.27, label="live")
        ax.bar(x + 0.27, [rejuvenation["widths_after"][n] for n in names], 0.27, label="after")
        ax.set_xticks(x, names, rotation=90, fontsize=7)
        ax.set_ylabel("channels")
        ax.set_title(f"widths (U={rejuvenation['utilization']:.3f}, r={rejuvenation['r']:.3f})")
        ax.legend()
        written.append(_save(fig, workdir, "widths.png"))
    if len(cycles) > 1:
        written.append(_plot_cycles(plt, workdir, cycles))
    gam_path = os.path.join(workdir, "gammas_at_rejuvenation.npz")
    if os.path.exists(gam_path):
        gammas = dict(np.load(gam_path))
        n = len(gammas)
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
        for ax, (name, g) in zip(axes.flat, gammas.items(), strict=False):
            g = np.abs(g) + 1e-8
            ax.hist(np.log10(g), bins=30)
            ax.axvline(np.log10(1e-2 * g.max()), color="r", lw=1)
            ax.set_title(name, fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("log10 |γ| at rejuvenation (red: liveness threshold)")
        written.append(_save(fig, workdir, "gammas.png"))
    return written


def _plot_cycles(plt: Any, workdir: str, cycles: list[dict[str, Any]]) -> str:
    """Utilisation at each rejuvenation (and r), and every unit's width across the cycles."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    c = np.arange(1, len(cycles) + 1)
    ax.plot(c, [r["utilization"] for r in cycles], marker="o", label="utilisation at rejuvenation")
    ax.set_xlabel("cycle")
    ax.set_ylabel("utilisation")
    ax.set_xticks(c)
    ax2 = ax.twinx()
    ax2.plot(c, [r["r"] for r in cycles], marker="s", color="C1", label="r")
    ax2.set_ylabel("r (widening factor)", color="C1")
    ax.set_title("utilisation and r per cycle")
    names = list(cycles[0]["widths_before"])
    stages = [cycles[0]["widths_before"]] + [r["widths_after"] for r in cycles]
    for name in names:
        bx.plot(range(len(stages)), [s[name] for s in stages], marker="o", ms=3, label=name)
    bx.set_xticks(range(len(stages)), ["start"] + [f"after {i}" for i in c])
    bx.set_ylabel("channels")
    bx.set_title("widths across cycles")
    bx.legend(fontsize=6, ncol=2 if len(names) > 8 else 1)
    return _save(fig, workdir, "cycles.png")


def _save(fig: Any, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
