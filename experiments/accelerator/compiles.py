"""Section `compiles`: the train and eval steps are traced once per width configuration, and
nothing is compiled again when only values change (LR, λ, epoch), before and after a
rejuvenation.

Traces are the trainer's counters (`nr_jax.steps.Steps`); XLA compilations are counted with
`jax.monitoring`'s backend-compile events, per phase of the run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax

import nr_jax
from experiments.accelerator.deadline import Deadline
from experiments.accelerator.settings import Setting
from experiments.benchmark.common import force_rejuvenation, make_trainer, synthetic_batch
from nr_jax import data as nr_data
from nr_jax import train

TITLE = "Compilations per width configuration"
_COMPILE_EVENT = "backend_compile"  # jax's "/jax/core/compile/backend_compile_duration"


class CompileLog:
    """Counts XLA backend compilations (and their seconds) while registered (`watching`)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.active = False

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if self.active and _COMPILE_EVENT in event:
            self.events.append((str(kwargs.get("fun_name", "?")), float(duration)))

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Counts inside the block (a jax without `unregister_...` keeps a silent listener)."""
        jax.monitoring.register_event_duration_secs_listener(self)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
            if unregister is not None:
                unregister(self)


def _steps(trainer: Any, state: Any, batch: dict, n: int) -> Any:
    """`n` train steps and one evaluation, finished on the device."""
    for _ in range(n):
        state, metrics = trainer.steps.train(state, batch)
    jax.block_until_ready((metrics, trainer.steps.eval(state.variables, batch)))
    return state


def _new_values(state: Any, epoch_lr: float, lam: float) -> Any:
    """A new epoch: the epoch counter, the LR and λ changed (values only)."""
    opt_state = train.set_learning_rate(state.opt_state, epoch_lr)
    opt_state = nr_jax.set_lambda(opt_state, lam)
    return state.replace(epoch=state.epoch + 1, opt_state=opt_state)


def run(setting: Setting, deadline: Deadline, result: dict[str, Any]) -> None:
    """Five phases, each with its traces and compilations: first steps, the same widths with new
    values, the rejuvenation, first steps of the new widths, those widths with new values."""
    model, dataset, n = setting.compile_family
    info = nr_data.DATASET_INFO[dataset]
    log = CompileLog()
    result.update(model=model, batch=n, phases={})
    with log.watching():
        trainer, state = make_trainer(model, dataset=dataset, batch=n)
        batch = synthetic_batch(n, info.image_shape[0], info.image_shape[2], info.num_classes)

        def phase(name: str, fn: Any) -> Any:
            deadline.check(name)
            start, t = len(log.events), time.perf_counter()
            out = fn()
            new = log.events[start:]
            result["phases"][name] = {
                "traces": dict(trainer.counter),
                "backend_compiles": len(new),
                "compile_s": round(sum(d for _, d in new), 3),
                "seconds": round(time.perf_counter() - t, 3),
            }
            return out

        state = phase("first_widths", lambda: _steps(trainer, state, batch, 3))
        state = _new_values(state, 0.05, 2e-4)
        state = phase("first_widths_new_values", lambda: _steps(trainer, state, batch, 3))
        state, report = phase(
            "rejuvenation", lambda: force_rejuvenation(trainer, state, setting.dead_frac)
        )
        state = phase("new_widths", lambda: _steps(trainer, state, batch, 3))
        state = _new_values(state, 0.01, 0.0)
        phase("new_widths_new_values", lambda: _steps(trainer, state, batch, 3))
    p = result["phases"]
    result["utilization"] = report.utilization
    result["traces"] = dict(trainer.counter)
    result["one_trace_per_width_configuration"] = trainer.counter == {"train": 2, "eval": 2}
    result["compiles_on_value_changes"] = (
        p["first_widths_new_values"]["backend_compiles"]
        + p["new_widths_new_values"]["backend_compiles"]
    )


def summary(result: dict[str, Any]) -> str:
    ok = "yes" if result["one_trace_per_width_configuration"] else "NO"
    return (
        f"{result['model']}: traces {result['traces']} over 2 width configurations (one each: "
        f"{ok}); compilations on value changes: {result['compiles_on_value_changes']}"
    )


def markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{result['model']}, batch {result['batch']}, rejuvenated at U "
        f"{result['utilization']:.3f}.",
        "",
        "| phase | traces so far | XLA compilations | compile s | phase s |",
        "|---|---|---|---|---|",
    ]
    for name, v in result["phases"].items():
        lines.append(
            f"| {name} | {v['traces']} | {v['backend_compiles']} | {v['compile_s']:.1f} | "
            f"{v['seconds']:.1f} |"
        )
    return lines
