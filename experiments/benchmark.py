"""Performance figures of nr_jax, measured side by side in one process (medians of interleaved
repetitions). Writes `benchmark.json` and `benchmark.md` into --out.

    python -m experiments.benchmark --out runs/benchmark            # quick CPU setting
    python -m experiments.benchmark --out runs/benchmark --full     # more repetitions

1. watching overhead: the NR train step (L1 transform + in-jit liveness/utilisation + masks)
   against the same model without NR, and against a plain Flax model of the same shapes;
2. compilations of the train/eval steps in a short run with one rejuvenation;
3. rejuvenation latency (variables + optimiser-state surgery + new graph) of full-size ResNet-50
   and DenseNet-121, no compilation involved;
4. post-rejuvenation cost: step time of the rejuvenated network with cross connections removed
   (two convolutions) and with cross-attention, against the dense network of the same allocated
   widths;
5. efficiency: achieved FLOP/s of the train step (XLA cost analysis) against a measured matmul peak;
6. input pipeline throughput against the train step's consumption.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import nr_jax
from nr_jax import data as nr_data
from nr_jax import train
from nr_jax.config import base_config

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/benchmark", "Output directory.")
flags.DEFINE_boolean("full", False, "More repetitions (slower, steadier).")
flags.DEFINE_integer("batch", 64, "Batch size of the step benchmarks.")


def _time_steps(fn: Any, state: Any, batch: dict, steps: int) -> tuple[Any, float]:
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t) / steps


def interleaved(candidates: dict[str, tuple[Any, Any]], batch: dict, reps: int, steps: int):
    """Median seconds per step of each (step_fn, state), repetitions interleaved."""
    states = {k: v[1] for k, v in candidates.items()}
    for k, (fn, _) in candidates.items():  # compile + warm up
        states[k], _ = _time_steps(fn, states[k], batch, 2)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for k, (fn, _) in candidates.items():
            states[k], dt = _time_steps(fn, states[k], batch, steps)
            times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def _batch(n: int, hw: int = 28, c: int = 1, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


def _trainer(model: str, nr: bool = True, scheme: str = "removed") -> tuple[Any, Any]:
    c = base_config()
    c.model, c.batch_size = model, FLAGS.batch
    c.nr.enabled, c.nr.scheme = nr, scheme
    trainer = train.Trainer(c, "")
    state = train.init_state(trainer.model, trainer.tx, c, (28, 28, 1), jax.random.key(0))
    return trainer, state


class PlainVGG(nn.Module):
    """A plain Flax VGG with the shapes of `vgg_fmnist` (no masks, no NR)."""

    cfg: tuple = (16, 16, "M", 32, 32, "M", 64, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(v, (3, 3), padding=1, use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def plain_step(batch: dict) -> tuple[Any, Any]:
    model = PlainVGG()
    variables = jax.jit(lambda k: model.init(k, batch["image"][:1], train=False))(jax.random.key(0))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = (variables, tx.init(variables["params"]))

    @jax.jit
    def step(state: Any, batch: dict) -> tuple[Any, Any]:
        variables, opt_state = state

        def loss_fn(params: Any) -> Any:
            out, upd = model.apply(
                {**variables, "params": params}, batch["image"], mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
            return loss, upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return ({**variables, **upd, "params": params}, opt_state), {"loss": loss}

    return step, state


def watching_overhead(reps: int, steps: int) -> dict:
    batch = _batch(FLAGS.batch)
    out = {}
    for model in ("vgg_fmnist", "resnet_fmnist"):
        t_nr, s_nr = _trainer(model, nr=True)
        t_off, s_off = _trainer(model, nr=False)
        cands = {"nr": (t_nr.steps.train, s_nr), "no_nr": (t_off.steps.train, s_off)}
        if model == "vgg_fmnist":
            cands["plain_flax"] = plain_step(batch)
        times = interleaved(cands, batch, reps, steps)
        out[model] = {
            "ms_per_step": {k: 1e3 * v for k, v in times.items()},
            "overhead_vs_no_nr": times["nr"] / times["no_nr"] - 1,
            **(
                {"overhead_vs_plain_flax": times["nr"] / times["plain_flax"] - 1}
                if "plain_flax" in times
                else {}
            ),
        }
    return out


def _force_rejuvenation(trainer: Any, state: Any, dead_frac: float = 0.5) -> Any:
    """Kills ~dead_frac of every prunable unit's channels, then rejuvenates (U about 0.25)."""
    rng = np.random.default_rng(0)
    params = jax.device_get(state.params)
    for u in trainer.graph.prunable:
        g = np.array(params[u.name]["bn"]["scale"])
        g[rng.random(g.shape) < dead_frac] = 0.0
        g[0] = max(g[0], 0.5)
        params[u.name]["bn"]["scale"] = g
    variables = {**jax.device_get(state.variables), "params": params}
    res = nr_jax.rejuvenate(
        jax.random.key(1), trainer.model, variables, state.opt_state, trainer.tx, trainer.graph
    )
    trainer.set_widths(res.model.widths)
    v = res.variables
    state = state.replace(
        params=v["params"],
        batch_stats=v["batch_stats"],
        masks=v[nr_jax.MASKS],
        opt_state=res.opt_state,
    )
    return state, res.report


def compilations() -> dict:
    trainer, state = _trainer("vgg_fmnist")
    batch = _batch(FLAGS.batch)
    for epoch in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
        state = state.replace(opt_state=nr_jax.set_lambda(state.opt_state, 1e-3 * epoch))
    state, _ = _force_rejuvenation(trainer, state)
    for _ in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
    return {"width_configurations": 2, "traces": dict(trainer.counter)}


def rejuvenation_latency(reps: int) -> dict:
    out = {}
    for name in ("resnet50", "densenet121"):
        model = nr_jax.models.get(name, num_classes=1000)
        graph = nr_jax.channel_graph(model, (1, 224, 224, 3))
        rng = np.random.default_rng(0)
        variables = jax.tree.map(
            lambda s, rng=rng: rng.standard_normal(s.shape).astype(np.float32),
            graph.variable_shapes,
        )
        for u in graph.prunable:
            g = rng.uniform(0.1, 1.0, u.out_channels).astype(np.float32)
            g[rng.random(u.out_channels) < 0.35] = 0.0
            g[0] = 1.0
            variables["params"][u.name]["bn"]["scale"] = g
        tx = optax.chain(
            nr_jax.l1_bn_scales(graph, 1e-4),
            optax.add_decayed_weights(1e-4),
            optax.sgd(0.1, momentum=0.9),
        )
        opt_state = jax.tree.map(np.asarray, tx.init(variables["params"]))
        times = []
        for i in range(reps):
            t = time.perf_counter()
            res = nr_jax.rejuvenate(jax.random.key(i), model, variables, opt_state, tx, graph)
            times.append(time.perf_counter() - t)
        out[name] = {
            "seconds_median": statistics.median(times),
            "seconds_all": times,
            "utilization": res.report.utilization,
            "params_after": res.report.counts_after.total,
            "new_weights_drawn": res.report.counts_after.conv,
        }
    return out


def post_rejuvenation_cost(reps: int, steps: int) -> dict:
    batch = _batch(FLAGS.batch)
    out = {}
    for model in ("vgg_fmnist", "resnet_fmnist"):
        cands, reports = {}, {}
        for scheme in ("removed", "attention", "attention4", "dense"):
            trainer, state = _trainer(model, nr=True, scheme=scheme)
            state, reports[scheme] = _force_rejuvenation(trainer, state)
            cands[scheme] = (trainer.steps.train, state)
        report = reports["removed"]
        times = interleaved(cands, batch, reps, steps)
        c = report.counts_after
        out[model] = {
            "utilization": report.utilization,
            "ms_per_step": {k: 1e3 * v for k, v in times.items()},
            "removed_vs_dense": times["removed"] / times["dense"],
            "attention_vs_dense": times["attention"] / times["dense"],
            "attention_vs_removed": times["attention"] / times["removed"],
            "attention4_vs_attention": times["attention4"] / times["attention"],
            "effective_macs_ratio": c.effective_macs / c.macs,
            "macs_dense": c.macs,
            "macs_removed": c.effective_macs,
        }
    return out


def efficiency(reps: int, steps: int) -> dict:
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mm(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    peak = 2 * n**3 / statistics.median(ts)
    out = {"matmul_peak_gflops": peak / 1e9}
    batch = _batch(FLAGS.batch)
    for model in ("vgg_fmnist", "resnet_fmnist"):
        trainer, state = _trainer(model)
        compiled = trainer.steps.train.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0))
        state, _ = _time_steps(trainer.steps.train, state, batch, 2)
        dts = []
        for _ in range(reps):
            state, dt = _time_steps(trainer.steps.train, state, batch, steps)
            dts.append(dt)
        dt = statistics.median(dts)
        macs = nr_jax.count(trainer.graph).macs
        out[model] = {
            "xla_flops_per_step": flops,
            "model_flops_per_step": 6 * macs * FLAGS.batch,
            "ms_per_step": 1e3 * dt,
            "images_per_s": FLAGS.batch / dt,
            "achieved_gflops": flops / dt / 1e9,
            "fraction_of_peak": flops / dt / peak,
        }
    return out


def input_pipeline(step_images_per_s: float) -> dict:
    images = np.random.default_rng(0).integers(0, 255, (20_000, 28, 28, 1), dtype=np.uint8)
    labels = np.zeros(20_000, np.int32)
    info = nr_data.DATASET_INFO["fashion_mnist"]
    out = {}
    for augment in (False, True):
        t = time.perf_counter()
        n = 0
        for b in nr_data.prefetch(
            nr_data.train_batches(
                images, labels, FLAGS.batch, seed=0, epoch=0, augment=augment, info=info
            )
        ):
            n += len(b["label"])
        rate = n / (time.perf_counter() - t)
        out[f"augment={augment}"] = {"images_per_s": rate, "vs_step": rate / step_images_per_s}
    return out


def markdown(r: dict) -> str:
    w, p, e, lat = r["watching"], r["post"], r["efficiency"], r["latency"]
    lines = [f"Hardware: {r['hardware']}; batch {r['batch']}; jax {r['jax']}.", ""]
    lines += [
        "| watching overhead | NR step ms | no-NR step ms | plain Flax ms | NR vs no-NR |",
        "|---|---|---|---|---|",
    ]
    for m, v in w.items():
        ms = v["ms_per_step"]
        plain = f"{ms['plain_flax']:.1f}" if "plain_flax" in ms else "-"
        lines.append(
            f"| {m} | {ms['nr']:.1f} | {ms['no_nr']:.1f} | {plain} | "
            f"{100 * v['overhead_vs_no_nr']:+.1f}% |"
        )
    lines += [
        "",
        f"Compilations in a run with one rejuvenation (2 width configurations): "
        f"{r['compilations']['traces']}",
        "",
    ]
    lines += ["| rejuvenation latency | median s | U | params after |", "|---|---|---|---|"]
    for m, v in lat.items():
        lines.append(
            f"| {m} | {v['seconds_median']:.2f} | {v['utilization']:.3f} | {v['params_after']:,} |"
        )
    lines += [
        "",
        "| post-rejuvenation step | U | removed ms | attention ms (2 convs) | "
        "attention ms (4 convs) | dense ms | removed/dense | attention/dense | "
        "effective MACs/dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, v in p.items():
        ms = v["ms_per_step"]
        lines.append(
            f"| {m} | {v['utilization']:.3f} | {ms['removed']:.1f} | {ms['attention']:.1f} | "
            f"{ms['attention4']:.1f} | {ms['dense']:.1f} | {v['removed_vs_dense']:.2f} | "
            f"{v['attention_vs_dense']:.2f} | {v['effective_macs_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Matmul peak: {e['matmul_peak_gflops']:.0f} GFLOP/s",
        "",
        "| efficiency | images/s | achieved GFLOP/s | fraction of peak |",
        "|---|---|---|---|",
    ]
    for m in ("vgg_fmnist", "resnet_fmnist"):
        v = e[m]
        lines.append(
            f"| {m} | {v['images_per_s']:.0f} | {v['achieved_gflops']:.1f} | "
            f"{100 * v['fraction_of_peak']:.0f}% |"
        )
    lines += ["", "| input pipeline | images/s | x step consumption |", "|---|---|---|"]
    for k, v in r["pipeline"].items():
        lines.append(f"| {k} | {v['images_per_s']:,.0f} | {v['vs_step']:.0f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("nr_jax").setLevel(logging.WARNING)
    os.makedirs(FLAGS.out, exist_ok=True)
    reps, steps = (7, 10) if FLAGS.full else (5, 5)
    t0 = time.time()
    r: dict[str, Any] = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}",
        "batch": FLAGS.batch,
        "jax": jax.__version__,
    }
    r["watching"] = watching_overhead(reps, steps)
    r["compilations"] = compilations()
    r["latency"] = rejuvenation_latency(3)
    r["post"] = post_rejuvenation_cost(reps, steps)
    r["efficiency"] = efficiency(reps, steps)
    r["pipeline"] = input_pipeline(r["efficiency"]["vgg_fmnist"]["images_per_s"])
    r["wall_s"] = time.time() - t0
    with open(os.path.join(FLAGS.out, "benchmark.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r) + f"\n\nBenchmark wall time: {r['wall_s']:.0f} s\n"
    with open(os.path.join(FLAGS.out, "benchmark.md"), "w") as f:
        f.write(md)
    print(md)  # the summary, for people


if __name__ == "__main__":
    app.run(main)
