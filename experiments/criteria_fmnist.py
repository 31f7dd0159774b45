"""Pluggable liveness on real Fashion-MNIST, through the trainer (issue 16 item 1).

Every arm is an NR run of `nr_jax.train.train_and_evaluate` with the arm's liveness criterion and
sparsity pressure (`nr.criterion`, `nr.pressure`), next to its epoch-matched baseline: the same
network with `nr.enabled = False`, trained for as many epochs as the NR run took (its k search
epochs plus the E post epochs) with the same learning-rate schedule (the milestones moved by k).
A validation split (`--val_size` images held out of the training split) is evaluated every
epoch, the test set at the final and best-validation epochs (`config.val_size`).

    # the MLP arms are cheap (~5 ms a step): all 55,000 training images, ~10 min per arm
    python -m experiments.criteria_fmnist --arms mlp,mlp_lasso --train_limit 0 \
        --search_epochs 10 --epochs 20
    # the CNN is not (~0.35 s a step on 2 shared cores): ~20-25 min for NR + baseline
    python -m experiments.criteria_fmnist --arms nobn --train_limit 8000 --val_size 2000 \
        --search_epochs 6 --epochs 6

Arms (SGD, momentum 0.9, weight decay 1e-4, batch 64; widths by `round8`, the budget matched;
the target U 0.5, `--target`; the search gives up after `--search_epochs` and rejuvenates at
the U reached; untuned):

* `nobn`: `cnn_nobn_fmnist` (VGG without normalisation), "outgoing" under the group lasso
  (λ 1e-2, lr 0.01: without normalisation a higher LR kills the ReLUs);
* `mlp`: `mlp_fmnist`, "dormancy" (ReDo τ 0.1, `--tau`, over `nr.activity_images` = 512
  training images at each epoch end), no pressure (λ 0, lr 0.05): ordinary training's dormancy;
* `mlp_lasso`: `mlp_fmnist`, "outgoing" under the group lasso (λ 1e-2, lr 0.05).

Each run writes `<results_dir>/<arm>_<nr|baseline>_s<seed>.json` (its settings and config,
per-epoch validation accuracy and utilisation, the summary). A run whose result exists is
skipped (one made with other settings is refused: use another `--results_dir`); an interrupted
run resumes from its checkpoints in `<workdir>/<arm>_<kind>_s<seed>_<settings>`. Each NR arm
also gets `<arm>_s<seed>_utilization.png`: utilisation over training, the target, the
rejuvenation. The per-epoch `utilization` is the mean of the step metric (for "dormancy" the
training batches' own activity), `epoch_utilization` the epoch-end figure the decision read
(search epochs only); baselines have neither.

The GroupNorm / LayerNorm arms `gn` (`cnn_gn_fmnist`, "norm", L1 on the scales) and `ln` (the
CNN with LayerNorm) measure what dropping the dead channels does to the survivors
(`nr_jax.criteria.survivor_shift`, on 256 test images) at the moment NR would rejuvenate:
`survivor_shift_arm` runs the trainer's own steps (same optimiser and criterion) for up to
`--search_epochs` epochs, until U <= the target, and writes `<arm>_shift_s<seed>.json` (no
baseline, no post epochs). The figures of experiments/README.md
(`results/criteria_fmnist_shift.json`) came from the former own-loop version of this script (5,000
training images, 8 search epochs, about 10 minutes per arm on a shared 2-core CPU; now
`--arms gn,ln --train_limit 5000 --search_epochs 8`).

A tiny check that everything runs (about 5 minutes on 2 shared cores):

    python -m experiments.criteria_fmnist --train_limit 512 --epochs 2 --search_epochs 1 \
        --val_size 500 --workdir /tmp/criteria_tiny --results_dir /tmp/criteria_tiny/results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import jax
import numpy as np

ARMS: dict[str, dict[str, Any]] = {
    "nobn": {
        "model": "cnn_nobn_fmnist",
        "criterion": "outgoing",
        "pressure": "group_lasso",
        "lam": 1e-2,
        "lr": 0.01,
    },
    "mlp": {"model": "mlp_fmnist", "criterion": "dormancy", "pressure": "none", "lam": 0.0},
    "mlp_lasso": {
        "model": "mlp_fmnist",
        "criterion": "outgoing",
        "pressure": "group_lasso",
        "lam": 1e-2,
    },
}
SHIFT_ARMS: dict[str, dict[str, Any]] = {
    "gn": {"model": "cnn_gn_fmnist", "criterion": "norm", "pressure": "l1", "lam": 1e-2},
    "ln": {
        "model": "cnn_nobn_fmnist",
        "kwargs": {"norm": "layer"},
        "criterion": "norm",
        "pressure": "l1",
        "lam": 1e-2,
    },
}
DEFAULT_LR = 0.05

RUN_ARGS = ("train_limit", "val_size", "epochs", "search_epochs", "target", "tau", "seed")

log = logging.getLogger("criteria_fmnist")


def stored(path: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The result at `path` (None if there is none); refuses one made with other settings."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    asked = {k: getattr(args, k) for k in RUN_ARGS}
    if result.get("args") != asked:
        raise SystemExit(
            f"{path} was made with {result.get('args')}, not {asked}: use another --results_dir "
            "(and --workdir)"
        )
    log.info("%s exists: skipped", path)
    return result


def arm_config(arm: dict[str, Any], args: argparse.Namespace, nr: bool, search: int = 0) -> Any:
    """The run's config: the arm's model, criterion, pressure, λ and LR on Fashion-MNIST.

    `nr` False: the baseline, trained `search + args.epochs` epochs (the NR run's k search
    epochs plus its post epochs) with the milestones moved by `search`.
    """
    from nr_jax.config import base_config

    c = base_config()
    c.model = arm["model"]
    c.model_kwargs.update(arm.get("kwargs", {}))
    c.seed, c.val_size, c.train_limit = args.seed, args.val_size, args.train_limit
    c.batch_size, c.eval_batch_size, c.lr = 64, 500, arm.get("lr", DEFAULT_LR)
    c.epochs = args.epochs
    milestones = sorted({args.epochs // 2, (3 * args.epochs) // 4} - {0})
    c.lr_milestones = tuple(milestones)
    c.nr.criterion, c.nr.pressure, c.nr.lam = arm["criterion"], arm["pressure"], arm["lam"]
    c.nr.target, c.nr.max_search_epochs = args.target, args.search_epochs
    c.nr.dormancy_tau, c.nr.allocation = args.tau, "round8"
    c.progress, c.tensorboard, c.plots = False, False, False
    if not nr:
        c.nr.enabled = False
        c.epochs = search + args.epochs
        c.lr_milestones = tuple(m + search for m in milestones)
    return c


def epoch_records(workdir: str) -> list[dict[str, Any]]:
    """The run's epoch records from its `metrics.jsonl` (the last one of each epoch: a resumed
    run may repeat some), "epoch/" dropped from the keys."""
    by_epoch: dict[int, dict[str, Any]] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "epoch/epoch" in r:
                by_epoch[r["epoch/epoch"]] = {
                    k[len("epoch/") :]: v for k, v in r.items() if k != "step"
                }
    return [by_epoch[e] for e in sorted(by_epoch)]


def step_utilization(workdir: str) -> list[tuple[int, float]]:
    """(step, utilisation) of the logged step windows (`train/utilization`)."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "train/utilization" in r:
                out.append((r["step"], r["train/utilization"]))
    return out


def run(name: str, kind: str, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One trainer run, or its stored result; writes `<arm>_<kind>_s<seed>.json`."""
    path = os.path.join(args.results_dir, f"{name}_{kind}_s{args.seed}.json")
    if (result := stored(path, args)) is not None:
        return result
    from nr_jax import train

    tag = f"n{args.train_limit}_v{args.val_size}_k{args.search_epochs}_e{args.epochs}"
    workdir = os.path.join(args.workdir, f"{name}_{kind}_s{args.seed}_{tag}")  # one per setting
    summary = train.train_and_evaluate(config, workdir)
    keys = ("epoch", "phase", "val_accuracy_sum", "utilization", "epoch_utilization")
    epochs = []
    for r in epoch_records(workdir):
        entry = {k: r.get(k) for k in keys}
        entry["utilization"] = r.get("train_utilization")
        entry["rejuvenated"] = bool(r.get("rejuvenated", False))
        epochs.append(entry)
    result = {
        "arm": name,
        "kind": kind,
        "args": {k: getattr(args, k) for k in RUN_ARGS},
        "config": json.loads(config.to_json_best_effort()),
        "epochs": epochs,
        "steps_utilization": step_utilization(workdir),
        "summary": {k: v for k, v in summary.items() if k != "plots"},
    }
    os.makedirs(args.results_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def plot_utilization(name: str, result: dict[str, Any], args: argparse.Namespace) -> str:
    """Utilisation over training of an NR run (step windows and epoch ends), target and
    rejuvenation marked; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps_utilization"]
    per_epoch = (steps[-1][0] if steps else 1) / max(len(result["epochs"]), 1)  # steps/epoch
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if steps:
        ax.plot([s / per_epoch for s, _ in steps], [u for _, u in steps], lw=1, label="steps")
    ends = [(e["epoch"], e["epoch_utilization"]) for e in result["epochs"]]
    ends = [(e, u) for e, u in ends if u is not None]
    if ends:
        ax.plot(*zip(*ends, strict=True), "o", label="epoch end (decision)")
    ax.axhline(result["config"]["nr"]["target"], color="k", ls=":", lw=1, label="target")
    for e in result["epochs"]:
        if e["rejuvenated"]:
            ax.axvline(e["epoch"], color="r", ls="--", lw=1, label="rejuvenation")
    cfg = result["config"]["nr"]
    ax.set_title(f"{name}: {result['config']['model']}, {cfg['criterion']} / {cfg['pressure']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("utilisation")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    path = os.path.join(args.results_dir, f"{name}_s{args.seed}_utilization.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trainer_arm(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The NR run of an arm, then its epoch-matched baseline, then the utilisation plot."""
    arm = ARMS[name]
    nr = run(name, "nr", arm_config(arm, args, nr=True), args)
    k = nr["summary"]["search_epochs"]
    base = run(name, "baseline", arm_config(arm, args, nr=False, search=k), args)
    plot = plot_utilization(name, nr, args)
    for kind, r in (("nr", nr), ("baseline", base)):
        s = r["summary"]
        best = s.get("best_validation", {})
        log.info(
            "%s %s: %d epochs (k %d), U at rejuvenation %s, best val %.4f, final test %s",
            *(name, kind, s["epochs_run"], s["search_epochs"]),
            *(s.get("utilization_at_rejuvenation"), best.get("val_accuracy_sum", float("nan"))),
            s.get("final_test_accuracy"),
        )
    return {"nr": nr, "baseline": base, "plot": plot}


def survivor_shift_arm(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The survivors' change when the dead channels are dropped, at the moment NR would
    rejuvenate (U <= target, or the last search epoch): the trainer's steps, optimiser and
    criterion, `nr_jax.criteria.survivor_shift` on 256 test images."""
    from nr_jax import criteria, train, utilization
    from nr_jax import data as nr_data
    from nr_jax.run_liveness import measure

    path = os.path.join(args.results_dir, f"{name}_shift_s{args.seed}.json")
    if (result := stored(path, args)) is not None:
        return result
    config = arm_config(SHIFT_ARMS[name], args, nr=True)
    trainer = train.Trainer(config, workdir="")
    data = nr_data.RunData(config, trainer.info)
    trainer.use_data(data.steps_per_epoch, data.first_images(config.nr.activity_images))
    shape = trainer.info.image_shape
    state = train.init_state(trainer.model, trainer.tx, config, shape, jax.random.key(args.seed))
    x = next(iter(data.test_batches()))["image"][:256]
    epochs = []
    for epoch in range(args.search_epochs):
        for batch in data.train_iterator(epoch):
            state, _ = trainer.steps.train(state, batch)
        variables = jax.device_get(state.variables)
        live = measure(trainer.criterion, variables, trainer.graph, trainer.model)
        util = float(utilization(live, trainer.graph, config.nr.resource).ratio)
        epochs.append({"epoch": epoch + 1, "utilization": util})
        log.info("%s shift: epoch %d, U %.4f", name, epoch + 1, util)
        if util <= config.nr.target:
            break
    shift = criteria.survivor_shift(trainer.model, variables, trainer.graph, np.asarray(x), live)
    result = {
        "arm": name,
        "args": {k: getattr(args, k) for k in RUN_ARGS},
        "config": json.loads(config.to_json_best_effort()),
        "epochs": epochs,
        "survivor_shift": shift.relative,
        "survivor_shift_abs": {**shift.units, "logits": shift.logits},
    }
    os.makedirs(args.results_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/criteria_fmnist", help="run directories")
    p.add_argument("--results_dir", default="experiments/results/criteria_fmnist")
    p.add_argument("--arms", default=",".join(ARMS), help=f"of {[*ARMS, *SHIFT_ARMS]}")
    p.add_argument("--train_limit", type=int, default=10000, help="training images (0 = all)")
    p.add_argument("--val_size", type=int, default=5000, help="held-out validation images")
    p.add_argument("--epochs", type=int, default=6, help="epochs after the search (E)")
    p.add_argument("--search_epochs", type=int, default=6, help="at most, then rejuvenate")
    p.add_argument("--target", type=float, default=0.5, help="utilisation target")
    p.add_argument("--tau", type=float, default=0.1, help="ReDo τ of the dormancy criterion")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = args.arms.split(",")
    unknown = [n for n in names if n not in ARMS and n not in SHIFT_ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {[*ARMS, *SHIFT_ARMS]}")
    for name in names:
        if name in ARMS:
            trainer_arm(name, args)
        else:
            survivor_shift_arm(name, args)


if __name__ == "__main__":
    main()
