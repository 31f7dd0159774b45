"""The small-scale version of the paper's claim, measured on CPU: NR against its baseline.

For each architecture and seed:
  * NR arm: the official schedule: L1 search until utilisation <= target (k epochs, measured per
    seed), one rejuvenation, then E epochs with the LR schedule (cross connections removed).
  * Baseline, epoch-matched: the same network at the same allocated parameter budget, no L1, no
    rejuvenation, trained E + k epochs with its LR milestones shifted by k.
  * Baseline, E epochs (`--short_baseline`): the plain schedule.
Writes `results.md` (mean and standard deviation of the final test error, parameters and MACs),
`results.json` and `results.png` into --out.

    python -m experiments.reproduce_fmnist --out runs/fmnist_table

Errors are one line on stderr (`experiments.cli`): exit status 2 for a refused input, 1 for a
failure during a run; `--debug` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from absl import flags

from experiments import cli
from experiments.configs import fmnist_table
from nr_jax import train

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli)  # --debug
flags.DEFINE_string("out", "runs/fmnist_table", "Output directory.")
flags.DEFINE_list("archs", ["vgg", "resnet"], "Architectures (keys of fmnist_table.ARCHS).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_boolean("short_baseline", False, "Also train the baseline for E epochs only.")
flags.DEFINE_boolean("progress", False, "Progress bars.")
flags.DEFINE_boolean(
    "table_only", False, "Rebuild the table from the finished runs in --out; train nothing."
)


def _run(config, workdir: str) -> dict | None:
    config.progress = FLAGS.progress
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):  # finished earlier: the table can be rebuilt without retraining
        with open(path) as f:
            return json.load(f)
    if FLAGS.table_only:
        return None
    return train.train_and_evaluate(config, workdir)


def _row(arm: str, s: dict) -> dict:
    c = s["counts"]
    return {
        "arm": arm,
        "error": 1.0 - s["final_test_accuracy"],
        "best_error": 1.0 - s["best_test_accuracy"],
        "epochs": s["epochs_run"],
        "search_epochs": s["search_epochs"],
        "params_total": c["total"],
        "params_effective": c["effective"],
        "macs": c["macs"],
        "macs_effective": c["effective_macs"],
        "utilization": s.get("utilization_at_rejuvenation"),
        "wall_s": s["wall_time_s"],
    }


def run_all(out: str) -> list[dict]:
    rows = []
    for arch in FLAGS.archs:
        for seed in map(int, FLAGS.seeds):
            nr = _run(fmnist_table.nr_config(arch, seed), f"{out}/{arch}/nr_s{seed}")
            if nr is None:
                continue
            k = nr["search_epochs"]
            rows.append({"arch": arch, "seed": seed, **_row("NR", nr)})
            base = _run(fmnist_table.baseline_config(arch, seed, k), f"{out}/{arch}/base_k_s{seed}")
            if base is not None:
                rows.append({"arch": arch, "seed": seed, **_row("baseline E+k", base)})
            if FLAGS.short_baseline:
                short = _run(
                    fmnist_table.baseline_config(arch, seed, 0), f"{out}/{arch}/base_s{seed}"
                )
                if short is not None:
                    rows.append({"arch": arch, "seed": seed, **_row("baseline E", short)})
            logging.info("%s seed %d: %s", arch, seed, rows[-2:])
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| arch | arm | test error % (mean ± std) | best-epoch error % | epochs | "
        "params (allocated) | params (effective) | MACs (effective) | U at NR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            rs = [r for r in rows if r["arch"] == arch and r["arm"] == arm]
            if not rs:
                continue
            e = 100 * np.array([r["error"] for r in rs])
            b = 100 * np.array([r["best_error"] for r in rs])
            ep = "/".join(str(r["epochs"]) for r in rs)
            u = [r["utilization"] for r in rs if r["utilization"] is not None]
            u_str = f"{np.mean(u):.3f}" if u else "-"
            std = e.std(ddof=1) if len(e) > 1 else 0.0
            lines.append(
                f"| {arch} | {arm} | {e.mean():.2f} ± {std:.2f} | {b.mean():.2f} | {ep} | "
                f"{np.mean([r['params_total'] for r in rs]):,.0f} | "
                f"{np.mean([r['params_effective'] for r in rs]):,.0f} | "
                f"{np.mean([r['macs_effective'] for r in rs]) / 1e6:.1f}M | {u_str} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        for i, arch in enumerate(archs):
            e = [100 * r["error"] for r in rows if r["arch"] == arch and r["arm"] == arm]
            if not e:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.bar(x, np.mean(e), width, color=f"C{j}", label=arm if i == 0 else None)
            ax.scatter([x] * len(e), e, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("final test error (%)")
    ax.set_title("Fashion-MNIST: NR vs baseline at the same allocated budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("nr_jax").setLevel(logging.INFO)
    os.makedirs(FLAGS.out, exist_ok=True)
    t0 = time.time()
    rows = run_all(FLAGS.out)
    wall = sum(r["wall_s"] for r in rows) if FLAGS.table_only else time.time() - t0
    md = table(rows)
    with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
        what = "sum of the runs' wall times" if FLAGS.table_only else "wall time of this invocation"
        f.write(md + f"\n\n{what}: {wall / 60:.1f} min\n")
    with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "wall_s": wall}, f, indent=1)
    plot(rows, os.path.join(FLAGS.out, "results.png"))
    print(md)  # the table, for people
    print(f"wall time {wall / 60:.1f} min ({'sum of runs' if FLAGS.table_only else 'this call'})")


if __name__ == "__main__":
    cli.run(main)
