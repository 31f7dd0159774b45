"""Per-function time of one rejuvenation of a full-size network (median of 10 after 2), for the
parity README: `PYTHONPATH=<worktree> python phases.py densenet121 liveness,_new_variables,...`
(names of `nr_jax.surgery` functions to time; those the commit lacks are skipped)."""

import statistics
import sys
import time

import jax
import numpy as np
import optax

import nr_jax
from nr_jax import surgery

name = sys.argv[1]
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
    nr_jax.l1_bn_scales(graph, 1e-4), optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)
)
opt_state = jax.tree.map(np.asarray, tx.init(variables["params"]))
acc = {}


def wrap(owner, fname):
    f = getattr(owner, fname)

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        acc.setdefault(fname, []).append(time.perf_counter() - t)
        return r

    setattr(owner, fname, timed)


for fn in sys.argv[2].split(","):
    if hasattr(surgery, fn):
        wrap(surgery, fn)
try:  # the redesign's planner (absent at 8ceb7e7)
    from nr_jax import planning

    wrap(planning.Plan, "check")
    wrap(surgery.planning, "plan")
except (ImportError, AttributeError):
    pass
tot = []
for i in range(12):
    t = time.perf_counter()
    res = nr_jax.rejuvenate(jax.random.key(i), model, variables, opt_state, tx, graph)
    del res
    tot.append(time.perf_counter() - t)
print("total median", round(statistics.median(tot[2:]) * 1e3, 1), "ms")
for k, v in acc.items():
    n = len(v) // 12
    per_rej = statistics.median([sum(v[i * n : (i + 1) * n]) for i in range(2, 12)])
    print(f"{k:20s} calls/rej {n}  ms/rej {1e3 * per_rej:.1f}")
