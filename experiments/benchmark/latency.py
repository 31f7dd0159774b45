"""3. Rejuvenation latency (variables + optimiser-state surgery + new graph) of full-size
ResNet-50 and DenseNet-121, no compilation involved."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import optax

import nr_jax


def latency_inputs(name: str) -> tuple:
    """(model, graph, variables, opt_state, tx) of a full-size `name` with random weights and
    about 35% of every prunable unit's BN scales zero (the latency section's inputs)."""
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
    opt_state = jax.tree.map(np.asarray, tx.init(variables["params"]))
    return model, graph, variables, opt_state, tx


def rejuvenation_latency(reps: int) -> dict:
    out = {}
    for name in ("resnet50", "densenet121"):
        model, graph, variables, opt_state, tx = latency_inputs(name)
        times = []
        for i in range(reps + 1):  # the first call (fresh memory, caches) is reported apart
            t = time.perf_counter()
            res = nr_jax.rejuvenate(jax.random.key(i), model, variables, opt_state, tx, graph)
            times.append(time.perf_counter() - t)
            report = res.report
            del res  # free the new trees before the next call, as a run would
        out[name] = {
            "seconds_median": statistics.median(times[1:]),
            "seconds_min": min(times[1:]),
            "seconds_first_call": times[0],
            "seconds_all": times[1:],
            "utilization": report.utilization,
            "params_after": report.counts_after.total,
        }
    return out
