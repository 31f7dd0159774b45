"""Section `throughput`: float32 and bfloat16 train-step images/s and model-FLOP utilisation,
synthetic on-device data.

The FLOPs of a step are XLA's cost analysis of the compiled step (`compiled.cost_analysis()`);
utilisation is its FLOP rate over the measured bf16 matmul peak of the same device
(`experiments.benchmark.efficiency.matmul_peak`, n x n bfloat16 products on random data), which is
reported with it. 6 x MACs x batch (forward + backward, `nr_jax.count`) gives a second, model-side
utilisation. The step is the NR train step of the base config (L1 on γ, in-jit liveness), before
any rejuvenation, timed through the compiled executable itself (compiled once).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax.numpy as jnp

import nr_jax
from experiments.accelerator.deadline import Deadline
from experiments.accelerator.settings import Setting
from experiments.benchmark.common import interleaved_times, make_trainer, synthetic_batch
from experiments.benchmark.efficiency import matmul_peak
from nr_jax import data as nr_data

TITLE = "Train-step throughput and model-FLOP utilisation"
GOAL_MODEL, GOAL_IMAGES_PER_S = "resnet50", 2500.0  # issue 15: bfloat16, H100/H200-class GPU


def xla_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled executable, by XLA's cost analysis (0 if it has none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", 0.0))


def measure(
    setting: Setting, model: str, dataset: str, n: int, dtype: str, peak_flops: float
) -> dict[str, Any]:
    """Compiles and times the train step of `model` in `dtype` at batch `n`."""
    info = nr_data.DATASET_INFO[dataset]
    t = time.perf_counter()
    trainer, state = make_trainer(model, dataset=dataset, batch=n, compute_dtype=dtype)
    batch = synthetic_batch(n, info.image_shape[0], info.image_shape[2], info.num_classes)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = trainer.steps.train.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    flops = xla_flops(compiled)
    times = interleaved_times({dtype: (compiled, state)}, batch, setting.reps, setting.steps)
    dt = statistics.median(times[dtype])
    model_flops = 6.0 * nr_jax.count(trainer.graph).macs * n
    return {
        "batch": n,
        "image_size": info.image_shape[0],
        "ms_per_step": 1e3 * dt,
        "ms_per_step_all": [1e3 * x for x in times[dtype]],
        "images_per_s": n / dt,
        "xla_flops_per_step": flops,
        "model_flops_per_step": model_flops,
        "achieved_tflops": flops / dt / 1e12,
        "mfu_xla_flops": flops / dt / peak_flops if peak_flops else None,
        "mfu_model_flops": model_flops / dt / peak_flops if peak_flops else None,
        "setup_s": setup_s,
        "compile_s": compile_s,
    }


def run(setting: Setting, deadline: Deadline, result: dict[str, Any]) -> None:
    """The bf16 peak, then every family in every dtype, in the setting's order."""
    peak = matmul_peak(setting.peak_reps, dtype=jnp.bfloat16, sizes=setting.peak_sizes)
    result["bf16_matmul_peak_tflops"] = peak["gflops"] / 1e3
    result["bf16_matmul_peak"] = peak
    result["runs"] = {}
    for model, dataset, n in setting.throughput:
        for dtype in setting.dtypes:
            deadline.check(f"{model} {dtype}")
            result["runs"][f"{model}/{dtype}"] = {
                "model": model,
                "dtype": dtype,
                **measure(setting, model, dataset, n, dtype, peak["gflops"] * 1e9),
            }


def goal(result: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's ResNet-50 bfloat16 goal against the measured rate (None if not measured)."""
    r = result.get("runs", {}).get(f"{GOAL_MODEL}/bfloat16")
    if r is None:
        return None
    rate = r["images_per_s"]
    return {
        "goal": f"{GOAL_MODEL} bfloat16 >= {GOAL_IMAGES_PER_S:.0f} images/s",
        "measured": round(rate, 1),
        "met": rate >= GOAL_IMAGES_PER_S,
    }


def summary(result: dict[str, Any]) -> str:
    runs = ", ".join(
        f"{k} {v['images_per_s']:,.0f} img/s ({100 * (v['mfu_xla_flops'] or 0):.0f}% MFU)"
        for k, v in result.get("runs", {}).items()
    )
    return f"bf16 peak {result['bf16_matmul_peak_tflops']:.0f} TFLOP/s; {runs or 'no step timed'}"


def markdown(result: dict[str, Any]) -> list[str]:
    medians = result["bf16_matmul_peak"]["gflops_median_by_n"]
    lines = [
        f"bf16 matmul peak {result['bf16_matmul_peak_tflops']:.1f} TFLOP/s (best repetition; "
        "medians by n: " + ", ".join(f"{n}: {g / 1e3:.1f}" for n, g in medians.items()) + ").",
        "",
        "| model | dtype | batch | image | images/s | ms/step | XLA TFLOP/step | achieved "
        "TFLOP/s | MFU (XLA FLOPs) | MFU (6·MACs) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in result.get("runs", {}).values():
        lines.append(
            f"| {v['model']} | {v['dtype']} | {v['batch']} | {v['image_size']} | "
            f"{v['images_per_s']:,.0f} | {v['ms_per_step']:.2f} | "
            f"{v['xla_flops_per_step'] / 1e12:.3f} | {v['achieved_tflops']:.1f} | "
            f"{100 * (v['mfu_xla_flops'] or 0):.1f}% | {100 * (v['mfu_model_flops'] or 0):.1f}% | "
            f"{v['compile_s']:.1f} |"
        )
    return lines
