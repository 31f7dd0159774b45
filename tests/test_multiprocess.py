"""Two processes on this machine as one `jax.distributed` job (`nr_jax.multihost`).

Each process (`tests/multiprocess_worker.py` around `experiments.main`) has 2 CPU devices; they
form one job of 4 devices through a coordinator on a loopback address, with CPU collectives
across processes (gloo), and run `tests/configs/tiny_multiprocess.py`: real Fashion-MNIST, one
rejuvenation, the batch sharded over the 4 devices, the state replicated. Checked against one
process over 4 devices: the same metrics (within float tolerance: the sums are reduced in another
order), every run file written once, by process 0 alone, the same plan and bit-identical new
variables on both processes, replicated on all 4 devices; orbax's checkpoints. Under `-m slow`:
killing one process during a checkpoint save stops the other within 60 s, its log naming the lost
process, the newest complete checkpoint intact; restarting both resumes from it, process 0 removes
the killed save's directory, and the job reproduces the uninterrupted job's metrics exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nr_jax.config import ConfigError, base_config, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny_multiprocess.py"
WORKER = ROOT / "tests" / "multiprocess_worker.py"
FMNIST = "/usr/share/datasets/fashion-mnist"
HEARTBEAT_S = 10  # the job's heartbeat timeout (jax's default: 100 s)
# process 1 is killed during the 10th save (step 68, after the rejuvenation at step 60) as soon as
# orbax's temporary directory appears: the newest complete checkpoint is 60's, at the new widths
KILL = "checkpoint_save@10"

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("NR_JAX_FASHION_MNIST_DIR"),
    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # jax's default, said explicitly
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        PYTHONUNBUFFERED="1",
    )
    return env


def start(cmd: list[str], log: Path, devices: int) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, cwd=ROOT, env=environment(devices), stdout=f, stderr=subprocess.STDOUT
        )


def start_job(workdir: Path, cache: Path, tag: str, fault: str | None = None) -> list:
    """Processes 0 and 1 of one job; `fault` (a `--fault` of tests/fault_launcher.py) for 1."""
    port = free_port()
    procs = []
    for i in (0, 1):
        cmd = [sys.executable, str(WORKER), f"--report={workdir}.{tag}.{i}.json"]
        cmd += [f"--fault={fault}"] if fault and i == 1 else []
        cmd += [
            f"--config={CONFIG}",
            f"--workdir={workdir}",
            "--config.distributed=True",
            f"--config.coordinator_address=127.0.0.1:{port}",
            f"--config.coordinator_bind_address=127.0.0.1:{port}",  # loopback only
            "--config.num_processes=2",
            f"--config.process_id={i}",
            f"--config.heartbeat_timeout_seconds={HEARTBEAT_S}",
            "--config.shutdown_timeout_seconds=30",
            f"--config.compilation_cache_dir={cache}",
        ]
        procs.append(start(cmd, Path(f"{workdir}.{tag}.{i}.log"), devices=2))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def log(workdir: Path, tag: str, i: int) -> str:
    return Path(f"{workdir}.{tag}.{i}.log").read_text()


def report(workdir: Path, tag: str, i: int) -> dict:
    return json.loads(Path(f"{workdir}.{tag}.{i}.json").read_text())


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(workdir: Path) -> list[str]:
    return sorted(os.listdir(workdir / "checkpoints"))


def assert_records_close(got: list[dict], want: list[dict]) -> None:
    """Record for record: the same steps and fields; floats within 1e-3 (relative) or 1e-5.

    Measured: training metrics within 5e-6, the test loss after the rejuvenation within 1.3e-4
    (a loss of 8: large logits amplify the reduction order's rounding); accuracies exact.
    """
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), (g, w)
        for key, value in w.items():
            if isinstance(value, float):
                assert math.isclose(g[key], value, rel_tol=1e-3, abs_tol=1e-5), (w["step"], key)
            else:
                assert g[key] == value, (w["step"], key)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """The uninterrupted two-process job (and, at the same time, the one-process reference)."""
    base = tmp_path_factory.mktemp("multiprocess")
    workdir, reference = base / "job", base / "reference"
    cmd = [sys.executable, "-m", "experiments.main", f"--config={CONFIG}"]
    cmd += [f"--workdir={reference}", f"--config.compilation_cache_dir={base / 'cache1'}"]
    cmd += ["--config.tensorboard=False"]  # (checkpoints stay: a save also flushes the metrics)
    one = start(cmd, base / "reference.log", devices=4)
    codes = wait([*start_job(workdir, base / "cache", "run"), one])
    assert codes == [0, 0, 0], [codes, *(log(workdir, "run", i)[-3000:] for i in (0, 1))]
    return workdir


@pytest.mark.real_data
@needs_fmnist
def test_two_processes_train_as_one_job(job):
    reference = job.parent / "reference"
    assert "process 0 of 2: 2 local devices of 4 (cpu)" in log(job, "run", 0)
    assert "process 1 of 2: 2 local devices of 4 (cpu)" in log(job, "run", 1)
    got, want = metrics(job), metrics(reference)
    assert any(r.get("epoch/rejuvenated") for r in want) and want[-1]["step"] == 80
    assert_records_close(got, want)
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (job, reference))
    for key in ("widths", "counts", "epochs_run", "search_epochs", "phase", "rejuvenation"):
        assert summary[key] == ref[key], key
    plan = json.loads((job / "rejuvenation.json").read_text())
    assert plan == json.loads((reference / "rejuvenation.json").read_text())

    # every run file once, by process 0; process 1 opens nothing in the run directory
    first, second = report(job, "run", 0), report(job, "run", 1)
    assert second["writes"] == []
    tb = [f"tb/{name}" for name in os.listdir(job / "tb")]
    assert len(tb) == 1
    written = ["metrics.jsonl", *tb, "rejuvenation.json", "rejuvenations.json"]
    written.append("gammas_at_rejuvenation.npz")
    assert first["writes"] == [*written, "summary.json"]

    # the same plan and bit-identical new variables on both processes, replicated on all devices
    assert len(first["rejuvenated"]) == len(second["rejuvenated"]) == 1
    assert first["rejuvenated"] == second["rejuvenated"]
    leaves = first["rejuvenated"][0]["state"]
    assert len(leaves) > 20
    devices = {tuple(leaf["devices"]) for leaf in leaves.values()}
    assert len(devices) == 1 and len(devices.pop()) == 4
    for leaf in leaves.values():
        assert leaf["replicated"] and leaf["local_shards_hold_the_value"], leaf

    # orbax's multi-process checkpoints: the retained steps, no temporary directory left
    assert checkpoints(job) == ["76", "80"]


@pytest.mark.slow
@pytest.mark.real_data
@needs_fmnist
def test_killed_process_stops_the_job_and_both_resume(job, tmp_path):
    from nr_jax.checkpoint import Checkpointer

    workdir, cache = tmp_path / "job", job.parent / "cache"
    procs = start_job(workdir, cache, "killed", fault=KILL)
    try:
        assert procs[1].wait(timeout=600) == -signal.SIGKILL, log(workdir, "killed", 1)[-3000:]
        killed = time.monotonic()
        code = procs[0].wait(timeout=120)
        survived_s = time.monotonic() - killed
    finally:
        wait(procs, timeout=1)  # kills what is left
    text = log(workdir, "killed", 0)
    print(f"process 0 exited {survived_s:.1f} s after process 1 was killed (status {code})")
    assert code != 0 and survived_s < 60, (code, survived_s, text[-3000:])
    assert re.search(r"stopped sending heartbeats\):\s+1\b", text), text[-3000:]

    assert any(d.startswith("68.orbax-checkpoint-tmp") for d in checkpoints(workdir))
    with Checkpointer(workdir / "checkpoints") as ckpt:  # the newest checkpoint is intact
        assert ckpt.all_steps()[-1] == ckpt.latest_step() == 60

    codes = wait(start_job(workdir, cache, "resumed"))
    assert codes == [0, 0], [log(workdir, "resumed", i)[-3000:] for i in (0, 1)]
    assert "resumed from the checkpoint of step 60" in log(workdir, "resumed", 0)
    assert checkpoints(workdir) == ["76", "80"]  # the killed save's directory removed (process 0)
    assert metrics(workdir) == metrics(job)
    assert report(workdir, "resumed", 1)["writes"] == []
    got, want = (json.loads((d / "summary.json").read_text()) for d in (workdir, job))
    for key in ("final_test_accuracy", "best_test_accuracy", "widths", "counts", "epochs_run"):
        assert got[key] == want[key], key


def _job(**fields) -> object:
    config = base_config()
    config.distributed = True
    config.update(fields)
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        (_job(coordinator_address="10.0.0.1"), "config.coordinator_address = '10.0.0.1'"),
        (_job(coordinator_address="host:0"), "'host:port' (port 1-65535)"),
        (_job(num_processes=-1), "config.num_processes = -1 is not allowed"),
        (_job(num_processes=2, process_id=2), "an integer in [0, 2), or -1 (detected)"),
        (_job(heartbeat_timeout_seconds=0), "config.heartbeat_timeout_seconds = 0"),
        (_job(distributed=False, num_processes=2), "0 unless config.distributed = True"),
    ],
)
def test_refused_job_fields(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config)


def test_job_fields_are_checked_before_the_job_starts():
    """A distributed config validates without asking jax for devices (the job has not started:
    asking would start jax's backend and make `jax.distributed.initialize` impossible)."""
    config = _job(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
    config.batch_size = 3  # no multiple of 4 devices: checked only once the job has started
    validate(config)
