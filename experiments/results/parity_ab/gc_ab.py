"""Cyclic-GC A/B of one rejuvenation, in one process, the two alternating: the collector
enabled against disabled around `nr_jax.rejuvenate`. From 5524106 on `rejuvenate` pauses the
collector itself, so run this at an earlier commit (the README's figures: the working tree just
before 5524106, the arena in place, no pause). The full benchmark's inputs.
`python gc_ab.py` prints the median of 10 after 2 per variant and model."""

import gc
import statistics
import time

import jax
import numpy as np
import optax

import nr_jax


def setup(name):
    model = nr_jax.models.get(name, num_classes=1000)
    graph = nr_jax.channel_graph(model, (1, 224, 224, 3))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), graph.variable_shapes
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
    return model, graph, variables, jax.tree.map(np.asarray, tx.init(variables["params"])), tx


if __name__ == "__main__":
    for name in ["densenet121", "resnet50"]:
        model, graph, variables, opt_state, tx = setup(name)
        t = {"gc": [], "nogc": []}
        for i in range(24):
            v = ("gc", "nogc")[i % 2]
            if v == "nogc":
                gc.disable()
            s = time.perf_counter()
            res = nr_jax.rejuvenate(jax.random.key(i), model, variables, opt_state, tx, graph)
            jax.block_until_ready(res.variables)
            t[v].append(time.perf_counter() - s)
            gc.enable()
            del res
        print(name, {k: round(statistics.median(x[2:]) * 1e3, 1) for k, x in t.items()}, "ms")
