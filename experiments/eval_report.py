"""Tables and plots of the evaluation (issue 14, item 8) from the committed result files.

    python -m experiments.eval_report --table sweep     # the sweep: validation only
    python -m experiments.eval_report --table eval      # the test table, with paired differences

Reads `experiments/results/<table>/*.json` (written by `experiments.evaluate`) and writes beside
them `README.md` (the tables) and PNG plots: validation error against epochs and against training
compute (conv MACs, forward + backward), a row per architecture, a line per arm (the mean over its
seeds, a band from the lowest to the highest), and, where the run directories are still
on disk (`--runs_dir`), λ and the utilisation against steps. Nothing is chosen here: the sweep
table shows validation figures only, and the test table reports what the runs produced.

Figures per run: k (search epochs), U at rejuvenation, the best validation accuracy and its
epoch, the final validation accuracy and loss; during the search, the collapse check (the largest
shortfall of NR's eval-mode validation accuracy below the baseline's at the same epoch; collapse
when above 5 points; also with NR's BN statistics recomputed) and the eval lag (validation
accuracy with recomputed BN statistics minus without, `val_bn_accuracy_sum - val_accuracy_sum`).
The test table: per architecture and arm the mean ± std over seeds of the test accuracy at the
final and at the best-validation epoch, and the paired per-seed difference NR − control with its
mean and std.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from absl import app, flags

from experiments import cli, evaluate
from experiments.configs import eval_table

COLLAPSE_POINTS = 5.0  # issue 14: eval-mode validation accuracy > 5 points below the baseline's

# the driver's --table, --results_dir and --runs_dir (one definition: both modules may be loaded)
flags.adopt_module_key_flags(evaluate)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def load_results(table_dir: Path) -> list[dict[str, Any]]:
    """Every result file of a table, sorted by run name."""
    if not table_dir.is_dir():
        raise app.UsageError(f"{table_dir}: no such table (run experiments.evaluate first)")
    results = [json.loads(p.read_text()) for p in sorted(table_dir.glob("*.json"))]
    if not results:
        raise app.UsageError(f"{table_dir}: no result files yet")
    return results


def search_epochs(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The epoch records of the search (phase "search", and the epoch that ended it)."""
    k = int(result.get("search_epochs") or 0)
    return result["epochs"][:k]


def collapse(
    nr: dict[str, Any], baseline: dict[str, Any] | None, metric: str = "val_accuracy_sum"
) -> float | None:
    """Largest shortfall (points) of NR's validation accuracy `metric` below the baseline's
    (eval-mode) at the same epoch during the search; None without a baseline or a search.
    `metric="val_bn_accuracy_sum"`: NR evaluated with recomputed BN statistics (the eval lag
    removed)."""
    if baseline is None:
        return None
    base = {e["epoch"]: e.get("val_accuracy_sum") for e in baseline["epochs"]}
    gaps = [
        100 * (base[e["epoch"]] - e[metric])
        for e in search_epochs(nr)
        if base.get(e["epoch"]) is not None and e.get(metric) is not None
    ]
    return max(gaps) if gaps else None


def eval_lag(result: dict[str, Any]) -> float | None:
    """Mean (points) of val_bn_accuracy_sum − val_accuracy_sum over the search epochs."""
    lags = [
        100 * (e["val_bn_accuracy_sum"] - e["val_accuracy_sum"])
        for e in search_epochs(result)
        if "val_bn_accuracy_sum" in e and "val_accuracy_sum" in e
    ]
    return statistics.fmean(lags) if lags else None


def run_row(result: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """One run's figures (validation only)."""
    best = result.get("best_validation") or {}
    last = result["epochs"][-1]
    nr_baseline = baseline if result["config"]["nr"]["enabled"] else None  # collapse: NR only
    return {
        "run": result["run"],
        "k": result.get("search_epochs"),
        "U_at_rejuvenation": result.get("utilization_at_rejuvenation"),
        "best_val_acc": best.get("val_accuracy_sum"),
        "best_epoch": best.get("epoch"),
        "final_val_acc": last.get("val_accuracy_sum"),
        "final_val_loss": last.get("val_loss"),
        "collapse_points": collapse(result, nr_baseline),
        "collapse_bn_points": collapse(result, nr_baseline, "val_bn_accuracy_sum"),
        "eval_lag_points": eval_lag(result),
        "epochs_run": result.get("epochs_run"),
        "train_macs": result["cost"]["train_macs"],
        "cpu": cpu_label(result),
    }


def _cpu_name(machine: dict[str, Any] | None) -> str | None:
    name = (machine or {}).get("cpu")
    return (
        " ".join(w for w in name.replace("(R)", "").split() if w != "Processor") if name else None
    )


def cpu_label(result: dict[str, Any]) -> str | None:
    """The CPU that ran the run, `start → end` for a run resumed on another kind (results are
    bit-identical per CPU kind only); None where the result file does not record it."""
    end, start = _cpu_name(result.get("machine")), _cpu_name(result.get("machine_at_start"))
    return f"{start} → {end}" if start and start != end else end


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def sweep_baseline(results: list[dict[str, Any]], result: dict[str, Any]) -> dict | None:
    """The baseline run of the same width as `result` (None if not run yet): of the same arch
    and seed where the table has one (the table), else any (the sweep's one seed)."""
    width = result["config"]["model_kwargs"].get("width_multiplier")
    candidates = [
        r
        for r in results
        if not r["config"]["nr"]["enabled"]
        and r["config"]["model_kwargs"].get("width_multiplier") == width
    ]
    same = [r for r in candidates if (r["arch"], r["seed"]) == (result["arch"], result["seed"])]
    return (same or candidates or [None])[0]


def sweep_table(results: list[dict[str, Any]]) -> str:
    """The sweep's markdown table (validation figures only)."""
    cols = [
        ("run", "run"),
        ("k", "k"),
        ("U_at_rejuvenation", "U at rej."),
        ("best_val_acc", "best val acc"),
        ("best_epoch", "at epoch"),
        ("final_val_acc", "final val acc"),
        ("final_val_loss", "final val loss"),
        ("collapse_points", "collapse (pts)"),
        ("collapse_bn_points", "collapse, BN recomputed (pts)"),
        ("eval_lag_points", "eval lag (pts)"),
        ("epochs_run", "epochs"),
        ("cpu", "CPU"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        row = run_row(r, sweep_baseline(results, r))
        lines.append("| " + " | ".join(_fmt(row[c]) for c, _ in cols) + " |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    """`mean ± std (n)` in percent (std of one value: –)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = 100 * statistics.fmean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else None
    return f"{m:.2f} ± {s:.2f} (n={len(values)})" if s is not None else f"{m:.2f} (n=1)"


def test_accuracies(result: dict[str, Any]) -> tuple[float | None, float | None]:
    """Test accuracy (summed heads) at the final and at the best-validation epoch."""
    best = result.get("best_validation") or {}
    return result["final"].get("test_accuracy_sum"), best.get("test_accuracy_sum")


def test_table(results: list[dict[str, Any]]) -> str:
    """Per architecture and arm: mean ± std over seeds, then the paired differences NR − arm."""
    by = defaultdict(dict)  # (arch, arm) -> seed -> result
    for r in results:
        by[(r["arch"], r["arm"])][r["seed"]] = r
    lines = [
        "| arch | arm | test acc, final (%) | test acc, best val (%) | best val acc (%) |",
        "|---|---|---|---|---|",
    ]
    for (arch, arm), seeds in sorted(by.items()):
        finals, bests = zip(*(test_accuracies(r) for r in seeds.values()), strict=True)
        vals = [(r.get("best_validation") or {}).get("val_accuracy_sum") for r in seeds.values()]
        lines.append(
            f"| {arch} | {arm} | {mean_std(list(finals))} | {mean_std(list(bests))} "
            f"| {mean_std(vals)} |"
        )
    lines += [
        "",
        "Paired per-seed differences NR − control (test accuracy at the final epoch, points):",
        "",
        "| arch | control | per seed | mean ± std |",
        "|---|---|---|---|",
    ]
    for arch, arm in sorted(by):
        diffs = paired(results, arch, arm) if arm != "nr" else {}
        if not diffs:
            continue
        per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in diffs.items())
        d = list(diffs.values())
        spread = f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else ""
        lines.append(f"| {arch} | {arm} | {per_seed} | {statistics.fmean(d):+.2f}{spread} |")
    return "\n".join(lines)


def search_divergence(results: list[dict[str, Any]]) -> list[str]:
    """Slimming runs whose search ended unlike their NR run's (k or U at rejuvenation).

    The slimming control branches from the NR run's last checkpoint of the search (a mid-epoch
    one) and recomputes the steps after it; on another CPU kind than the NR run's they round
    differently, and the search may end elsewhere. Such a pair shares the setting and the
    seed, not the exact search."""
    nr = {(r["arch"], r["seed"]): r for r in results if r["arm"] == "nr"}
    notes = []
    for r in results:
        ref = nr.get((r["arch"], r["seed"]))
        if r["arm"] != "slimming" or ref is None:
            continue
        k, u = r.get("search_epochs"), r.get("utilization_at_rejuvenation")
        ref_k, ref_u = ref.get("search_epochs"), ref.get("utilization_at_rejuvenation")
        if (k, u) != (ref_k, ref_u):
            notes.append(
                f"{r['run']} (CPU {cpu_label(r)}): search k = {k}, U {_fmt(u)}, against "
                f"{ref['run']}'s k = {ref_k}, U {_fmt(ref_u)} (CPU {cpu_label(ref)})"
            )
    return notes


GOAL_SEEDS = 3  # issue 14: three seeds of NR, the epoch-matched baseline and slimming per arch


def paired(results: list[dict[str, Any]], arch: str, control: str) -> dict[int, float]:
    """Per seed, NR's final test accuracy minus the control's, in points (seeds with both)."""
    by = {(r["arm"], r["seed"]): test_accuracies(r)[0] for r in results if r["arch"] == arch}
    return {
        seed: 100 * (acc - by[(control, seed)])
        for (arm, seed), acc in sorted(by.items())
        if arm == "nr" and acc is not None and by.get((control, seed)) is not None
    }


def verdict(results: list[dict[str, Any]], archs: tuple[str, ...] = tuple(eval_table.ARCHS)) -> str:
    """The issue's goal checked on the result files: per architecture, NR's paired gain over the
    epoch-matched baseline positive and larger than its std, and NR ahead of the slimming
    control (mean paired difference > 0), each over at least `GOAL_SEEDS` seeds."""
    lines, met = [], []
    for arch in archs:
        ek = list(paired(results, arch, "baseline_Ek").values())
        slim = list(paired(results, arch, "slimming").values())
        if min(len(ek), len(slim)) < GOAL_SEEDS:
            lines.append(f"- {arch}: pending ({len(ek)} / {len(slim)} of {GOAL_SEEDS} pairs)")
            met.append(None)
            continue
        gain, std, ahead = statistics.fmean(ek), statistics.stdev(ek), statistics.fmean(slim)
        ok = gain > 0 and gain > std and ahead > 0
        met.append(ok)
        lines.append(
            f"- {arch}: NR − epoch-matched {gain:+.2f} ± {std:.2f} points "
            f"({'gain > std' if gain > std else f'gain below its std by {std - gain:.2f}'}), "
            f"NR − slimming {ahead:+.2f} ({'ahead' if ahead > 0 else 'behind'}): "
            f"{'met' if ok else 'missed'}"
        )
    overall = "pending" if None in met else ("met" if all(met) else "missed")
    return f"Goal (issue 14) on the test set's final epoch: **{overall}**\n\n" + "\n".join(lines)


def decomposition(results: list[dict[str, Any]]) -> str:
    """NR's paired gain over the epoch-matched baseline split into its two parts, per seed that
    ran all three arms: NR − slimming (what the new channels and their training add to the
    pruned network) plus slimming − E+k (what the search and the pruning cost or gain against
    plain training for the same epochs). The table's ablation of the method's components."""
    lines = [
        "| arch | seeds | NR − E+k | = NR − slimming (new channels) | + slimming − E+k "
        "(search, pruning) |",
        "|---|---|---|---|---|",
    ]
    for arch in sorted({r["arch"] for r in results}):
        ek, slim = paired(results, arch, "baseline_Ek"), paired(results, arch, "slimming")
        seeds = sorted(set(ek) & set(slim))
        if not seeds:
            continue
        parts = [
            [ek[s] for s in seeds],
            [slim[s] for s in seeds],
            [ek[s] - slim[s] for s in seeds],
        ]
        cells = [
            f"{statistics.fmean(p):+.2f}" + (f" ± {statistics.stdev(p):.2f}" if len(p) > 1 else "")
            for p in parts
        ]
        names = ", ".join(f"s{s}" for s in seeds)
        lines.append(f"| {arch} | {names} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cumulative_macs(result: dict[str, Any]) -> list[float]:
    """Training conv MACs (forward + backward) summed up to the end of each epoch."""
    cost, spe, k = result["cost"], result["steps_per_epoch"], result.get("search_epochs") or 0
    rejuvenated = result.get("rejuvenation") is not None
    total, out = 0.0, []
    for i, _ in enumerate(result["epochs"]):
        after = rejuvenated and i >= k
        total += spe * cost["macs_per_step_after" if after else "macs_per_step_before"]
        out.append(total)
    return out


def arm_curves(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per epoch, over the seeds that ran it: the mean, min and max validation error (%) and the
    mean training compute (MACs), for one architecture's arm."""
    per_epoch = defaultdict(list)  # epoch -> [(error, cumulative MACs)]
    for r in runs:
        for macs, e in zip(cumulative_macs(r), r["epochs"], strict=True):
            if "val_accuracy_sum" in e:
                per_epoch[e["epoch"]].append((100 * (1 - e["val_accuracy_sum"]), macs))
    out = defaultdict(list)
    for epoch, pairs in sorted(per_epoch.items()):
        errors = [err for err, _ in pairs]
        out["epoch"].append(epoch)
        out["mean"].append(statistics.fmean(errors))
        out["min"].append(min(errors))
        out["max"].append(max(errors))
        out["macs"].append(statistics.fmean(m for _, m in pairs))
    return dict(out)


CLIP_POINTS = 12.0  # the error axis shows the best error + this much (the end of training)


def plot_curves(results: list[dict[str, Any]], path: Path) -> Path:
    """Validation error against epochs and against training compute: a row per architecture, a
    line per arm (the mean over its seeds, the band from the lowest to the highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)  # arch -> runs
    for r in results:
        groups[r["arch"]].append(r)
    fig, axes = plt.subplots(
        len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False, sharey="row"
    )
    for (arch, runs), (a, b) in zip(sorted(groups.items()), axes, strict=True):
        arms = defaultdict(list)
        for r in runs:
            arms[r["arm"]].append(r)
        lowest, highest = 100.0, 0.0
        for arm, arm_runs in sorted(arms.items()):
            c = arm_curves(arm_runs)
            style = "-" if arm_runs[0]["config"]["nr"]["enabled"] else "--"
            label = f"{arm} ({len(arm_runs)} seed{'s' if len(arm_runs) > 1 else ''})"
            for ax, x in ((a, c["epoch"]), (b, [m / 1e15 for m in c["macs"]])):
                (line,) = ax.plot(x, c["mean"], style, label=label, lw=1.4)
                if len(arm_runs) > 1:
                    ax.fill_between(x, c["min"], c["max"], color=line.get_color(), alpha=0.15)
            lowest, highest = min(lowest, *c["min"]), max(highest, *c["max"])
        top = min(highest + 1, lowest + CLIP_POINTS)
        clipped = " (axis clipped)" if top < highest else ""
        a.set(xlabel="epoch", ylabel="validation error (%)", title=f"{arch}: by epoch{clipped}")
        b.set(xlabel="training conv MACs (1e15, fwd + bwd)", title=f"{arch}: by training compute")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.set_ylim(max(0.0, lowest - 0.5), top)
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_series(workdir: Path) -> dict[str, list[float]]:
    """λ and utilisation against steps from a run directory's `metrics.jsonl` ({} if absent)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    series = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "train/lambda" in r and "train/utilization" in r:
            series["step"].append(r["step"])
            series["lambda"].append(r["train/lambda"])
            series["utilization"].append(r["train/utilization"])
    return dict(series)


def epoch_series(result: dict[str, Any]) -> dict[str, list[float]]:
    """λ (the epoch's mean) and utilisation at each epoch end from a result file: the coarse
    trace of a run whose directory is gone."""
    series = defaultdict(list)
    for e in result["epochs"]:
        if "train_lambda" in e and "train_utilization" in e:
            series["step"].append(e["step"])
            series["lambda"].append(e["train_lambda"])
            series["utilization"].append(e.get("epoch_utilization", e["train_utilization"]))
    return dict(series)


def plot_steps(results: list[dict[str, Any]], runs_dir: Path, path: Path) -> Path | None:
    """λ and utilisation against steps: every 50 steps for the NR runs whose directories are on
    disk (`metrics.jsonl`), per epoch (from the result file, marked "per epoch") for the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(dict)  # arch -> name -> series
    for r in results:
        if r["config"]["nr"]["enabled"]:
            s = step_series(runs_dir / r["table"] / r["run"])
            if s:
                series[r["arch"]][r["run"]] = s
            elif s := epoch_series(r):
                series[r["arch"]][f"{r['run']} (per epoch)"] = s
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 2, figsize=(12, 4.2 * len(series)), squeeze=False)
    for (arch, named), (a, b) in zip(sorted(series.items()), axes, strict=True):
        for name, s in sorted(named.items()):
            a.plot(s["step"], s["lambda"], label=name, lw=1.0)
            b.plot(s["step"], s["utilization"], label=name, lw=1.0)
        a.set(xlabel="step", ylabel="λ", title=f"{arch}: sparsity coefficient λ (0 after search)")
        b.set(xlabel="step", ylabel="utilisation U (params)", title=f"{arch}: utilisation")
        for ax in (a, b):
            ax.grid(alpha=0.3)
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(table_dir: Path, runs_dir: Path, kind: str) -> Path:
    """Writes `<table_dir>/README.md` and its plots; returns the README's path."""
    results = load_results(table_dir)
    curves = plot_curves(results, table_dir / "validation_curves.png")
    steps = plot_steps(results, runs_dir, table_dir / "lambda_utilization.png")
    fingerprints = sorted({r["fingerprint"] for r in results})
    commits = sorted({str(r.get("commit")) for r in results})
    parts = [
        f"# Table `{table_dir.name}` ({len(results)} finished runs)",
        "",
        "Written by `python -m experiments.eval_report --table "
        f"{table_dir.name}` from the result files beside it; code fingerprint(s) "
        f"{', '.join(fingerprints)}, commit(s) {', '.join(commits)}.",
        "",
        "## Runs (validation split)",
        "",
        sweep_table(results),
        "",
        "k: search epochs; collapse: the largest shortfall of the search's eval-mode validation "
        f"accuracy below the baseline's at the same epoch (collapse above {COLLAPSE_POINTS:g}); "
        "collapse, BN recomputed: the same with NR's BN statistics recomputed before each "
        "evaluation (`val_bn_accuracy_sum`); eval lag: validation accuracy with recomputed BN "
        "statistics minus without, mean over the search.",
        "",
        f"![validation curves]({curves.name})",
    ]
    if steps is not None:
        parts += ["", f"![λ and utilisation]({steps.name})"]
    if kind != "sweep":
        parts += ["", "## Test set (final and best-validation epochs)", "", test_table(results)]
        parts += ["", verdict(results)]
        split = decomposition(results)
        if split:
            parts += [
                "",
                "Where the gain comes from (paired, test accuracy at the final epoch, points; "
                "the two parts add up to the whole):",
                "",
                split,
            ]
        notes = search_divergence(results)
        if notes:
            parts += [
                "",
                "Slimming controls whose search ended unlike their NR run's (each branches from "
                "the NR run's last mid-epoch checkpoint of the search and recomputes the steps "
                "after it; on a CPU kind other than the NR search's they round differently): "
                "such a pair shares the setting and the seed, not the exact search.",
                "",
                *[f"- {n}" for n in notes],
            ]
    path = table_dir / "README.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main(argv: list[str]) -> None:
    del argv
    table_dir = Path(FLAGS.results_dir) / FLAGS.table
    kind = "sweep" if FLAGS.table.startswith("sweep") else "table"
    print(write_report(table_dir, Path(FLAGS.runs_dir), kind))


if __name__ == "__main__":
    cli.run(main)
