"""Per-function time of one rejuvenation of a full-size network (median of 10 after 2), for the
parity README: `PYTHONPATH=<worktree> python phases.py densenet121 liveness,_new_variables,...`
(names of `nr_jax.surgery` functions to time; those the commit lacks are skipped)."""

import statistics
import sys
import time

import jax
from gc_ab import setup  # the benchmark's inputs (this directory)

import nr_jax
from nr_jax import surgery

name = sys.argv[1]
model, graph, variables, opt_state, tx = setup(name)
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
