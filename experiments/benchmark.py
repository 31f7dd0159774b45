"""Performance figures of nr_jax, measured side by side in one process (medians of interleaved
repetitions). Writes `benchmark.json` and `benchmark.md` into --out.

    python -m experiments.benchmark --out runs/benchmark            # quick CPU setting
    python -m experiments.benchmark --out runs/benchmark --paper_scale  # + VGG-19 at CIFAR size
    python -m experiments.benchmark --out runs/benchmark --full     # more repetitions, all of it

1. watching overhead: the NR train step (L1 transform + in-jit liveness/utilisation + masks)
   against the same model without NR, and against a plain Flax model of the same shapes;
2. compilations of the train/eval steps in a short run with one rejuvenation;
3. rejuvenation latency (variables + optimiser-state surgery + new graph) of full-size ResNet-50
   and DenseNet-121, no compilation involved;
4. post-rejuvenation cost: step time of the rejuvenated network with cross connections removed
   (two convolutions) and with cross-attention, against the dense network of the same allocated
   widths;
5. efficiency: achieved FLOP/s of the train step (XLA cost analysis) against a measured matmul peak
   (the best repetition of n x n matmuls, n 1024 and 2048), and the same step with XLA's own
   convolution kernel gradient instead of nr_jax's shifted matmuls (the CPU default), interleaved;
6. input pipeline throughput (Fashion-MNIST in-memory arrays) against the train step's consumption;
7. width granularity: train-step time per FLOP of a conv stack over a sweep of widths, and for each
   granularity g in {1, 2, 4, 8, 16} the expected step time when a target width is rounded up to a
   multiple of g (the measurement behind `rounded_allocation`);
8. image pipelines on fabricated files in their real formats: CIFAR-10 (python-pickle archive ->
   tfds array_record -> in-memory crop + flip + normalise) and ImageNet (tfds array_record of JPEGs
   -> decode + RandomResizedCrop 224 + flip, and Resize 256 + CentreCrop 224), with and without
   `prefetch`, against the train step's consumption (resnet_tiny_cifar; resnet18 at 224).

`--sections granularity,pipeline_images` runs only the named sections.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath
from PIL import Image

import nr_jax
from nr_jax import data as nr_data
from nr_jax import layers as nr_layers
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


def _time_steps(fn: Any, state: Any, batch: dict, steps: int) -> tuple[Any, float]:
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
        states[k], _ = _time_steps(fn, states[k], batch, 2)
    times: dict[Any, list[float]] = {k: [] for k in candidates}
    order = list(candidates)
    for rep in range(reps):
        for k in reversed(order) if alternate and rep % 2 else order:
            states[k], dt = _time_steps(candidates[k][0], states[k], batch, steps)
            times[k].append(dt)
    return times


def interleaved(candidates: dict[str, tuple[Any, Any]], batch: dict, reps: int, steps: int):
    """Median seconds per step of each (step_fn, state), repetitions interleaved."""
    times = interleaved_times(candidates, batch, reps, steps)
    return {k: statistics.median(v) for k, v in times.items()}


def _batch(n: int, hw: int = 28, c: int = 1, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, c)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


def _trainer(
    model: str,
    nr: bool = True,
    scheme: str = "removed",
    dataset: str = "fashion_mnist",
    batch: int | None = None,
) -> tuple[Any, Any]:
    c = base_config()
    c.model, c.dataset, c.batch_size = model, dataset, batch or FLAGS.batch
    c.nr.enabled, c.nr.scheme = nr, scheme
    trainer = train.Trainer(c, "")
    shape = nr_data.DATASET_INFO[dataset].image_shape
    state = train.init_state(trainer.model, trainer.tx, c, shape, jax.random.key(0))
    return trainer, state


class PlainVGG(nn.Module):
    """A plain Flax VGG with the shapes of `vgg_fmnist` (no masks, no NR)."""

    cfg: tuple = (16, 16, "M", 32, 32, "M", 64, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(v, (3, 3), padding=1, use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def plain_step(batch: dict) -> tuple[Any, Any]:
    model = PlainVGG()
    variables = jax.jit(lambda k: model.init(k, batch["image"][:1], train=False))(jax.random.key(0))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = (variables, tx.init(variables["params"]))

    @jax.jit
    def step(state: Any, batch: dict) -> tuple[Any, Any]:
        variables, opt_state = state

        def loss_fn(params: Any) -> Any:
            out, upd = model.apply(
                {**variables, "params": params}, batch["image"], mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
            return loss, upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return ({**variables, **upd, "params": params}, opt_state), {"loss": loss}

    return step, state


def watching_overhead(reps: int, steps: int) -> dict:
    """NR step against the same model without NR (and a plain Flax VGG).

    The machine's speed drifts by several percent over a minute, more than the overhead to be
    measured, so every repetition times the candidates back to back (order reversed every other
    repetition) and the overhead is the median of the per-repetition ratios.
    """
    batch = _batch(FLAGS.batch)
    out = {}
    for model in ("vgg_fmnist", "resnet_fmnist"):
        t_nr, s_nr = _trainer(model, nr=True)
        t_off, s_off = _trainer(model, nr=False)
        cands = {"nr": (t_nr.steps.train, s_nr), "no_nr": (t_off.steps.train, s_off)}
        if model == "vgg_fmnist":
            cands["plain_flax"] = plain_step(batch)
        times = interleaved_times(cands, batch, reps, steps, alternate=True)
        ratios = {
            k: [x / y for x, y in zip(times["nr"], times[k], strict=True)]
            for k in cands
            if k != "nr"
        }
        out[model] = {
            "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "repetitions": reps,
            "overhead_vs_no_nr": statistics.median(ratios["no_nr"]) - 1,
            "overhead_vs_no_nr_quartiles": [q - 1 for q in statistics.quantiles(ratios["no_nr"])],
            **(
                {"overhead_vs_plain_flax": statistics.median(ratios["plain_flax"]) - 1}
                if "plain_flax" in ratios
                else {}
            ),
        }
    return out


def _force_rejuvenation(trainer: Any, state: Any, dead_frac: float = 0.5) -> Any:
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


def compilations() -> dict:
    trainer, state = _trainer("vgg_fmnist")
    batch = _batch(FLAGS.batch)
    for epoch in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
        state = state.replace(opt_state=nr_jax.set_lambda(state.opt_state, 1e-3 * epoch))
    state, _ = _force_rejuvenation(trainer, state)
    for _ in range(2):
        for _ in range(3):
            state, _ = trainer.steps.train(state, batch)
        trainer.steps.eval(state.variables, batch)
        state = state.replace(epoch=state.epoch + 1)
    return {"width_configurations": 2, "traces": dict(trainer.counter)}


def rejuvenation_latency(reps: int) -> dict:
    out = {}
    for name in ("resnet50", "densenet121"):
        model = nr_jax.models.get(name, num_classes=1000)
        graph = nr_jax.channel_graph(model, (1, 224, 224, 3))
        rng = np.random.default_rng(0)
        variables = jax.tree.map(
            lambda s, rng=rng: rng.standard_normal(s.shape).astype(np.float32),
            graph.variable_shapes,
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


# (model, dataset, batch or None for --batch): the CPU-sized families, and VGG-19 at CIFAR size,
# whose widths (64-512) are the paper's
POST_FAMILIES = (
    ("vgg_fmnist", "fashion_mnist", None),
    ("resnet_fmnist", "fashion_mnist", None),
    ("vgg19_cifar", "cifar10", 16),  # batch 32 with --full
)


def _paper_scale_reps(batch_size: int | None, reps: int, steps: int) -> tuple[int, int]:
    """Repetitions and steps per repetition: fewer for VGG-19's slow steps (a fixed batch)."""
    return (reps, steps) if batch_size is None else (3, 2)


def _paper_scale() -> bool:
    """--paper_scale, which defaults to --full."""
    return FLAGS.paper_scale if FLAGS.paper_scale is not None else FLAGS.full


def _post_families() -> list[tuple[str, str, int | None]]:
    """The CPU-sized families; VGG-19 too with --paper_scale (default: with --full)."""
    paper = _paper_scale()
    return [
        (m, d, 32 if b and FLAGS.full else b) for m, d, b in POST_FAMILIES if paper or b is None
    ]


def post_rejuvenation_cost(reps: int, steps: int) -> dict:
    """Step time after rejuvenation at U about 0.25, per scheme, against the dense network.

    The four-convolution attention is timed with --full, and for ResNet-50 (--imagenet_post);
    VGG-19 runs the removed and dense schemes only (its steps are slow).
    """
    out = {}
    families = _post_families()
    if FLAGS.imagenet_post:
        families = [("resnet50", "imagenet2012", 8)]
    for model, dataset, batch_size in families:
        info = nr_data.DATASET_INFO[dataset]
        batch = _batch(batch_size or FLAGS.batch, info.image_shape[0], info.image_shape[2])
        schemes = ["removed", "attention", "dense"]
        if FLAGS.full or model == "resnet50":
            schemes.insert(2, "attention4")
        if model == "vgg19_cifar":
            schemes = ["removed", "dense"]
        cands, reports = {}, {}
        for scheme in schemes:
            trainer, state = _trainer(model, True, scheme, dataset, batch_size)
            # ImageNet's target is U 0.5: a quarter of the channels dead
            dead = 0.25 if model == "resnet50" else 0.5
            state, reports[scheme] = _force_rejuvenation(trainer, state, dead)
            cands[scheme] = (trainer.steps.train, state)
        report = reports["removed"]
        n_reps, n_steps = _paper_scale_reps(batch_size, reps, steps)
        times = interleaved(cands, batch, n_reps, n_steps)
        c = report.counts_after
        v = {
            "batch": batch_size or FLAGS.batch,
            "utilization": report.utilization,
            "ms_per_step": {k: 1e3 * t for k, t in times.items()},
            "removed_vs_dense": times["removed"] / times["dense"],
            "effective_macs_ratio": c.effective_macs / c.macs,
            "macs_dense": c.macs,
            "macs_removed": c.effective_macs,
        }
        if "attention" in times:
            v["attention_vs_dense"] = times["attention"] / times["dense"]
            v["attention_vs_removed"] = times["attention"] / times["removed"]
        if "attention4" in times:
            v["attention4_vs_attention"] = times["attention4"] / times["attention"]
        out[model] = v
    return out


EFFICIENCY_FAMILIES = (("resnet20_cifar", "cifar10", None),)


def matmul_peak(reps: int) -> dict:
    """GFLOP/s of jitted float32 n x n matmuls: median and best repetition per n; the peak is the
    best repetition of any n (the machine's speed drifts; a peak is what it can reach)."""
    median, best = {}, {}
    for n in (1024, 2048):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
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


def _torch_python() -> str | None:
    if FLAGS.torch_python:
        return FLAGS.torch_python
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def pytorch_reference(families: list[tuple[str, int]], reps: int, steps: int) -> dict:
    """Images/s of the equivalent PyTorch steps (`experiments/torch_reference.py`), or why not."""
    python = _torch_python()
    if python is None:
        return {"skipped": "PyTorch not installed (pass --torch_python)"}
    spec = json.dumps({"families": families, "reps": reps, "steps": steps})
    script = Path(__file__).with_name("torch_reference.py")
    done = subprocess.run([python, str(script), spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{python} {script} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def efficiency(reps: int, steps: int) -> dict:
    peak = matmul_peak(2 * reps)
    out: dict[str, Any] = {"matmul_peak_gflops": peak["gflops"], "matmul_peak": peak}
    small = [f for f in _post_families() if f[2] is None]
    paper = [f for f in _post_families() if f[2] is not None]
    extra = list(EFFICIENCY_FAMILIES) if _paper_scale() else []
    for model, dataset, batch_size in small + extra + paper:
        info = nr_data.DATASET_INFO[dataset]
        n = batch_size or FLAGS.batch
        batch = _batch(n, info.image_shape[0], info.image_shape[2])
        cands, flops = {}, 0.0
        try:
            for mode in ("xla", "auto"):
                nr_layers.set_conv_weight_grad(mode)
                trainer, state = _trainer(model, dataset=dataset, batch=batch_size)
                if mode == "auto":
                    compiled = trainer.steps.train.lower(state, batch).compile()
                    cost = compiled.cost_analysis()
                    cost = cost[0] if isinstance(cost, list) else cost
                    flops = float(cost.get("flops", 0.0))
                state, _ = _time_steps(trainer.steps.train, state, batch, 1)  # traced here
                cands[mode] = (trainer.steps.train, state)
        finally:
            nr_layers.set_conv_weight_grad("auto")
        n_reps, n_steps = _paper_scale_reps(batch_size, reps, steps)
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


def input_pipeline(step_images_per_s: float | None) -> dict:
    images = np.random.default_rng(0).integers(0, 255, (20_000, 28, 28, 1), dtype=np.uint8)
    labels = np.zeros(20_000, np.int32)
    info = nr_data.DATASET_INFO["fashion_mnist"]
    out = {}
    for augment in (False, True):
        t = time.perf_counter()
        n = 0
        for b in nr_data.prefetch(
            nr_data.train_batches(
                images, labels, FLAGS.batch, seed=0, epoch=0, augment=augment, info=info
            )
        ):
            n += len(b["label"])
        rate = n / (time.perf_counter() - t)
        out[f"augment={augment}"] = {
            "images_per_s": rate,
            "vs_step": rate / step_images_per_s if step_images_per_s else None,
        }
    return out


# --------------------------------------------------------------------------------------
# 7. Width granularity
# --------------------------------------------------------------------------------------

GRANULARITIES = (1, 2, 4, 8, 16)
_STACK_BATCH, _STACK_DEPTH, _STACK_HW = 32, 2, 16  # maps after the stride-2 stem
_BOOTSTRAP = 1000


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
    batch = _batch(_STACK_BATCH, hw=32, c=3)
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
    for _ in range(_BOOTSTRAP):
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
        "bootstrap_wins": {str(g): n / _BOOTSTRAP for g, n in wins.items()},
        "recommended_at_equal_flops": best_equal,
        "preset": train.allocation_name(_improved_config()),
    }


def _improved_config() -> Any:
    c = base_config()
    c.preset = "improved"
    return c


# --------------------------------------------------------------------------------------
# 8. Image pipelines on fabricated CIFAR-10 and ImageNet files
# --------------------------------------------------------------------------------------

_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_IMAGENET_SIZES = (
    (375, 500),
    (500, 375),
    (333, 500),
    (500, 333),
    (400, 500),
    (375, 375),
    (281, 500),
    (500, 400),
)
_IMAGENET_BATCH = 32
H100_RESNET50_IMAGES_PER_S = 2500  # what one H100 consumes training ResNet-50 (not measured here)


def _fabricate_cifar10(source: Path, per_file: int) -> None:
    """Writes `cifar-10-python.tar.gz` as its authors distribute it (uint8 CHW pickle rows)."""
    rng = np.random.default_rng(0)
    folder = source / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in _CIFAR_FILES:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, per_file)],
            b"filenames": [f"img_{i}.png".encode() for i in range(per_file)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with tarfile.open(source / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(folder)


def _natural_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth random field plus noise at JPEG quality 90: about 100 KB at 500x375, near the
    mean ImageNet training file (about 110 KB), so decoding costs about what it costs there."""
    low = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(base + rng.normal(0.0, 24.0, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _FabricatedImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for tfds' `imagenet2012` (same name, version and features), prepared without
    TensorFlow; its records cycle through a pool of distinct JPEGs of ImageNet-like sizes."""

    name = nr_data.IMAGENET_NAME
    VERSION = tfds.core.Version("5.1.0")
    code_path = epath.Path(__file__)
    NUM: ClassVar[dict[str, int]] = {"train": 256, "validation": 64}
    POOL = 32

    def _info(self) -> tfds.core.DatasetInfo:
        return nr_data.imagenet2012_info(self)

    def _split_generators(self, dl_manager: object) -> dict:
        return {split: self._generate_examples(split) for split in self.NUM}

    def _generate_examples(self, split: str) -> Iterable[tuple[int, dict]]:
        rng = np.random.default_rng(len(split))
        sizes = itertools.cycle(_IMAGENET_SIZES)
        pool = [_natural_jpeg(rng, *next(sizes)) for _ in range(self.POOL)]
        for i in range(self.NUM[split]):
            yield i, {"image": pool[i % self.POOL], "label": i % 1000, "file_name": f"{i}.JPEG"}


def _count(batch: dict) -> int:
    return int(np.sum(batch["mask"])) if "mask" in batch else len(batch["label"])


def _pipeline_rates(configs: dict[str, Callable[[int], Iterable[dict]]], reps: int) -> dict:
    """Median images/s of each iterator factory (called with the epoch), repetitions
    interleaved after one untimed pass of each."""
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(reps + 1):
        for k, make in configs.items():
            t = time.perf_counter()
            n = sum(_count(b) for b in make(rep))
            if rep:
                rates[k].append(n / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def _fed_rates(
    trainer: Any,
    state: Any,
    make: Callable[[int], Iterable[dict]],
    steps: int,
    reps: int,
) -> dict:
    """Images/s of the train step alone (one batch kept on the device) and fed by `make` with
    and without `prefetch`; repetitions interleaved."""
    holder = {"state": state}
    fixed = jax.device_put(next(iter(make(0))))

    def run(batches: Iterable[dict]) -> float:
        t = time.perf_counter()
        n = 0
        for batch in itertools.islice(batches, steps):
            holder["state"], metrics = trainer.steps.train(holder["state"], batch)
            n += _count(batch)
        jax.block_until_ready(metrics)
        return n / (time.perf_counter() - t)

    def prefetched(epoch: int) -> float:
        batches = nr_data.prefetch(make(epoch))
        try:
            return run(batches)
        finally:
            batches.close()

    modes = {
        "step_alone": lambda epoch: run(itertools.repeat(fixed)),
        "fed_no_prefetch": lambda epoch: run(make(epoch)),
        "fed_prefetch": prefetched,
    }
    run(itertools.repeat(fixed, 2))  # compile + warm up
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(reps):
        for k, mode in modes.items():
            rates[k].append(mode(rep + 1))
    return {k: statistics.median(v) for k, v in rates.items()}


def image_pipelines(reps: int, steps: int) -> dict:
    out: dict[str, Any] = {"host_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="nr_jax_bench_") as tmp:
        root = Path(tmp)
        # CIFAR-10: python-pickle archive -> local tfds builder (array_record) -> .npz cache.
        per_file = 2000 if FLAGS.full else 1000
        _fabricate_cifar10(root / "cifar_src", per_file)
        t = time.perf_counter()
        images, labels = nr_data.load_arrays(
            "cifar10", "train", data_dir=root / "tfds", source_dir=root / "cifar_src"
        )
        first_load = time.perf_counter() - t
        t = time.perf_counter()
        images, labels = nr_data.load_arrays("cifar10", "train", data_dir=root / "tfds")
        cached_load = time.perf_counter() - t
        info = nr_data.DATASET_INFO["cifar10"]

        def cifar(epoch: int, batch: int = FLAGS.batch) -> Iterable[dict]:
            return nr_data.train_batches(
                images, labels, batch, seed=0, epoch=epoch, augment=True, info=info
            )

        rates = _pipeline_rates(
            {"no_prefetch": cifar, "prefetch": lambda e: nr_data.prefetch(cifar(e))}, reps
        )
        trainer, state = _trainer("resnet_tiny_cifar", dataset="cifar10")
        fed = _fed_rates(trainer, state, cifar, steps=steps, reps=max(3, reps // 2))
        out["cifar10"] = {
            "examples": len(labels),
            "first_load_s": first_load,
            "cached_load_s": cached_load,
            "images_per_s": rates,
            "step_model": f"resnet_tiny_cifar, NR on, batch {FLAGS.batch}",
            "step_images_per_s": fed,
            "vs_step": {k: v / fed["step_alone"] for k, v in rates.items()},
        }

        # ImageNet: tfds `imagenet2012` in array_record with the JPEGs left encoded.
        num_train = 512 if FLAGS.full else 256
        _FabricatedImagenet.NUM = {"train": num_train, "validation": 128}
        data_dir = root / "imagenet"
        t = time.perf_counter()
        _FabricatedImagenet(
            data_dir=os.fspath(data_dir), file_format="array_record"
        ).download_and_prepare()
        prepare_s = time.perf_counter() - t
        src = nr_data.load_imagenet_source("train", data_dir=data_dir)
        val = nr_data.load_imagenet_source("validation", data_dir=data_dir)
        info = nr_data.DATASET_INFO[nr_data.IMAGENET_NAME]
        jpeg_kb = statistics.mean(len(src[i]["image"]) for i in range(_FabricatedImagenet.POOL))

        def imagenet(
            workers: int | None = None, prefetched: bool = False, evaluation: bool = False
        ) -> Callable[[int], Iterable[dict]]:
            def make(epoch: int) -> Iterable[dict]:
                if not evaluation:
                    it = nr_data.train_batches_from_source(
                        src, _IMAGENET_BATCH, seed=0, epoch=epoch, info=info, num_workers=workers
                    )
                else:
                    it = nr_data.eval_batches_from_source(
                        val, _IMAGENET_BATCH, info=info, num_workers=workers
                    )
                return nr_data.prefetch(it) if prefetched else it

            return make

        workers = max(1, os.cpu_count() or 1)  # the iterators' default num_workers
        rates = _pipeline_rates(
            {
                f"train_{workers}_threads": imagenet(),
                f"train_{workers}_threads_prefetch": imagenet(prefetched=True),
                "train_1_thread": imagenet(workers=1),
                f"eval_{workers}_threads": imagenet(evaluation=True),
                f"eval_{workers}_threads_prefetch": imagenet(prefetched=True, evaluation=True),
            },
            max(2, reps // 2),
        )
        per_core = rates["train_1_thread"]
        imagenet_out: dict[str, Any] = {
            "examples": {"train": num_train, "validation": 128},
            "prepare_s": prepare_s,
            "mean_jpeg_kb": jpeg_kb / 1e3,
            "images_per_s": rates,
            "train_images_per_s_per_core": per_core,
            "h100_resnet50_images_per_s": H100_RESNET50_IMAGES_PER_S,
            "cores_for_h100_resnet50": H100_RESNET50_IMAGES_PER_S / per_core,
        }
        if FLAGS.imagenet_step or (FLAGS.imagenet_step is None and FLAGS.full):
            batch = next(
                iter(nr_data.train_batches_from_source(src, 8, seed=0, epoch=0, info=info))
            )
            t = time.perf_counter()
            trainer, state = _trainer("resnet18", dataset=nr_data.IMAGENET_NAME, batch=8)
            state, _ = _time_steps(trainer.steps.train, state, batch, 1)  # compile + first step
            setup_s = time.perf_counter() - t
            dts = []
            for _ in range(3 if FLAGS.full else 1):
                state, dt = _time_steps(trainer.steps.train, state, batch, 1)
                dts.append(dt)
            step_rate = 8 / statistics.median(dts)
            imagenet_out |= {
                "step_model": "resnet18, NR on, batch 8, 224x224",
                "step_setup_s": setup_s,
                "step_images_per_s": step_rate,
                "vs_step": {k: v / step_rate for k, v in rates.items()},
            }
        out["imagenet"] = imagenet_out
    return out


def _markdown_granularity(gr: dict) -> list[str]:
    lo, hi = gr["targets"]
    wins = ", ".join(f"g={g} {100 * v:.0f}%" for g, v in gr["bootstrap_wins"].items())
    lines = [
        "",
        f"Width granularity: {gr['setup']}; target widths {lo}-{hi}, "
        f"{gr['compilations']} compilations in {gr['compile_seconds']:.0f} s.",
        "",
        "| granularity g | targets that are multiples of g | time/FLOP of those vs all | "
        "same, vs the width trend | extra FLOPs, rounding up | expected step time, rounding up "
        "(vs g=1) |",
        "|---|---|---|---|---|---|",
    ]
    for g, v in gr["granularity"].items():
        lines.append(
            f"| {g} | {v['widths']} | {v['time_per_flop_vs_all']:.2f} | "
            f"{v['time_per_flop_vs_trend']:.2f} | {100 * v['extra_flops_rounding_up']:+.1f}% | "
            f"{v['expected_time_vs_g1']:.2f} |"
        )
    lines += [
        "",
        f"Recommended granularity (least expected step time for a uniformly random target width "
        f"in {lo}-{hi}, rounded up): **{gr['recommended']}**; at an equal FLOP budget (time per "
        f"FLOP against the width trend alone): {gr['recommended_at_equal_flops']}. Improved "
        f"preset today: {gr['preset']}. Share of {_BOOTSTRAP} bootstrap resamples of the "
        f"repetitions in which each g has the least expected time: {wins}.",
        "",
        "Time per FLOP by width, relative to the mean over the targets and to the width trend:",
        "",
    ]
    widths = list(gr["widths"].items())
    for k in range(0, len(widths), 16):
        row = widths[k : k + 16]
        lines += [
            "| width | " + " | ".join(w for w, _ in row) + " |",
            "|---" * (len(row) + 1) + "|",
            "| vs mean | " + " | ".join(f"{v['time_per_flop_vs_mean']:.2f}" for _, v in row) + " |",
            "| vs trend | "
            + " | ".join(f"{v['time_per_flop_vs_trend']:.2f}" for _, v in row)
            + " |",
            "",
        ]
    return lines[:-1]


def _markdown_images(pi: dict) -> list[str]:
    c, im = pi["cifar10"], pi["imagenet"]
    step_c = c["step_images_per_s"]
    lines = [
        "",
        f"Image pipelines on fabricated files ({pi['host_cores']} host cores). CIFAR-10: "
        f"{c['examples']:,} training images from a python-pickle archive, first load (tfds "
        f"array_record + .npz cache) {c['first_load_s']:.1f} s, cached load "
        f"{c['cached_load_s']:.2f} s; batches of {FLAGS.batch} with crop + flip + normalise. "
        f"ImageNet: tfds `imagenet2012` in array_record, {im['examples']['train']} training / "
        f"{im['examples']['validation']} validation JPEGs of ImageNet-like sizes (mean "
        f"{im['mean_jpeg_kb']:.0f} KB), batches of {_IMAGENET_BATCH}.",
        "",
        "| image pipeline | images/s | x train step consumption |",
        "|---|---|---|",
    ]
    for k, v in c["images_per_s"].items():
        lines.append(f"| cifar10 train, {k} | {v:,.0f} | {c['vs_step'][k]:,.0f}x |")
    for k, v in im["images_per_s"].items():
        what = "RandomResizedCrop 224 + flip" if k.startswith("train") else "Resize 256 + crop 224"
        ratio = f"{im['vs_step'][k]:.1f}x" if "vs_step" in im else "-"
        lines.append(f"| imagenet {k.replace('_', ' ')} ({what}) | {v:,.0f} | {ratio} |")
    lines += [
        "",
        f"Train step consumption: {c['step_model']}: {step_c['step_alone']:.0f} images/s alone, "
        f"{step_c['fed_no_prefetch']:.0f} fed by the CIFAR pipeline without prefetch, "
        f"{step_c['fed_prefetch']:.0f} with prefetch.",
    ]
    if "step_images_per_s" in im:
        lines.append(
            f"{im['step_model']}: {im['step_images_per_s']:.1f} images/s (setup and compile "
            f"{im['step_setup_s']:.0f} s)."
        )
    lines.append(
        f"ImageNet training decode per host core: {im['train_images_per_s_per_core']:.0f} "
        f"images/s; ResNet-50 on one H100 consumes about {im['h100_resnet50_images_per_s']:,} "
        f"images/s, i.e. about {im['cores_for_h100_resnet50']:.0f} such cores per GPU."
    )
    return lines


def markdown(r: dict) -> str:
    lines = [f"Hardware: {r['hardware']}; batch {r['batch']}; jax {r['jax']}."]
    if "watching" in r:
        lines += [
            "",
            "| watching overhead | NR step ms | no-NR step ms | plain Flax ms | NR vs no-NR "
            "(median of paired ratios) | quartiles |",
            "|---|---|---|---|---|---|",
        ]
        for m, v in r["watching"].items():
            ms = v["ms_per_step"]
            plain = f"{ms['plain_flax']:.1f}" if "plain_flax" in ms else "-"
            lines.append(
                f"| {m} | {ms['nr']:.1f} | {ms['no_nr']:.1f} | {plain} | "
                f"{100 * v['overhead_vs_no_nr']:+.1f}% | "
                + " / ".join(f"{100 * q:+.1f}%" for q in v["overhead_vs_no_nr_quartiles"])
                + " |"
            )
    if "compilations" in r:
        lines += [
            "",
            f"Compilations in a run with one rejuvenation (2 width configurations): "
            f"{r['compilations']['traces']}",
        ]
    if "latency" in r:
        lines += [
            "",
            "| rejuvenation latency | median s | min s | first call s | U | params after |",
            "|---|---|---|---|---|---|",
        ]
        for m, v in r["latency"].items():
            lines.append(
                f"| {m} | {v['seconds_median']:.2f} | {v.get('seconds_min', float('nan')):.2f} | "
                f"{v.get('seconds_first_call', float('nan')):.2f} | {v['utilization']:.3f} | "
                f"{v['params_after']:,} |"
            )
    if "post" in r:
        lines += [
            "",
            "| post-rejuvenation step | batch | U | removed ms | attention ms (2 convs) | "
            "attention ms (4 convs) | dense ms | removed/dense | attention/dense | "
            "effective MACs/dense |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in r["post"].items():
            ms = v["ms_per_step"]
            f = lambda key, d=ms: f"{d[key]:.1f}" if key in d else "-"  # noqa: E731
            att = f"{v['attention_vs_dense']:.2f}" if "attention_vs_dense" in v else "-"
            lines.append(
                f"| {m} | {v.get('batch', r['batch'])} | {v['utilization']:.3f} | "
                f"{f('removed')} | {f('attention')} | {f('attention4')} | {f('dense')} | "
                f"{v['removed_vs_dense']:.2f} | {att} | {v['effective_macs_ratio']:.2f} |"
            )
    if "efficiency" in r:
        e = r["efficiency"]
        lines += [
            "",
            f"Matmul peak: {e['matmul_peak_gflops']:.0f} GFLOP/s (best repetition; medians by n: "
            + ", ".join(
                f"{n}: {g:.0f}"
                for n, g in e.get("matmul_peak", {}).get("gflops_median_by_n", {}).items()
            )
            + ")",
            "",
            "| efficiency | batch | images/s | achieved GFLOP/s | fraction of peak | "
            "step ms | with XLA's kernel gradient ms | speed-up | PyTorch images/s | vs PyTorch |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in (k for k in e if not k.startswith("matmul_peak") and k != "pytorch"):
            v = e[m]
            xla = v.get("ms_per_step_xla_kernel_grad")
            xla_ms, speedup = "-", "-"
            if xla is not None:
                xla_ms, speedup = f"{xla:.1f}", f"{v['speedup_vs_xla_kernel_grad']:.2f}x"
            lines.append(
                f"| {m} | {v.get('batch', r['batch'])} | {v['images_per_s']:.0f} | "
                f"{v['achieved_gflops']:.1f} | {100 * v['fraction_of_peak']:.0f}% | "
                f"{v['ms_per_step']:.1f} | {xla_ms} | {speedup} | "
                f"{v.get('pytorch_images_per_s', float('nan')):.0f} | "
                f"{v.get('vs_pytorch', float('nan')):.2f}x |"
            )
        ref = e.get("pytorch", {})
        lines += [
            "",
            f"PyTorch: {ref['skipped']}"
            if "skipped" in ref
            else f"PyTorch {ref.get('torch')} CPU, {ref.get('threads')} threads, eager, the faster "
            "of NCHW and channels-last, same nets and optimiser, timed after the JAX steps.",
        ]
    if "pipeline" in r:
        lines += ["", "| input pipeline | images/s | x step consumption |", "|---|---|---|"]
        for k, v in r["pipeline"].items():
            ratio = f"{v['vs_step']:.0f}x" if v["vs_step"] is not None else "-"
            lines.append(f"| {k} | {v['images_per_s']:,.0f} | {ratio} |")
    if "granularity" in r:
        lines += _markdown_granularity(r["granularity"])
    if "pipeline_images" in r:
        lines += _markdown_images(r["pipeline_images"])
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("nr_jax").setLevel(logging.WARNING)
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    os.makedirs(FLAGS.out, exist_ok=True)
    reps, steps = (7, 10) if FLAGS.full else (3, 5)
    t0 = time.time()
    r: dict[str, Any] = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}",
        "batch": FLAGS.batch,
        "jax": jax.__version__,
        "load_average_start": os.getloadavg(),
        "section_seconds": {},
    }
    step_rate = None
    sections: dict[str, Callable[[], Any]] = {
        "watching": lambda: watching_overhead(25 if FLAGS.full else 10, 3),
        "compilations": compilations,
        "latency": lambda: rejuvenation_latency(9 if FLAGS.full else 5),
        "post": lambda: post_rejuvenation_cost(reps, steps),
        "efficiency": lambda: efficiency(reps, steps),
        "pipeline": lambda: input_pipeline(step_rate),
        "granularity": lambda: width_granularity(
            range(25, 81) if FLAGS.full else range(33, 65), 9 if FLAGS.full else 5, 1
        ),
        "pipeline_images": lambda: image_pipelines(reps, steps),
    }
    for name in SECTIONS:
        if name not in FLAGS.sections:
            continue
        if name == "pipeline" and "efficiency" in r:
            step_rate = r["efficiency"]["vgg_fmnist"]["images_per_s"]
        t = time.time()
        r[name] = sections[name]()
        r["section_seconds"][name] = time.time() - t
        logging.info("section %s: %.0f s", name, r["section_seconds"][name])
    r["wall_s"] = time.time() - t0
    r["load_average_end"] = os.getloadavg()
    with open(os.path.join(FLAGS.out, "benchmark.json"), "w") as f:
        json.dump(r, f, indent=1)
    load = ", ".join(f"{a:.1f}" for a in r["load_average_end"])
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items())
    md = markdown(r) + (
        f"\n\nBenchmark wall time: {r['wall_s']:.0f} s ({seconds}); load average at the end "
        f"(1, 5, 15 min): {load}\n"
    )
    with open(os.path.join(FLAGS.out, "benchmark.md"), "w") as f:
        f.write(md)
    print(md)  # the summary, for people


if __name__ == "__main__":
    app.run(main)
