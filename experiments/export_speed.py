"""Inference time of the compact export (`nr_jax.export`) against the training form, on CPU.

    python -m experiments.export_speed                 # the default models, under 2 minutes
    python -m experiments.export_speed --models vgg_tiny --batches 2 --repeats 2   # smoke run
    python -m experiments.export_speed --models vgg_fmnist,mlp_fmnist --norm layer  # LayerNorm

For each model (`--norm`: the units' normalisation, for the families that take one: VGG chains
and the MLP): about `--dead_frac` of each prunable unit's channels made dead (random scales ~0
with a normalisation, zero outgoing weights without one), one rejuvenation with `--scheme` (the
sqrt rule, liveness by the matching criterion: "norm" or "outgoing"), then both forms of the
rejuvenated network, jitted: the training form `nr_jax.predict(model.apply(variables, x,
train=False))` (normalisation, masks, zero cross blocks and two heads) and the exported network
(BN folded, GroupNorm / LayerNorm kept, live channels only, one head). Each is timed as the
median of `--repeats` calls after a warm-up call, per batch size. Prints a table: model, batch,
both times in ms, the speed-up, and the parameter counts of both forms (training form: every
array in "params", zero blocks and BN included; exported: every array it has).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import flax
import jax
import numpy as np
import optax
from absl import flags

import nr_jax
from experiments import cli

flags.DEFINE_list("models", ["vgg_fmnist", "resnet_fmnist", "densenet_tiny"], "Registered models.")
flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
flags.DEFINE_integer("repeats", 10, "Timed calls per model, batch and form (the median is shown).")
flags.DEFINE_enum("scheme", "removed", ["removed", "attention"], "Scheme of the rejuvenation.")
flags.DEFINE_float("dead_frac", 0.5, "Fraction of each prunable unit's channels made dead.")
flags.DEFINE_integer("hw", 28, "Image height and width (one channel: Fashion-MNIST-sized).")
flags.DEFINE_enum(
    "norm", None, ["batch", "group", "layer", "none"], "The units' normalisation (model default)."
)
flags.adopt_module_key_flags(cli)
FLAGS = flags.FLAGS


def rejuvenated(
    name: str, scheme: str, hw: int, dead_frac: float, seed: int = 0, norm: str | None = None
) -> Any:
    """The registered model `name` with random weights, rejuvenated once (`nr_jax.Rejuvenation`);
    `norm` ("batch", "group", "layer", "none") sets its units' normalisation."""
    kwargs = {} if norm is None else {"norm": None if norm == "none" else norm}
    model = nr_jax.models.get(name, num_classes=10, scheme=scheme, **kwargs)
    graph = nr_jax.channel_graph(model, (1, hw, hw, 1))
    rng = np.random.default_rng(seed)

    def leaf(path: Any, s: jax.ShapeDtypeStruct) -> np.ndarray:
        last = path[-1].key
        if path[0].key == nr_jax.MASKS:
            return np.ones(s.shape, s.dtype)
        if last in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        std = np.sqrt(2.0 / s.shape[-1]) if last == "kernel" else 0.1
        return (std * rng.standard_normal(s.shape)).astype(s.dtype)

    variables = jax.tree_util.tree_map_with_path(leaf, graph.variable_shapes)
    params = flax.traverse_util.flatten_dict(variables["params"])
    dead = {}
    for u in graph.prunable:
        dead[u.name] = rng.random(u.out_channels) < dead_frac
        dead[u.name][rng.integers(u.out_channels)] = False  # at least one live channel
        if u.scale_path is not None:
            params[u.scale_path][dead[u.name]] = 1e-5
    scaled = all(u.scale_path is not None for u in graph.units)
    if not scaled:  # no scale to read: the dead channels' outgoing weights (every reader's rows)
        for v in graph.all_units:
            offset = 0
            for producers, start, stop in v.inputs:
                for p in sorted(producers & set(dead)):
                    rows = offset + np.flatnonzero(dead[p][start:stop])
                    params[(*v.path, "kernel")][..., rows, :] = 0.0
                offset += stop - start
    variables = {**variables, "params": flax.traverse_util.unflatten_dict(params)}
    live = nr_jax.criteria.resolve("norm" if scaled else "outgoing")(variables, graph)
    return nr_jax.rejuvenate(
        jax.random.key(seed), model, variables, None, optax.identity(), graph, live=live
    )


def median_ms(fn: Any, *args: Any, repeats: int) -> float:
    """Median wall time of `fn(*args)` in ms, after one warm-up call (the compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def export_speed(
    names: list[str],
    batches: list[int],
    repeats: int,
    scheme: str,
    hw: int,
    dead_frac: float,
    norm: str | None = None,
) -> list[dict[str, Any]]:
    """One row per model and batch size: both forms' times (ms), speed-up, parameter counts."""
    rows = []
    for name in names:
        res = rejuvenated(name, scheme, hw, dead_frac, norm=norm)
        net, net_vars = nr_jax.export(res.model, res.variables, input_shape=(1, hw, hw, 1))
        train_form = jax.jit(lambda v, x, m=res.model: nr_jax.predict(m.apply(v, x, train=False)))
        exported = jax.jit(net.apply)
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, hw, hw, 1), np.float32)
            t_train = median_ms(train_form, res.variables, x, repeats=repeats)
            t_export = median_ms(exported, net_vars, x, repeats=repeats)
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "train_ms": t_train,
                    "export_ms": t_export,
                    "speedup": t_train / t_export,
                    "train_params": sum(a.size for a in jax.tree.leaves(res.variables["params"])),
                    "export_params": sum(a.size for a in jax.tree.leaves(net_vars)),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| model | batch | training form ms | exported ms | speed-up | params (training) "
        "| params (exported) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['train_ms']:.2f} | {r['export_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r['train_params']:,} | {r['export_params']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    batches = [int(b) for b in FLAGS.batches]
    rows = export_speed(
        FLAGS.models, batches, FLAGS.repeats, FLAGS.scheme, FLAGS.hw, FLAGS.dead_frac, FLAGS.norm
    )
    norm = f", norm {FLAGS.norm}" if FLAGS.norm else ""
    print(
        f"CPU, scheme {FLAGS.scheme}{norm}, {FLAGS.hw}x{FLAGS.hw}x1 images, "
        f"median of {FLAGS.repeats}"
    )
    print(table(rows))


if __name__ == "__main__":
    cli.run(main)
