"""Host allocation A/B of one rejuvenation (runs at 5524106, the one commit with `hostmem.Arena`):
every new host array in a buffer of its own (`hostmem.aligned_zeros`) against an `Arena` (a few
large buffers), in one process, the two alternating; the full benchmark's inputs (ImageNet-size
network, random weights, 35% dead).
`python arena_ab.py densenet121 resnet50` prints the median of 10 per variant and model."""

import statistics
import sys
import time

import jax
from gc_ab import setup  # the benchmark's inputs (this directory)

import nr_jax
from nr_jax import hostmem, surgery


class PerLeaf:  # the per-leaf variant, in the arena's interface
    zeros = staticmethod(hostmem.aligned_zeros)


for name in sys.argv[1:]:
    model, graph, variables, opt_state, tx = setup(name)
    times = {"per_leaf": [], "arena": []}
    for i in range(24):
        variant = ("per_leaf", "arena")[i % 2]
        surgery.Arena = PerLeaf if variant == "per_leaf" else hostmem.Arena
        t = time.perf_counter()
        res = nr_jax.rejuvenate(jax.random.key(i), model, variables, opt_state, tx, graph)
        jax.block_until_ready(res.variables)
        times[variant].append(time.perf_counter() - t)
        del res
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    print(
        f"{name}: per-leaf {med['per_leaf'] * 1e3:.1f} ms, arena {med['arena'] * 1e3:.1f} ms, "
        f"speed arena/per-leaf {med['per_leaf'] / med['arena']:.3f}"
    )
