"""7. Width granularity: train-step time per FLOP of a conv stack over a sweep of widths, and
the expected step time when a target width is rounded up to a multiple of g (the measurement
behind `rounded_allocation`)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmark.common import interleaved_times, synthetic_batch
from nr_jax import train
from nr_jax.config import base_config

GRANULARITIES = (1, 2, 4, 8, 16)
_STACK_BATCH, _STACK_DEPTH, _STACK_HW = 32, 2, 16  # maps after the stride-2 stem
BOOTSTRAP = 1000


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _bn_relu(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
    return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)


def _stack_loss(params: dict, batch: dict) -> jax.Array:
    x = _bn_relu(_conv(batch["image"], params["stem"], 2), *params["stem_bn"])
    for kernel, bn in zip(params["convs"], params["bns"], strict=True):
        x = _bn_relu(_conv(x, kernel, 1), *bn)
    logits = jnp.mean(x, axis=(1, 2)) @ params["fc"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@jax.jit
def _stack_step(params: dict, batch: dict) -> tuple[dict, dict]:
    """One SGD step (forward + backward) of the width-w conv stack."""
    loss, grads = jax.value_and_grad(_stack_loss)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), {"loss": loss}


def _stack_params(width: int) -> dict:
    rng = np.random.default_rng(width)

    def he(*shape: int) -> jax.Array:
        fan_in = shape[0] * shape[1] * shape[2]
        return jnp.asarray(rng.normal(size=shape) * np.sqrt(2.0 / fan_in), jnp.float32)

    bn = (jnp.ones((width,), jnp.float32), jnp.zeros((width,), jnp.float32))
    return {
        "stem": he(3, 3, 3, width),
        "stem_bn": bn,
        "convs": [he(3, 3, width, width) for _ in range(_STACK_DEPTH)],
        "bns": [bn] * _STACK_DEPTH,
        "fc": jnp.asarray(rng.normal(size=(width, 10)) / np.sqrt(width), jnp.float32),
    }


def _stack_flops(width: int) -> float:
    """Model FLOPs of one train step: 6 x MACs x batch, as in `efficiency`."""
    maps = _STACK_HW * _STACK_HW
    macs = maps * 9 * 3 * width + _STACK_DEPTH * maps * 9 * width * width + width * 10
    return 6.0 * macs * _STACK_BATCH


def _round_up(width: int, granularity: int) -> int:
    return granularity * math.ceil(width / granularity)


def width_granularity(targets: range, reps: int, steps: int) -> dict:
    """Step time per FLOP over a width sweep; the expected cost of each rounding granularity.

    Every width in `targets` (and every rounded-up width) is compiled once; all widths are timed
    in the same interleaved repetitions. For granularity g, a target width t costs the measured
    step time of `g * ceil(t / g)`; its mean over the targets (a uniformly random target width)
    is compared with g = 1 (no rounding).
    """
    measured = sorted(set(targets) | {_round_up(t, g) for g in GRANULARITIES for t in targets})
    batch = synthetic_batch(_STACK_BATCH, hw=32, c=3)
    batch = {"image": batch["image"], "label": batch["label"]}
    cands, compile_s = {}, {}
    t0 = time.perf_counter()
    for w in measured:
        params = _stack_params(w)
        t = time.perf_counter()
        cands[w] = (_stack_step.lower(params, batch).compile(), params)
        compile_s[w] = time.perf_counter() - t
    compile_total = time.perf_counter() - t0
    all_times = interleaved_times(cands, batch, reps, steps)
    times = {w: statistics.median(v) for w, v in all_times.items()}
    flops = {w: _stack_flops(w) for w in measured}
    tpf = {w: times[w] / flops[w] for w in measured}
    mean_tpf = statistics.mean(tpf[t] for t in targets)
    mean_time = statistics.mean(times[t] for t in targets)
    # Time per FLOP falls with width (bigger convolutions run closer to peak); the residual
    # against a power-law fit over the targets separates granularity from that trend.
    fit = np.polyfit(np.log(list(targets)), np.log([tpf[t] for t in targets]), 1)
    residual = {w: tpf[w] / np.exp(np.polyval(fit, np.log(w))) for w in measured}
    mean_residual = statistics.mean(residual[t] for t in targets)
    table = {}
    for g in GRANULARITIES:
        multiples = [t for t in targets if t % g == 0]
        up = [_round_up(t, g) for t in targets]
        table[str(g)] = {
            "widths": len(multiples),
            "time_per_flop_vs_all": statistics.mean(tpf[w] for w in multiples) / mean_tpf,
            "time_per_flop_vs_trend": float(
                statistics.mean(residual[w] for w in multiples) / mean_residual
            ),
            "extra_flops_rounding_up": statistics.mean(
                flops[u] / flops[t] for t, u in zip(targets, up, strict=True)
            )
            - 1,
            "expected_time_vs_g1": statistics.mean(times[u] for u in up) / mean_time,
        }
    best = min(GRANULARITIES, key=lambda g: table[str(g)]["expected_time_vs_g1"])
    # How firm the choice is: the argmin over bootstrap resamples of each width's repetitions.
    rng = np.random.default_rng(0)
    samples = {w: np.asarray(v) for w, v in all_times.items()}
    wins = dict.fromkeys(GRANULARITIES, 0)
    for _ in range(BOOTSTRAP):
        t = {w: np.median(rng.choice(v, len(v))) for w, v in samples.items()}
        wins[min(GRANULARITIES, key=lambda g: np.mean([t[_round_up(u, g)] for u in targets]))] += 1
    best_equal = min(GRANULARITIES, key=lambda g: table[str(g)]["time_per_flop_vs_trend"])
    return {
        "setup": (
            f"pure-JAX train step (forward + backward + SGD): 3x3 stem conv 3->w stride 2, then "
            f"{_STACK_DEPTH} 3x3 convs w->w on {_STACK_HW}x{_STACK_HW} maps, each + BN + ReLU, "
            f"batch {_STACK_BATCH}, 32x32x3 input"
        ),
        "targets": [targets.start, targets.stop - 1],
        "compilations": len(measured),
        "compile_seconds": compile_total,
        "widths": {
            str(w): {
                "ms_per_step": 1e3 * times[w],
                "gflops_per_s": flops[w] / times[w] / 1e9,
                "time_per_flop_vs_mean": tpf[w] / mean_tpf,
                "time_per_flop_vs_trend": float(residual[w]),
                "compile_s": compile_s[w],
            }
            for w in measured
        },
        "granularity": table,
        "recommended": best,
        "bootstrap_wins": {str(g): n / BOOTSTRAP for g, n in wins.items()},
        "recommended_at_equal_flops": best_equal,
        "preset": train.allocation_name(_improved_config()),
    }


def _improved_config() -> Any:
    c = base_config()
    c.preset = "improved"
    return c
