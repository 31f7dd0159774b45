"""Section `eval_short`: the evaluation issue's short GPU section (issue 14 item 8).

The VGG NR run (improved preset, cross connections removed) and its epoch-matched baseline on a
fixed short schedule, trained by `nr_jax.train.train_and_evaluate` on the carried Fashion-MNIST
subset (`fmnist_subset`): the evaluation table's base setting (`experiments/configs/eval_table.py`:
width x1.5, λ 1e-3, batch 64, SGD 0.1) with exactly k search epochs (a target no search reaches in
k epochs, so the rejuvenation happens at the search timeout, at the utilisation reached), then E
epochs; the baseline trains E + k epochs with the milestones shifted by k. No validation split
(the subset is not the whole training split the table's permutation is drawn from); test accuracy
on the subset's test images every epoch. The same command on a CPU (`--allow_cpu --only
eval_short`) gives the reference that `--cpu_reference` compares with: accuracy difference per
arm and how many times faster the run was.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections

from experiments.accelerator import fmnist_subset
from experiments.accelerator.deadline import Deadline, SectionTimeout
from experiments.accelerator.settings import Setting
from experiments.configs import eval_table
from nr_jax import train
from nr_jax.callbacks import Callbacks

TITLE = "Short evaluation: NR against the epoch-matched baseline"
ARMS = ("nr", "baseline_Ek")
UNREACHED_TARGET = 0.01  # the search always times out after exactly k epochs


def setting_fields(setting: Setting, subset: dict[str, Any]) -> dict[str, Any]:
    """What must match for two runs to be "the same setting"."""
    return {
        "model": setting.eval_model,
        "width_multiplier": setting.eval_width,
        "batch": setting.eval_batch,
        "E": setting.eval_epochs,
        "k": setting.eval_search_epochs,
        "lr_milestones": list(setting.eval_milestones),
        "lam": setting.eval_lam,
        "train_images": len(subset["train"][1]),
        "test_images": len(subset["test"][1]),
        "data": subset["source"],
    }


def config(setting: Setting, data_dir: str, arm: str) -> ml_collections.ConfigDict:
    """The run config of `arm` ("nr" or "baseline_Ek") on the subset installed in `data_dir`."""
    c = eval_table.base("vgg", seed=0)
    c.model, c.model_kwargs.width_multiplier = setting.eval_model, setting.eval_width
    c.data_dir = data_dir
    c.val_size, c.train_limit, c.test_limit = 0, 0, 0
    c.batch_size, c.eval_batch_size = setting.eval_batch, setting.eval_test_batch
    c.epochs, c.lr_milestones = setting.eval_epochs, tuple(setting.eval_milestones)
    c.nr.lam, c.nr.target = setting.eval_lam, UNREACHED_TARGET
    c.nr.max_search_epochs, c.nr.on_search_timeout = setting.eval_search_epochs, "rejuvenate"
    c.checkpoint, c.tensorboard, c.plots, c.progress = False, False, False, False
    if arm == "baseline_Ek":
        k = setting.eval_search_epochs
        c.nr.enabled = False
        c.epochs = setting.eval_epochs + k
        c.lr_milestones = tuple(m + k for m in setting.eval_milestones)
    elif arm != "nr":
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return c


def epochs(workdir: str) -> list[dict[str, Any]]:
    """The epoch records of a run directory's `metrics.jsonl` (epoch, test accuracy, phase)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "epoch/epoch" in r:
                out.append(
                    {
                        "epoch": r["epoch/epoch"],
                        "test_accuracy": r.get("epoch/test_accuracy_sum"),
                        "phase": r.get("epoch/phase"),
                    }
                )
    return out


def _train(c: ml_collections.ConfigDict, workdir: str, deadline: Deadline) -> dict[str, Any]:
    """One run; at the deadline it stops after the current step."""
    stop = Callbacks(on_train_step=lambda step: deadline.check(f"step {step + 1}"))
    s = train.train_and_evaluate(c, workdir, callbacks=stop)
    return {
        "final_test_accuracy": s["final_test_accuracy"],
        "epochs_run": s["epochs_run"],
        "search_epochs": s["search_epochs"],
        "rejuvenated": "rejuvenation_epoch" in s,
        "utilization_at_rejuvenation": s.get("utilization_at_rejuvenation"),
        "params": s["counts"]["total"],
        "traces": s["traces"],
        "wall_s": s["wall_time_s"],
    }


def run(
    setting: Setting,
    deadline: Deadline,
    result: dict[str, Any],
    *,
    subset_path: str | None,
    cpu_reference: dict[str, Any] | None = None,
) -> None:
    """Trains both arms on the first `setting.eval_images` images of the subset (synthetic
    images when `subset_path` is None)."""
    n_train, n_test = setting.eval_images
    if subset_path is None:
        train_split, test_split = fmnist_subset.synthetic_subset(n_train, n_test)
        subset = {"train": train_split, "test": test_split, "source": "synthetic"}
    else:
        subset = fmnist_subset.read_subset(subset_path)
        for split, n in (("train", n_train), ("test", n_test)):
            subset[split] = tuple(a[:n] for a in subset[split])
    result["setting"] = setting_fields(setting, subset)
    with tempfile.TemporaryDirectory(prefix="nr_jax_eval_short_") as tmp:
        data_dir = fmnist_subset.install_as_cache(subset, os.path.join(tmp, "data"))
        for arm in ARMS:
            deadline.check(arm)
            workdir = os.path.join(tmp, arm)
            try:
                result[arm] = _train(config(setting, data_dir, arm), workdir, deadline)
            except SectionTimeout:
                result[arm] = {"finished": False}
                raise
            finally:
                result.setdefault(arm, {"finished": False})["epochs"] = epochs(workdir)
    nr, base = result["nr"]["final_test_accuracy"], result["baseline_Ek"]["final_test_accuracy"]
    result["nr_minus_baseline"] = nr - base
    if cpu_reference is not None:
        result["cpu_reference"] = compare(result, cpu_reference)


def compare(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """This run against a reference run's `eval_short` result (another device)."""
    out: dict[str, Any] = {
        "same_setting": reference.get("setting") == result["setting"],
        "device": reference.get("device"),
    }
    for arm in ARMS:
        mine, ref = result.get(arm, {}), reference.get(arm, {})
        if "final_test_accuracy" in mine and "final_test_accuracy" in ref:
            out[arm] = {
                "reference_test_accuracy": ref["final_test_accuracy"],
                "accuracy_difference": mine["final_test_accuracy"] - ref["final_test_accuracy"],
                "reference_wall_s": ref["wall_s"],
                "speedup": ref["wall_s"] / mine["wall_s"],
            }
    return out


def summary(result: dict[str, Any]) -> str:
    parts = []
    for arm in ARMS:
        r = result.get(arm, {})
        if "final_test_accuracy" in r:
            parts.append(f"{arm} {100 * r['final_test_accuracy']:.2f}% in {r['wall_s']:.0f} s")
    if "nr_minus_baseline" in result:
        parts.append(f"NR - baseline {100 * result['nr_minus_baseline']:+.2f} points")
    ref = result.get("cpu_reference")
    if ref and "nr" in ref:
        parts.append(
            f"vs CPU: {ref['nr']['speedup']:.1f}x faster, NR "
            f"{100 * ref['nr']['accuracy_difference']:+.2f} points"
        )
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> list[str]:
    s = result["setting"]
    ref = result.get("cpu_reference") or {}
    lines = [
        f"{s['model']} x{s['width_multiplier']}, batch {s['batch']}, λ {s['lam']}, k = {s['k']} "
        f"search epochs then E = {s['E']} (milestones {s['lr_milestones']}); baseline E + k; "
        f"{s['train_images']:,} training and {s['test_images']:,} test images ({s['data']}).",
        "",
        "| arm | epochs | rejuvenated (U) | final test accuracy | wall s | CPU reference "
        "accuracy | difference | times faster |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = result.get(arm)
        if not r or "final_test_accuracy" not in r:
            continue
        u = r.get("utilization_at_rejuvenation")
        rej = f"yes ({u:.3f})" if r["rejuvenated"] else "no"
        c = ref.get(arm)
        cpu = (
            f"{100 * c['reference_test_accuracy']:.2f}% | "
            f"{100 * c['accuracy_difference']:+.2f} | {c['speedup']:.1f}x"
            if c
            else "- | - | -"
        )
        lines.append(
            f"| {arm} | {r['epochs_run']} | {rej} | {100 * r['final_test_accuracy']:.2f}% | "
            f"{r['wall_s']:.1f} | {cpu} |"
        )
    if ref and not ref.get("same_setting"):
        lines += ["", "The CPU reference was run with another setting: not comparable."]
    return lines
