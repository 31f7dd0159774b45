"""Flags and the run of the accelerator check (`python -m experiments.accelerator_check`).

Refusals (exit status 2, one line): an unknown section in --only; no GPU when the full check is
asked for on a machine whose jax sees only CPU devices; the Fashion-MNIST subset or the CPU
reference file missing. A section that fails is reported and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

import jax
import psutil
from absl import app, flags

from experiments.accelerator import (
    compiles,
    eval_short,
    export_timing,
    post_cost,
    pytest_subset,
    throughput,
)
from experiments.accelerator import report as report_file
from experiments.accelerator.deadline import Deadline
from experiments.accelerator.runner import Section, run_sections, watchdog
from experiments.accelerator.settings import CPU_SMOKE, GPU, SECTIONS, Setting
from experiments.benchmark.common import FLAGS  # shares its --out flag
from nr_jax.data import DatasetNotFoundError

FLAGS.set_default("out", "runs/accelerator_check")
flags.DEFINE_boolean("cpu_smoke", False, "The reduced CPU mode: tiny models and batches.")
flags.DEFINE_boolean(
    "allow_cpu",
    False,
    "Run the full sizes on whatever device jax has, a CPU included, with no per-section limits "
    "(every section may use the whole --deadline_s): for the CPU reference of eval_short, "
    "`--allow_cpu --only eval_short --deadline_s 7200`.",
)
flags.DEFINE_float("deadline_s", 280.0, "Overall deadline, seconds from the process start.")
flags.DEFINE_list("only", list(SECTIONS), f"Sections to run, of {', '.join(SECTIONS)}.")
flags.DEFINE_string(
    "fmnist_npz",
    ".accel/fmnist_subset.npz",
    "The Fashion-MNIST subset of eval_short (python -m experiments.accelerator_bundle). With "
    "--cpu_smoke: synthetic images unless this flag is given.",
)
flags.DEFINE_string(
    "xla_cache",
    None,
    "Persistent XLA compilation cache directory (sections reuse identical compilations). "
    "Default: a temporary one with --cpu_smoke, none otherwise.",
)
flags.DEFINE_string(
    "cpu_reference",
    "",
    "accelerator_check.json of a CPU run of eval_short in the same setting, to compare with.",
)

DESCRIBERS = {
    "tests": pytest_subset,
    "compiles": compiles,
    "throughput": throughput,
    "post": post_cost,
    "eval_short": eval_short,
    "export": export_timing,
}
ALARM_GRACE_S, WATCHDOG_GRACE_S = 10.0, 30.0
VERSIONS = (
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "numpy",
    "grain",
    "tensorflow-datasets",
    "ml_collections",
    "protobuf",
)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_info() -> dict[str, Any]:
    """The device, jax and library versions, and the settings that change the figures."""
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in VERSIONS},
        "host_cores": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": _config("jax_default_matmul_precision"),
    }


def _config(name: str) -> Any:
    """A jax config value, or None where this jax version has no such option."""
    try:
        return getattr(jax.config, name)
    except Exception:  # noqa: BLE001 - how config values are read changes between versions
        return None


def _subset_path(selected: list[str]) -> str | None:
    """The subset file of eval_short; None for synthetic images (--cpu_smoke without an explicit
    --fmnist_npz)."""
    path = FLAGS.fmnist_npz
    if "eval_short" not in selected or (FLAGS.cpu_smoke and not FLAGS["fmnist_npz"].present):
        return None
    if not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"--fmnist_npz {path}: no such file (the Fashion-MNIST subset of eval_short). Make it "
            "here with `python -m experiments.accelerator_bundle --dest .accel` and carry .accel"
        )
    return path


def _cpu_reference() -> dict[str, Any] | None:
    """The eval_short result of --cpu_reference (with its device), or None."""
    if not FLAGS.cpu_reference:
        return None
    if not os.path.isfile(FLAGS.cpu_reference):
        raise DatasetNotFoundError(f"--cpu_reference {FLAGS.cpu_reference}: no such file")
    with open(FLAGS.cpu_reference) as f:
        ref = json.load(f)
    section = ref.get("sections", {}).get("eval_short", {})
    if section.get("status") != "ok":
        raise app.UsageError(
            f"--cpu_reference {FLAGS.cpu_reference}: its eval_short section is "
            f"{section.get('status', 'missing')}, not ok"
        )
    return {**section["result"], "device": ref.get("device", {}).get("device_kind")}


def counted(run: Any) -> Any:
    """`run(deadline, result)` that also records its XLA compilations (cache hits included) and
    their seconds in `result` (`xla_compilations`, `xla_compile_s`)."""

    def wrapped(deadline: Deadline, result: dict[str, Any]) -> None:
        log = compiles.CompileLog()
        try:
            with log.watching():
                run(deadline, result)
        finally:
            result["xla_compilations"] = len(log.events)
            result["xla_compile_s"] = round(sum(d for _, d in log.events), 2)

    return wrapped


def sections(setting: Setting, selected: list[str], unlimited: bool) -> list[Section]:
    """The sections in priority order (`unlimited`: each may use the whole deadline)."""
    runs = {
        "tests": functools.partial(pytest_subset.run, setting),
        "compiles": functools.partial(compiles.run, setting),
        "throughput": functools.partial(throughput.run, setting),
        "post": functools.partial(post_cost.run, setting),
        "eval_short": functools.partial(
            eval_short.run,
            setting,
            subset_path=_subset_path(selected),
            cpu_reference=_cpu_reference(),
        ),
        "export": functools.partial(export_timing.run, setting),
    }
    out = []
    for name in SECTIONS:
        budget = FLAGS.deadline_s if unlimited else setting.budgets[name]
        limit = math.inf if unlimited else setting.max_seconds.get(name, math.inf)
        skip = "" if name in selected else "not selected (--only)"
        out.append(Section(name, counted(runs[name]), budget, limit, skip))
    return out


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("nr_jax").setLevel(logging.WARNING)
    unknown = sorted(set(FLAGS.only) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"unknown sections {unknown} in --only; known: {', '.join(SECTIONS)}")
    backend = jax.default_backend()
    if backend == "cpu" and not (FLAGS.cpu_smoke or FLAGS.allow_cpu):
        raise app.UsageError(
            f"no GPU: jax {jax.__version__} sees only CPU devices (JAX_PLATFORMS="
            f"{os.environ.get('JAX_PLATFORMS', '')!r}); run this on the GPU machine, or pass "
            "--cpu_smoke (the reduced CPU mode) or --allow_cpu (the full sizes on a CPU)"
        )
    setting = CPU_SMOKE if FLAGS.cpu_smoke else GPU
    with contextlib.ExitStack() as stack:
        cache = FLAGS.xla_cache
        if cache is None and FLAGS.cpu_smoke:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="nr_jax_xla_"))
        if cache:
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        _check(setting, backend)


def _check(setting: Setting, backend: str) -> None:
    """Runs the check: the sections, the goals, the report; exit status 1 if a section failed."""
    started = time.time()
    age = started - psutil.Process().create_time()
    plan = sections(setting, list(FLAGS.only), unlimited=FLAGS.allow_cpu and backend == "cpu")
    report: dict[str, Any] = {
        "check": "nr_jax accelerator check (issue 15 item 3)",
        "mode": setting.name if backend != "cpu" or FLAGS.cpu_smoke else "cpu (--allow_cpu)",
        "device": device_info(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) + " UTC",
        "deadline_s": FLAGS.deadline_s,
        "startup_s": round(age, 1),
    }
    total = Deadline(FLAGS.deadline_s - age)

    def write() -> str:
        return report_file.write(report, FLAGS.out, DESCRIBERS)

    timer = watchdog(report, write, total, WATCHDOG_GRACE_S)
    try:
        run_sections(plan, report, write, total, ALARM_GRACE_S)
    finally:
        timer.cancel()
    results = {k: v.get("result", {}) for k, v in report["sections"].items()}
    goals = (throughput.goal(results["throughput"]), post_cost.goal(results["post"]))
    report["goals"] = [g for g in goals if g is not None]
    report["wall_s"] = time.time() - psutil.Process().create_time()
    print(write(), flush=True)
    failed = [k for k, v in report["sections"].items() if v["status"] == "failed"]
    if failed:
        print(f"error: sections failed: {', '.join(failed)} (see {FLAGS.out})", file=sys.stderr)
        sys.exit(1)
