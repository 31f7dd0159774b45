"""Section `export`: inference time of the compact export against the training form.

Runs if `nr_jax.export` exists (issue 16 item 3: `nr_jax.export(model, variables)` returns the
plain network and its variables; `nr_jax.export_inference` serialises it), else it is skipped as
"not available". The network is rejuvenated first (half of every unit's channels dead, cross
connections removed), so the export has split units to turn into separate convolutions. Both
forms are jitted; their eval-mode outputs are compared, then timed in interleaved repetitions.
"""

from __future__ import annotations

import importlib
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import nr_jax
from experiments.accelerator.deadline import Deadline, SkipSection
from experiments.accelerator.settings import Setting
from experiments.benchmark.common import (
    force_rejuvenation,
    interleaved,
    make_trainer,
    synthetic_batch,
)
from nr_jax import data as nr_data

TITLE = "Compact export: inference time"


def export_api() -> tuple[Callable[..., Any], Callable[..., Any] | None] | None:
    """(export, export_inference or None) if `nr_jax.export` exists, else None.

    `nr_jax.export` may be the function itself (re-exported by `nr_jax`) or a module holding it.
    """
    try:
        api = importlib.import_module("nr_jax").export
    except AttributeError:
        try:
            api = importlib.import_module("nr_jax.export")
        except ImportError:
            return None
    if isinstance(api, types.ModuleType):
        export, inference = getattr(api, "export", None), getattr(api, "export_inference", None)
    else:
        export, inference = api, getattr(nr_jax, "export_inference", None)
    return (export, inference) if callable(export) else None


def _as_step(infer: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, dict], tuple]:
    """An inference function in the (state, batch) -> (state, out) form of the step timers."""
    return lambda variables, batch: (variables, infer(variables, batch["image"]))


def run(setting: Setting, deadline: Deadline, result: dict[str, Any]) -> None:
    api = export_api()
    if api is None:
        raise SkipSection("not available: nr_jax.export does not exist in this checkout")
    export, export_inference = api
    model, dataset, n = setting.export_family
    info = nr_data.DATASET_INFO[dataset]
    batch = synthetic_batch(n, info.image_shape[0], info.image_shape[2], info.num_classes)
    trainer, state = make_trainer(model, True, "removed", dataset, n)
    state, report = force_rejuvenation(trainer, state, setting.dead_frac)
    variables = state.variables
    deadline.check("export")
    t = time.perf_counter()
    net, net_vars = export(trainer.model, variables)
    result.update(model=model, batch=n, utilization=report.utilization)
    result["export_s"] = time.perf_counter() - t
    train_form = jax.jit(lambda v, x: nr_jax.predict(trainer.model.apply(v, x, train=False)))
    compact = jax.jit(lambda v, x: net.apply(v, x))
    a, b = train_form(variables, batch["image"]), compact(net_vars, batch["image"])
    result["max_abs_difference"] = float(jnp.max(jnp.abs(a - b)))
    result["max_abs_output"] = float(jnp.max(jnp.abs(a)))
    cands = {
        "training_form": (_as_step(train_form), variables),
        "exported": (_as_step(compact), net_vars),
    }
    if export_inference is not None:
        deadline.check("serialising")
        t = time.perf_counter()
        blob = export_inference(net, net_vars, batch["image"].shape)
        exported = jax.export.deserialize(blob)
        result.update(serialise_s=time.perf_counter() - t, serialised_bytes=len(blob))
        cands["serialised"] = (_as_step(lambda v, x: exported.call(x)), None)
    deadline.check("timing")
    times = interleaved(cands, batch, setting.reps, max(setting.steps, 3))
    result["ms_per_batch"] = {k: 1e3 * v for k, v in times.items()}
    result["exported_vs_training_form"] = times["exported"] / times["training_form"]


def summary(result: dict[str, Any]) -> str:
    return (
        f"{result['model']} batch {result['batch']}: exported / training form "
        f"{result['exported_vs_training_form']:.2f}, max |difference| "
        f"{result['max_abs_difference']:.2e} of max |output| {result['max_abs_output']:.2e}"
    )


def markdown(result: dict[str, Any]) -> list[str]:
    ms = result["ms_per_batch"]
    return [
        f"{result['model']}, batch {result['batch']}, rejuvenated at U "
        f"{result['utilization']:.3f} (removed scheme); export {result['export_s']:.1f} s.",
        "",
        "| " + " | ".join(f"{k} ms" for k in ms) + " | exported / training form |",
        "|---" * (len(ms) + 1) + "|",
        "| "
        + " | ".join(f"{v:.2f}" for v in ms.values())
        + f" | {result['exported_vs_training_form']:.2f} |",
    ]
