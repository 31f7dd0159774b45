"""Pluggable liveness on real Fashion-MNIST (issue 16 item 1), in a loop of its own.

Until the trainer takes a criterion and a pressure from the config (the proposed `nr.criterion`
and `nr.pressure`), this script runs each arm with its own jitted SGD loop on a subset of
Fashion-MNIST: a search under the arm's pressure, liveness by the arm's criterion after every
epoch, the rejuvenation when U <= target (or after the last search epoch, at the U reached),
then epochs with λ = 0; next to it the same network trained as long without NR. At the moment of
rejuvenation it measures how much the survivors' outputs change when the dead channels are
dropped (`nr_jax.criteria.survivor_shift`, on test images): zero for BatchNorm and for units
without normalisation, not for GroupNorm / LayerNorm.

    python -m experiments.criteria_fmnist --out experiments/results/criteria_fmnist.json

Arms (SGD 0.05, momentum 0.9, weight decay 1e-4; λ per arm below): bn (vgg_fmnist, L1 on BN γ,
the official rule), gn (cnn_gn_fmnist, L1 on GroupNorm
scales, "norm"), ln (the same CNN with LayerNorm), nobn (cnn_nobn_fmnist, group lasso on
outgoing weights, "outgoing"), mlp (mlp_fmnist, no pressure, "dormancy"), mlp_lasso
(mlp_fmnist, group lasso, "outgoing"). Widths by the budget-matching rule (round8).

Run so far (results/criteria_fmnist_shift.json, the survivor-shift figures of
experiments/README.md): `--arms gn,ln --train 5000 --test 1000 --search_epochs 8 --epochs 1
--no_baseline`, about 10 minutes per arm on a shared 2-core CPU. The other arms and the
baselines are untuned: the full comparison is for the trainer, once it takes `nr.criterion`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nr_jax
from nr_jax import criteria, data, sparsity

ARMS: dict[str, dict[str, Any]] = {
    "bn": {"model": "vgg_fmnist", "criterion": "bn", "pressure": "l1", "lam": 1e-2},
    "gn": {"model": "cnn_gn_fmnist", "criterion": "norm", "pressure": "l1", "lam": 1e-2},
    "ln": {
        "model": "cnn_nobn_fmnist",
        "kwargs": {"norm": "layer"},
        "criterion": "norm",
        "pressure": "l1",
        "lam": 1e-2,
    },
    "nobn": {  # without normalisation SGD at 0.05 kills the ReLUs: a lower LR
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


def make_step(model: Any, tx: optax.GradientTransformation) -> Any:
    """One jitted SGD step of this width configuration."""

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(params):
            out, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return nr_jax.nr_loss(out, y), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, **upd, "params": params}, opt_state, loss

    return step


def accuracy(model: Any, variables: Any, x: np.ndarray, y: np.ndarray) -> float:
    apply = jax.jit(lambda v, x: nr_jax.predict(model.apply(v, x, train=False)))
    hits = sum(
        int(jnp.sum(jnp.argmax(apply(variables, x[i : i + 500]), -1) == y[i : i + 500]))
        for i in range(0, len(x), 500)
    )
    return hits / len(x)


def liveness(rule: Any, model: Any, variables: Any, graph: Any, probe: np.ndarray) -> Any:
    host = jax.device_get(variables)
    act = criteria.activity(model, host, probe) if rule.needs_activity else None
    return jax.device_get(rule(host, graph, act))


def run_arm(name: str, arm: dict, d: dict, args: argparse.Namespace, nr: bool) -> dict:
    """One run: NR (search, rejuvenation, post epochs) or the same network without NR."""
    model = nr_jax.models.get(arm["model"], num_classes=10, **arm.get("kwargs", {}))
    x, y = d["x"], d["y"]
    graph = nr_jax.channel_graph(model, (1, *x.shape[1:]))
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x[:1])
    lam = arm["lam"] if nr else 0.0
    pressure = sparsity.resolve(arm["pressure"], graph, lam) if nr else sparsity.no_pressure()
    sgd = optax.sgd(arm.get("lr", 0.05), momentum=0.9)
    tx = optax.chain(pressure, optax.add_decayed_weights(1e-4), sgd)
    opt_state = tx.init(variables["params"])
    rule = criteria.resolve(arm["criterion"], tau=args.tau)
    step, rng = make_step(model, tx), np.random.default_rng(0)
    log, event = [], None
    total = args.search_epochs + args.epochs  # the baseline trains as long as the NR run may
    search_left = args.search_epochs if nr else 0
    for epoch in range(total):
        t0 = time.time()
        order = rng.permutation(len(x))
        for i in range(len(x) // args.batch):
            b = order[i * args.batch : (i + 1) * args.batch]
            variables, opt_state, loss = step(variables, opt_state, x[b], y[b])
        entry = {"epoch": epoch + 1, "loss": float(loss), "seconds": time.time() - t0}
        if not graph.rejuvenated:
            live = liveness(rule, model, variables, graph, d["probe"])
            entry["utilization"] = float(nr_jax.utilization(live, graph).ratio)
        if nr and not graph.rejuvenated and search_left > 0:
            search_left -= 1
            if entry["utilization"] <= args.target or search_left == 0:
                shift = criteria.survivor_shift(model, variables, graph, d["xt"][:256], live)
                res = nr_jax.rejuvenate(
                    jax.random.key(1),
                    model,
                    jax.device_get(variables),
                    jax.device_get(opt_state),
                    tx,
                    graph,
                    live=live,
                    allocation=nr_jax.rounded_allocation(8),
                )
                model, variables, graph = res.model, res.variables, res.graph
                opt_state = nr_jax.set_lambda(res.opt_state, 0.0)
                step = make_step(model, tx)
                event = {
                    "epoch": epoch + 1,
                    "utilization": entry["utilization"],
                    "r": res.report.r,
                    "widths_before": res.report.widths_before,
                    "widths_after": res.report.widths_after,
                    "survivor_shift": shift.relative,
                    "survivor_shift_abs": {**shift.units, "logits": shift.logits},
                }
                entry["rejuvenated"] = True
        entry["test_accuracy"] = accuracy(model, variables, d["xt"], d["yt"])
        log.append(entry)
        print(name, "nr" if nr else "base", json.dumps(entry), flush=True)
    return {"log": log, "rejuvenation": event, "final_test_accuracy": log[-1]["test_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/criteria_fmnist.json")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--search_epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--no_baseline", action="store_true")
    args = p.parse_args()
    info = data.DATASET_INFO["fashion_mnist"]
    images, labels = data.load_arrays("fashion_mnist", "train", limit=args.train)
    test_images, test_labels = data.load_arrays("fashion_mnist", "test", limit=args.test)
    d = {
        "x": data.normalize(images, info),
        "y": labels,
        "xt": data.normalize(test_images, info),
        "yt": test_labels,
    }
    d["probe"] = d["x"][:512]
    results = {"args": vars(args), "arms": {}}
    for name in args.arms.split(","):
        arm = ARMS[name]
        results["arms"][name] = {"arm": arm, "nr": run_arm(name, arm, d, args, nr=True)}
        if not args.no_baseline:
            results["arms"][name]["baseline"] = run_arm(name, arm, d, args, nr=False)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
