"""Crash safety and determinism of real runs (`experiments.main` in subprocesses).

A run is killed with SIGKILL by `tests/fault_launcher.py` (hooks of `nr_jax.callbacks.Callbacks`)
at seven points — mid-epoch during the search, during a checkpoint save, during evaluation, right
after rejuvenation, right after the rejuvenated checkpoint, mid-epoch after rejuvenation, and after
the last epoch before the summary — and resumed each time in the same workdir. Its metrics must
equal, record for record, those of an uninterrupted run; and two uninterrupted runs with the same
seed must agree exactly.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny_run.py"
LAUNCHER = ROOT / "tests" / "fault_launcher.py"
FMNIST = "/usr/share/datasets/fashion-mnist"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not os.path.isdir(FMNIST) and not os.environ.get("NR_JAX_FASHION_MNIST_DIR"),
        reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)",
    ),
]


def run(workdir: Path, cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, str(LAUNCHER), f"--config={CONFIG}", f"--workdir={workdir}"]
    if fault:
        cmd.append(f"--fault={fault}")
    cmd.append(f"--config.compilation_cache_dir={cache}")  # later processes skip compilation
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(workdir: Path) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    proc = run(workdir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_same_seed_same_metrics(tmp_path, cache, reference):
    proc = run(tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = metrics(reference), metrics(tmp_path)
    assert len(first) > 20 and any("epoch/rejuvenated" in r for r in first)
    assert first == second


# (fault, what must hold right after the kill: the newest complete checkpoint's step and files)
KILLS = [
    ("train_step@13", lambda d: checkpoints(d) == ["8"]),  # steps 9-13 lost
    # the save of step 20 (end of epoch 1) is cut short: its temporary directory stays behind
    (
        "checkpoint_save@2",
        lambda d: any(c.startswith("20.orbax-checkpoint-tmp") for c in checkpoints(d)),
    ),
    ("eval@1", lambda d: "16" in checkpoints(d)),
    ("after_rejuvenation@1", lambda d: not (d / "checkpoints" / "80").exists()),
    ("after_checkpoint@1", lambda d: "80" in checkpoints(d)),  # the rejuvenated checkpoint
    ("train_step@11", lambda d: "88" in checkpoints(d)),  # after rejuvenation, new widths
    ("end", lambda d: not (d / "summary.json").exists()),
]


def test_killed_run_resumes_with_the_uninterrupted_metrics(tmp_path, cache, reference):
    rejuvenated_at = next(r["step"] for r in metrics(reference) if r.get("epoch/rejuvenated"))
    assert rejuvenated_at == 80, "the kill points below assume rejuvenation after epoch 4"
    for fault, check in KILLS:
        proc = run(tmp_path, cache, fault)
        point = fault.split("@")[0]
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-3000:])
        assert f"fault injection: killing the process at {point}" in proc.stderr, fault
        assert check(tmp_path), (fault, checkpoints(tmp_path))
    proc = run(tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(tmp_path) == metrics(reference)
    got = json.loads((tmp_path / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    for key in ("final_test_accuracy", "best_test_accuracy", "widths", "epochs_run", "counts"):
        assert got[key] == want[key], key
    assert not any(".orbax-checkpoint-tmp" in c for c in checkpoints(tmp_path))
