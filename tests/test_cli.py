"""The entry points refuse bad input with one line and touch nothing (`experiments.cli`).

Every case runs the real command line (`python -m experiments.main ...`, the table driver, the
benchmark) as a subprocess against its own copy of an existing run directory (metrics, a summary
and a checkpoint of `tests/configs/tiny_run.py`'s model) and checks: exit status 2, stderr one
line `error: ...` naming the field, file or model, no "Traceback", the run directory
byte-identical. The cases run concurrently; none of them compiles a step.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from nr_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny_run.py"
MAIN = ("-m", "experiments.main", f"--config={TINY}")
# a config file whose argument is `config.model_kwargs` (the flags cannot add fields to it)
KWARGS_CONFIG = """
import ast
from nr_jax.config import base_config

def get_config(kwargs="{}"):
    c = base_config()
    c.model, c.data_parallel, c.progress, c.plots = "vgg_tiny", False, False, False
    c.model_kwargs.update(ast.literal_eval(kwargs))
    return c
"""
# tiny_run's model, as train.py records it in a checkpoint's meta
TINY_MODEL = {"model": "vgg_tiny", "dataset": "fashion_mnist", "model_kwargs": {}}


class Case(NamedTuple):
    """One bad input: the command's arguments (`{kw}`: the kwargs config file, `{data}`: an
    empty data dir, `{tfrecord}`: a data dir with a tfrecord-only CIFAR-10, `{file}`: a plain
    file, `{fresh}`: a workdir that does not exist yet) and a text the error line must hold."""

    args: tuple[str, ...]
    expect: str


def main(*args: str, workdir: str = "{run}") -> tuple[str, ...]:
    return (*MAIN, f"--workdir={workdir}", *args)


def kw(kwargs: str) -> tuple[str, ...]:
    """experiments.main with `config.model_kwargs = kwargs` (a dict literal) in `{run}`."""
    literal = kwargs.replace("{", "{{").replace("}", "}}")  # survives `str.format` in `launch`
    return ("-m", "experiments.main", f"--config={{kw}}:{literal}", "--workdir={run}")


CASES = {
    # flags and config fields, before any model is built
    "unknown_flag": Case((*main(), "--worddir=x"), "Unknown command line flag 'worddir'"),
    "missing_workdir": Case(MAIN, "--workdir"),
    "missing_config_file": Case(
        ("-m", "experiments.main", "--config=experiments/configs/nope.py", "--workdir={run}"),
        "nope.py: no such config file",
    ),
    "config_variant": Case(
        ("-m", "experiments.main", "--config=experiments/configs/cifar10_vgg19.py:fancy"),
        "variant must be 'nr', 'baseline', 'quick' or 'compress', got 'fancy'",
    ),
    "misspelt_field": Case(main("--config.nr.lamda=0.1"), "did you mean config.nr.lam?"),
    "misspelt_group": Case(main("--config.nrr.lam=0.1"), "did you mean config.nr?"),
    "misspelt_top": Case(main("--config.epoch=3"), "did you mean config.epochs?"),
    "unparsable_value": Case(main("--config.epochs=many"), "--config.epochs=many"),
    # values (nr_jax.config.validate)
    "negative_lambda": Case(
        main("--config.nr.lam=-1e-4"), "config.nr.lam = -0.0001 is not allowed: a number >= 0"
    ),
    "zero_batch": Case(main("--config.batch_size=0"), "config.batch_size = 0 is not allowed"),
    "optimizer": Case(main("--config.optimizer=lion"), "config.optimizer = 'lion' is not allowed"),
    "target": Case(main("--config.nr.target=1.5"), "config.nr.target = 1.5 is not allowed"),
    # a multi-process job's fields, refused before jax.distributed would wait for the job
    "process_id": Case(
        main("--config.distributed=True", "--config.num_processes=2", "--config.process_id=2"),
        "config.process_id = 2 is not allowed: an integer in [0, 2)",
    ),
    # names, resolved by their registries when the trainer is built
    "model_name": Case(main("--config.model=resnet9000"), "config.model = 'resnet9000'"),
    "dataset_name": Case(main("--config.dataset=mnist3d"), "config.dataset = 'mnist3d'"),
    "scheme": Case(main("--config.nr.scheme=grouped"), "config.nr.scheme = 'grouped'"),
    "allocation": Case(main("--config.nr.allocation=cubic"), "config.nr.allocation = 'cubic'"),
    "kernel_grad": Case(main("--config.conv_weight_grad=cudnn"), "config.conv_weight_grad"),
    # model keywords
    "kwarg_unknown": Case(
        kw("{'widht': 2}"), "config.model_kwargs.widht = 2 is not allowed: a keyword of model"
    ),
    "kwarg_set_by_run": Case(
        kw("{'num_classes': 3}"), "config.model_kwargs.num_classes = 3 is not allowed: unset"
    ),
    "kwarg_fixed_by_model": Case(kw("{'cfg': (8,)}"), "model 'vgg_tiny' fixes cfg itself"),
    "kwarg_value": Case(kw("{'width_multiplier': -1.0}"), "config.model_kwargs.width_multiplier"),
    "kwarg_not_in_file": Case(
        ("-m", "experiments.main", "--config={kw}", "--workdir={run}", "--config.model_kwargs.a=1"),
        "config.model_kwargs.a is not a field",
    ),
    # the workdir
    "workdir_is_file": Case(main(workdir="{file}"), "is a file: expected a directory"),
    "other_model": Case(main("--config.model=vgg_fmnist"), "of {'model': 'vgg_tiny'"),
    "other_widths": Case(kw("{'width_multiplier': 2.0}"), "'model_kwargs': {'width_multiplier'"),
    # the dataset
    "dataset_missing": Case(
        main("--config.dataset=cifar10", "--config.data_dir={data}", workdir="{fresh}"),
        "CIFAR-10 not found",
    ),
    "dataset_needs_tensorflow": Case(
        main("--config.dataset=cifar10", "--config.data_dir={tfrecord}", workdir="{fresh}"),
        "can only be read with TensorFlow",
    ),
    # the other entry points
    "benchmark_section": Case(
        ("-m", "experiments.benchmark", "--out={run}", "--sections=nonsense"), "unknown sections"
    ),
    "table_flag": Case(
        ("-m", "experiments.reproduce_fmnist", "--out={run}", "--arch=vgg"),
        "Unknown command line flag 'arch'",
    ),
}


# further cases of classes the default run already covers once: run with `-m slow` (they add
# about a minute of interpreter start-ups on 2 cores)
SLOW = {
    "misspelt_group",
    "misspelt_top",
    "zero_batch",
    "optimizer",
    "target",
    "process_id",
    "dataset_name",
    "scheme",
    "allocation",
    "kwarg_set_by_run",
    "kwarg_fixed_by_model",
    "other_widths",
    "dataset_needs_tensorflow",
    "table_flag",
}
REFUSAL_TEST = "test_refusal_is_one_line_and_touches_nothing"


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory`: file contents, None for a directory."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """A run directory holding a checkpoint of tiny_run's model and a killed save's temporary
    directory, and the other paths."""
    base = tmp_path_factory.mktemp("cli")
    run = base / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 8, "epoch/test_accuracy": 0.5}\n')
    (run / "summary.json").write_text(json.dumps({"epochs_run": 1}))
    with Checkpointer(run / "checkpoints") as ckpt:
        meta = {"model": TINY_MODEL, "widths": "{}", "epoch": 0, "step": 8, "history": []}
        ckpt.save(8, {"w": np.arange(3, dtype=np.float32)}, meta)
    # a save killed midway: its temporary directory must survive every refusal
    shutil.copytree(run / "checkpoints" / "8", run / "checkpoints" / "9.orbax-checkpoint-tmp")
    (base / "kwargs_config.py").write_text(KWARGS_CONFIG)
    (base / "data").mkdir()
    version = base / "tfrecord" / "cifar10" / "3.0.2"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text("{}")  # no fileFormat: tfds' legacy tfrecord
    (base / "a_file").write_text("not a directory")
    return {"base": base, "run": run}


def launch(args: tuple[str, ...], tmp: Path, places: dict[str, Path]) -> subprocess.Popen:
    """Starts the command of `args` in the repository root, its workdir a copy in `tmp`."""
    shutil.copytree(places["run"], tmp / "run")
    base = places["base"]
    paths = {
        "run": tmp / "run",
        "kw": base / "kwargs_config.py",
        "data": base / "data",
        "tfrecord": base / "tfrecord",
        "file": base / "a_file",
        "fresh": tmp / "fresh",
    }
    argv = [sys.executable, *(a.format(**paths) for a in args)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", NR_JAX_CIFAR_DIR=str(base / "data"))
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def outcomes(places, tmp_path_factory, request) -> dict[str, tuple[int, str, Path]]:
    """Runs the selected cases, several at a time: name -> (exit status, stderr, its temp dir)."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == REFUSAL_TEST
    ]

    def one(name: str) -> tuple[int, str, Path]:
        tmp = tmp_path_factory.mktemp(name)
        proc = launch(CASES[name].args, tmp, places)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err, tmp

    workers = max(2, min(8, os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(zip(selected, pool.map(one, selected), strict=True))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]
)
def test_refusal_is_one_line_and_touches_nothing(name, outcomes, places):
    status, err, tmp = outcomes[name]
    lines = [line for line in err.splitlines() if line.strip()]
    if name.startswith("dataset_"):  # tfds logs a warning while it looks (not nr_jax's to hide)
        lines = [line for line in lines if not re.match(r"^W\d{4} .*file_utils.py", line)]
    assert status == 2, (status, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert CASES[name].expect in lines[0], lines[0]
    assert snapshot(tmp / "run") == snapshot(places["run"])
    assert not (tmp / "fresh").exists()


def test_at_least_twenty_distinct_inputs():
    assert len({case.args for case in CASES.values()}) >= 20


def test_debug_shows_the_traceback(places, tmp_path):
    proc = launch(main("--config.nr.lam=-1e-4", "--debug"), tmp_path, places)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("error: config.nr.lam = -0.0001")
    assert snapshot(tmp_path / "run") == snapshot(places["run"])


def test_help_documents_debug_and_the_exit_statuses():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--help"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "--debug" in out and "traceback" in out
    assert "exit status 2" in out and "one line" in out


FAILING_MAIN = """
from experiments import cli

def main(argv):
    raise RuntimeError("disk full\\nwhile writing metrics.jsonl")

cli.run(main, ["prog"])
"""


def test_failure_during_a_run_is_one_line_with_status_1():
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_MAIN],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: RuntimeError: disk full while writing metrics.jsonl"


def test_validate_names_the_nearest_field_of_a_misspelt_one():
    """The library path: a field added to an unlocked config is refused like a misspelt flag."""
    from nr_jax.config import ConfigError, base_config, validate

    for path, near in [("nr.lamda", "config.nr.lam"), ("epoch", "config.epochs")]:
        config = base_config()
        config.data_parallel = False
        node = config.nr if path.startswith("nr.") else config
        node[path.split(".")[-1]] = 1
        with pytest.raises(ConfigError, match=rf"^config\.{path} is not a field: did you mean "):
            validate(config)
        with pytest.raises(ConfigError, match=near):
            validate(config)
