"""5. Efficiency: achieved FLOP/s of the train step against a measured matmul peak, and the
same step with XLA's own convolution kernel gradient (`conv_weight_grad="xla"`) instead of
nr_jax's shifted matmuls (the CPU default, "auto"), interleaved; PyTorch's steps if available."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

import nr_jax
from experiments.benchmark.common import (
    FLAGS,
    interleaved,
    make_trainer,
    synthetic_batch,
    time_steps,
)
from experiments.benchmark.post import paper_scale, paper_scale_reps, post_families
from experiments.benchmark.pytorch import pytorch_reference
from nr_jax import data as nr_data

EFFICIENCY_FAMILIES = (("resnet20_cifar", "cifar10", None),)


def matmul_peak(reps: int, dtype: Any = jnp.float32, sizes: tuple[int, ...] = (1024, 2048)) -> dict:
    """GFLOP/s of jitted n x n matmuls in `dtype` (random normal data) for each n of `sizes`:
    median and best repetition per n; the peak is the best repetition of any n (the machine's
    speed drifts; a peak is what it can reach)."""
    median, best = {}, {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            mm(a).block_until_ready()
            ts.append(time.perf_counter() - t)
        median[n] = 2 * n**3 / statistics.median(ts) / 1e9
        best[n] = 2 * n**3 / min(ts) / 1e9
    return {"gflops_median_by_n": median, "gflops_best_by_n": best, "gflops": max(best.values())}


def efficiency(reps: int, steps: int) -> dict:
    peak = matmul_peak(2 * reps)
    out: dict[str, Any] = {"matmul_peak_gflops": peak["gflops"], "matmul_peak": peak}
    small = [f for f in post_families() if f[2] is None]
    paper = [f for f in post_families() if f[2] is not None]
    extra = list(EFFICIENCY_FAMILIES) if paper_scale() else []
    for model, dataset, batch_size in small + extra + paper:
        info = nr_data.DATASET_INFO[dataset]
        n = batch_size or FLAGS.batch
        batch = synthetic_batch(n, info.image_shape[0], info.image_shape[2])
        cands, flops = {}, 0.0
        for mode in ("xla", "auto"):  # the models' `conv_weight_grad` (config.conv_weight_grad)
            trainer, state = make_trainer(
                model, dataset=dataset, batch=batch_size, conv_weight_grad=mode
            )
            if mode == "auto":
                compiled = trainer.steps.train.lower(state, batch).compile()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                flops = float(cost.get("flops", 0.0))
            state, _ = time_steps(trainer.steps.train, state, batch, 1)  # traced here
            cands[mode] = (trainer.steps.train, state)
        n_reps, n_steps = paper_scale_reps(batch_size, reps, steps)
        times = interleaved(cands, batch, n_reps, n_steps)
        dt = times["auto"]
        macs = nr_jax.count(trainer.graph).macs
        out[model] = {
            "xla_flops_per_step": flops,
            "batch": n,
            "model_flops_per_step": 6 * macs * n,
            "ms_per_step": 1e3 * dt,
            "images_per_s": n / dt,
            "achieved_gflops": flops / dt / 1e9,
            "fraction_of_peak": flops / dt / (peak["gflops"] * 1e9),
            "ms_per_step_xla_kernel_grad": 1e3 * times["xla"],
            "speedup_vs_xla_kernel_grad": times["xla"] / dt,
        }
    measured = [(m, v["batch"]) for m, v in out.items() if not m.startswith("matmul_peak")]
    torch_reps = (3, 2) if any(b != FLAGS.batch for _, b in measured) else (max(reps, 5), 3)
    ref = pytorch_reference(measured, *torch_reps)
    out["pytorch"] = ref
    for m, v in ref.get("families", {}).items():
        out[m]["pytorch_images_per_s"] = v["images_per_s"]
        out[m]["vs_pytorch"] = out[m]["images_per_s"] / v["images_per_s"]
    return out
