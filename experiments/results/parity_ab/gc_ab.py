"""Cyclic-GC A/B of one rejuvenation, in one process, the two alternating: the collector
enabled against disabled around `nr_jax.rejuvenate`. From 5524106 on `rejuvenate` pauses the
collector itself, so run this at an earlier commit (the README's figures: the working tree just
before 5524106, the arena in place, no pause). The full benchmark's inputs.
`python gc_ab.py` prints the median of 10 after 2 per variant and model."""

import gc
import importlib.util
import statistics
import time
from pathlib import Path

import jax

import nr_jax


def setup(name):
    """The benchmark's latency inputs (`experiments.benchmark.latency.latency_inputs`), loaded
    from this checkout's file, so the script also runs against an older `nr_jax` on PYTHONPATH."""
    path = Path(__file__).resolve().parents[2] / "benchmark" / "latency.py"
    spec = importlib.util.spec_from_file_location("latency_inputs_of_this_checkout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.latency_inputs(name)


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
