"""Plots of a run, written as PNG into its directory (`plot_run(workdir)`).

* `utilization.png`: utilisation and λ over training steps, with the rejuvenation marked;
* `accuracy.png`: test accuracy per epoch, summed logits and the old/new heads after NR;
* `widths.png`: per-unit widths before rejuvenation, survivors, and widths after;
* `gammas.png`: histograms of BN |γ| per unit at rejuvenation time (log scale), with the liveness
  threshold of each unit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


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
    rej_path = os.path.join(workdir, "rejuvenation.json")
    rejuvenation = None
    if os.path.exists(rej_path):
        with open(rej_path) as f:
            rejuvenation = json.load(f)
    plt = _plt()
    steps = [r for r in records if "train/utilization" in r or "train/loss" in r]
    epochs = [r for r in records if "epoch/epoch" in r]
    rej_step = next((r["step"] for r in epochs if r.get("epoch/rejuvenated")), None)
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
        if rej_step is not None:
            ax.axvline(rej_step, color="k", ls="--", lw=1, label="rejuvenation")
        ax.legend(loc="upper right")
        ax.set_title("utilisation and sparsity coefficient")
        written.append(_save(fig, workdir, "utilization.png"))
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        e = [r["epoch/epoch"] for r in epochs]
        for key, label in (("sum", "summed"), ("old", "old head"), ("new", "new head")):
            ys = [r.get(f"epoch/test_accuracy_{key}", np.nan) for r in epochs]
            if not all(np.isnan(ys)):
                ax.plot(e, ys, marker="o", ms=3, label=label)
        if rej_step is not None:
            rej_epoch = next(r["epoch/epoch"] for r in epochs if r.get("epoch/rejuvenated"))
            ax.axvline(rej_epoch, color="k", ls="--", lw=1, label="rejuvenation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend()
        ax.set_title("test accuracy")
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


def _save(fig: Any, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
