"""Flags and helpers shared by the benchmark sections: interleaved step timing, synthetic
batches, trainers built from the base config, and a forced rejuvenation."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import nr_jax
from nr_jax import data as nr_data
from nr_jax import train
from nr_jax.config import base_config

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/benchmark", "Output directory.")
flags.DEFINE_boolean("full", False, "More repetitions (slower, steadier).")
flags.DEFINE_integer("batch", 64, "Batch size of the step benchmarks.")
SECTIONS = (
    "watching",
    "compilations",
    "latency",
    "post",
    "efficiency",
    "pipeline",
    "granularity",
    "pipeline_images",
)
flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {', '.join(SECTIONS)}.")
flags.DEFINE_boolean(
    "paper_scale",
    None,
    "Also VGG-19 at CIFAR size (widths 64-512) in the post and efficiency sections (batch 16; 32 "
    "with --full); several minutes. Default: with --full.",
)
flags.DEFINE_boolean(
    "imagenet_post",
    False,
    "Post section only: ResNet-50 at 224x224 (batch 8), a quarter of every prunable unit's "
    "channels killed, rejuvenated with cross-attention in two and in four convolutions, removed "
    "cross connections, and dense (the ImageNet configs' scheme choice, measured at ImageNet "
    "widths); several minutes.",
)
flags.DEFINE_string(
    "torch_python",
    None,
    "A Python interpreter with PyTorch: the efficiency section then times the equivalent PyTorch "
    "CPU steps (experiments/torch_reference.py) in a subprocess. Default: this interpreter if it "
    "imports torch, else no PyTorch comparison.",
)
flags.DEFINE_boolean(
    "imagenet_step",
    None,
    "Time one resnet18 train step at 224 (batch 8) in pipeline_images (default: with --full).",
)


def time_steps(fn: Any, state: Any, batch: dict, steps: int) -> tuple[Any, float]:
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t) / steps


def interleaved_times(
    candidates: dict[Any, tuple[Any, Any]],
    batch: dict,
    reps: int,
    steps: int,
    alternate: bool = False,
) -> dict[Any, list[float]]:
    """Seconds per step of each (step_fn, state) in every repetition, repetitions interleaved
    (with `alternate`, every other repetition runs the candidates in reverse order)."""
    states = {k: v[1] for k, v in candidates.items()}
    for k, (fn, _) in candidates.items():  # compile + warm up
        states[k], _ = time_steps(fn, states[k], batch, 2)
    times: dict[Any, list[float]] = {k: [] for k in candidates}
    order = list(candidates)
    for rep in range(reps):
        for k in reversed(order) if alternate and rep % 2 else order:
            states[k], dt = time_steps(candidates[k][0], states[k], batch, steps)
            times[k].append(dt)
    return times


def interleaved(candidates: dict[str, tuple[Any, Any]], batch: dict, reps: int, steps: int):
    """Median seconds per step of each (step_fn, state), repetitions interleaved."""
    times = interleaved_times(candidates, batch, reps, steps)
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_batch(n: int, hw: int = 28, c: int = 1, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


def make_trainer(
    model: str,
    nr: bool = True,
    scheme: str = "removed",
    dataset: str = "fashion_mnist",
    batch: int | None = None,
    conv_weight_grad: str = "auto",
    compute_dtype: str = "float32",
) -> tuple[Any, Any]:
    """A `train.Trainer` of the base config for `model` (NR on or off), and its initial state.

    `compute_dtype` is `config.compute_dtype` ("bfloat16": mixed precision)."""
    c = base_config()
    c.model, c.dataset, c.batch_size = model, dataset, batch or FLAGS.batch
    c.nr.enabled, c.nr.scheme = nr, scheme
    c.conv_weight_grad, c.compute_dtype = conv_weight_grad, compute_dtype
    trainer = train.Trainer(c, "")
    shape = nr_data.DATASET_INFO[dataset].image_shape
    state = train.init_state(trainer.model, trainer.tx, c, shape, jax.random.key(0))
    return trainer, state


def force_rejuvenation(trainer: Any, state: Any, dead_frac: float = 0.5) -> Any:
    """Kills ~dead_frac of every prunable unit's channels, then rejuvenates (U about 0.25)."""
    rng = np.random.default_rng(0)
    params = jax.device_get(state.params)
    for u in trainer.graph.prunable:
        g = np.array(params[u.name]["bn"]["scale"])
        g[rng.random(g.shape) < dead_frac] = 0.0
        g[0] = max(g[0], 0.5)
        params[u.name]["bn"]["scale"] = g
    variables = {**jax.device_get(state.variables), "params": params}
    res = nr_jax.rejuvenate(
        jax.random.key(1), trainer.model, variables, state.opt_state, trainer.tx, trainer.graph
    )
    trainer.set_widths(res.model.widths)
    v = res.variables
    state = state.replace(
        params=v["params"],
        batch_stats=v["batch_stats"],
        masks=v[nr_jax.MASKS],
        opt_state=res.opt_state,
    )
    return state, res.report
