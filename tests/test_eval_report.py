"""The evaluation's tables and plots (`experiments.eval_report`) on hand-made result files."""

import json
import subprocess
import sys
from pathlib import Path

from experiments import eval_report

ROOT = Path(__file__).resolve().parents[1]


def result(arch, arm, seed, final, best, nr=True, k=2, width=1.5):
    epochs = []
    for e in range(1, 6):
        rec = {"epoch": e, "step": 10 * e, "val_accuracy_sum": 0.80 + e / 100, "val_loss": 0.5}
        if nr and e <= k:
            rec["val_accuracy_sum"] -= 0.10 * (k - e + 1) / k  # the search costs accuracy
            rec["val_bn_accuracy_sum"] = rec["val_accuracy_sum"] + 0.02
        epochs.append(rec)
    epochs[-1]["test_accuracy_sum"] = final
    return {
        "table": "t",
        "run": f"{arch}_{arm}_s{seed}",
        "arch": arch,
        "arm": arm,
        "seed": seed,
        "fingerprint": "fp",
        "commit": "abc",
        "config": {"nr": {"enabled": nr}, "model_kwargs": {"width_multiplier": width}},
        "epochs": epochs,
        "final": {"epoch": 5, "test_accuracy_sum": final},
        "best_validation": {"epoch": 5, "val_accuracy_sum": 0.85, "test_accuracy_sum": best},
        "epochs_run": 5,
        "search_epochs": k if nr else 0,
        "steps_per_epoch": 10,
        "cost": {"macs_per_step_before": 100.0, "macs_per_step_after": 60.0, "train_macs": 1e3},
        "utilization_at_rejuvenation": 0.48 if nr else None,
        "rejuvenation": {"r": 1.4} if nr else None,
    }


def test_collapse_eval_lag_and_compute():
    nr, base = result("vgg", "nr", 0, 0.9, 0.9), result("vgg", "b", 0, 0.9, 0.9, nr=False)
    assert abs(eval_report.collapse(nr, base) - 10.0) < 1e-9  # 10 points below at epoch 1
    bn = eval_report.collapse(nr, base, "val_bn_accuracy_sum")  # recomputed BN statistics
    assert abs(bn - 8.0) < 1e-9
    assert abs(eval_report.eval_lag(nr) - 2.0) < 1e-9
    assert eval_report.cumulative_macs(nr) == [1000.0, 2000.0, 2600.0, 3200.0, 3800.0]
    assert eval_report.cumulative_macs(base) == [1000.0 * e for e in range(1, 6)]


def test_paired_differences_and_spread():
    results = [result("vgg", "nr", s, 0.90 + s / 100, 0.9) for s in range(3)]
    results += [result("vgg", "baseline_Ek", s, 0.89, 0.89, nr=False) for s in range(3)]
    table = eval_report.test_table(results)
    assert "| vgg | nr | 91.00 ± 1.00 (n=3)" in table
    assert "s0: +1.00, s1: +2.00, s2: +3.00 | +2.00 ± 1.00 |" in table


def test_the_command_writes_tables_and_plots(tmp_path):
    table = tmp_path / "sweep"
    table.mkdir()
    for r in (result("vgg", "sweep:base", 0, 0.9, 0.9), result("vgg", "sweep:b", 0, 0, 0, False)):
        (table / f"{r['run']}.json").write_text(json.dumps(r))
    cmd = [sys.executable, "-m", "experiments.eval_report", "--table=sweep"]
    args = [f"--results_dir={tmp_path}", f"--runs_dir={tmp_path / 'none'}"]
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    readme = (table / "README.md").read_text()
    assert "vgg_sweep:base_s0" in readme and "Test set" not in readme  # the sweep: no test
    assert (table / "validation_curves.png").stat().st_size > 10_000
    missing = subprocess.run(
        [sys.executable, "-m", "experiments.eval_report", "--table=nope", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: ")


def test_epoch_series_traces_runs_without_a_directory():
    r = result("vgg", "nr", 0, 0.9, 0.9)
    for e in r["epochs"]:
        e.update(train_lambda=1e-3 if e["epoch"] <= 2 else 0.0, train_utilization=1.0)
    r["epochs"][0]["epoch_utilization"] = 0.7
    s = eval_report.epoch_series(r)
    assert s["step"] == [10, 20, 30, 40, 50] and s["lambda"][:3] == [1e-3, 1e-3, 0.0]
    assert s["utilization"][:2] == [0.7, 1.0]  # the epoch end's U where recorded


def test_the_collapse_reference_is_the_same_seeds_baseline():
    bases = [result("vgg", "baseline_Ek", s, 0.9, 0.9, nr=False) for s in (0, 1)]
    nr1 = result("vgg", "nr", 1, 0.9, 0.9)
    assert eval_report.sweep_baseline([*bases, nr1], nr1)["seed"] == 1
    sweep_nr = result("vgg", "sweep:lam", 2, 0.9, 0.9)  # no baseline of its seed: any one
    assert eval_report.sweep_baseline([bases[0], sweep_nr], sweep_nr)["seed"] == 0


def test_the_verdict_and_the_search_divergence_note():
    results = [result("vgg", "nr", s, 0.90 + s / 1000, 0.9) for s in range(3)]
    results += [result("vgg", "baseline_Ek", s, 0.899, 0.9, nr=False) for s in range(3)]
    results += [result("vgg", "slimming", s, 0.89, 0.9) for s in range(3)]
    vgg_only = eval_report.verdict(results, archs=("vgg",))
    assert "**met**" in vgg_only and "+0.20 ± 0.10 points (gain > std)" in vgg_only
    assert "**pending**" in eval_report.verdict(results)  # no ResNet pairs yet
    results[3]["final"]["test_accuracy_sum"] = 0.9015  # s0's gain falls below the spread
    assert "**missed**" in eval_report.verdict(results, archs=("vgg",))
    assert eval_report.search_divergence(results) == []  # slimming shares the NR search
    results[6]["search_epochs"] = 3
    results[6]["machine"] = {"cpu": "Intel(R) Xeon(R) Processor"}
    results[6]["machine_at_start"] = {"cpu": "AMD EPYC"}
    (note,) = eval_report.search_divergence(results)
    assert note.startswith("vgg_slimming_s0 (CPU AMD EPYC → Intel Xeon): search k = 3")


def test_arm_curves_average_the_seeds_that_ran_each_epoch():
    a, b = result("vgg", "nr", 0, 0.9, 0.9), result("vgg", "nr", 1, 0.9, 0.9)
    b["epochs"][0]["val_accuracy_sum"] = 0.50  # seed 1's first epoch: 50% error
    del b["epochs"][-1]  # seed 1 ran one epoch fewer
    c = eval_report.arm_curves([a, b])
    assert c["epoch"] == [1, 2, 3, 4, 5]
    assert abs(c["max"][0] - 50.0) < 1e-9 and abs(c["min"][0] - 100 * (1 - 0.71)) < 1e-9
    assert abs(c["mean"][-1] - 100 * (1 - 0.85)) < 1e-9  # epoch 5: seed 0 alone


def test_the_decomposition_adds_up_to_the_epoch_matched_gain():
    results = [result("vgg", "nr", s, 0.91 + s / 100, 0.9) for s in range(2)]
    results += [result("vgg", "baseline_Ek", s, 0.90, 0.9, nr=False) for s in range(2)]
    results += [result("vgg", "slimming", s, 0.895, 0.9) for s in range(3)]  # s2: no NR pair
    (row,) = [line for line in eval_report.decomposition(results).splitlines() if "| vgg" in line]
    assert row == "| vgg | s0, s1 | +1.50 ± 0.71 | +2.00 ± 0.71 | -0.50 ± 0.00 |"
    assert eval_report.decomposition(results[:2]) == ""  # no pairs: no table
