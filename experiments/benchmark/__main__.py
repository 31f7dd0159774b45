"""`python -m experiments.benchmark [--out DIR] [--full] [--paper_scale] [--sections ...]`: runs
the sections (see `experiments.benchmark`) and writes `benchmark.json` and `benchmark.md`.

Errors are one line on stderr (`experiments.cli`): exit status 2 for a refused input (an unknown
section), 1 for a failure; `--debug` adds the traceback."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags

from experiments import cli
from experiments.benchmark.common import FLAGS, SECTIONS
from experiments.benchmark.compilations import compilations
from experiments.benchmark.efficiency import efficiency
from experiments.benchmark.granularity import width_granularity
from experiments.benchmark.images import image_pipelines
from experiments.benchmark.latency import rejuvenation_latency
from experiments.benchmark.pipeline import input_pipeline
from experiments.benchmark.post import post_rejuvenation_cost
from experiments.benchmark.report import write
from experiments.benchmark.watching import watching_overhead

flags.adopt_module_key_flags(cli)  # --debug


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("nr_jax").setLevel(logging.WARNING)
    unknown = set(FLAGS.sections) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    os.makedirs(FLAGS.out, exist_ok=True)
    t0 = time.time()
    r: dict[str, Any] = {
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}",
        "batch": FLAGS.batch,
        "jax": jax.__version__,
        "load_average_start": os.getloadavg(),
        "section_seconds": {},
    }
    run_sections(r)
    r["wall_s"] = time.time() - t0
    r["load_average_end"] = os.getloadavg()
    print(write(r, FLAGS.out))  # the summary, for people


def run_sections(r: dict[str, Any]) -> None:
    """Runs the sections named by --sections, in `SECTIONS` order, into `r`."""
    reps, steps = (7, 10) if FLAGS.full else (3, 5)
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


if __name__ == "__main__":
    cli.run(main)
