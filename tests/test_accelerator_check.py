"""The accelerator check's reduced CPU mode, its deadlines and its refusals.

Real command lines run concurrently: the CPU smoke mode of `python -m
experiments.accelerator_check` over a Fashion-MNIST-shaped subset file, the full check on a
machine without a GPU (refused), and `python -m experiments.accelerator_bundle` with a destination
outside the repository (refused). Cut deadlines are tested in-process on the runner and the real
report writer, with sections that overrun them, checking the JSON on disk at every step. The
bundle's other parts (the `run` call, the git ignore rule, the requirement check) are tested on
their own; its download is not (network, about 11 MB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from experiments.accelerator import bundle, report, runner
from experiments.accelerator.deadline import Deadline, SkipSection
from experiments.accelerator.fmnist_subset import read_subset, synthetic_subset, write_subset
from experiments.accelerator.pytest_subset import counts
from experiments.accelerator.settings import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
# one CPU device (not the tests' four), fast compilation as in tests/conftest.py
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_backend_optimization_level=0",
    JAX_DEFAULT_PRNG_IMPL="rbg",
)


def run_commands(tmp: Path, commands: dict[str, list[str]]) -> dict[str, tuple]:
    """{name: (returncode, stdout, stderr, out_dir)} of the command lines, run concurrently."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in commands.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        out[name] = (proc.returncode, stdout, stderr, tmp / name)
    return out


def check_command(tmp: Path, name: str, *args: str) -> list[str]:
    return ["-m", "experiments.accelerator_check", f"--out={tmp / name}", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quick command lines: no GPU, and the bundle refusing a destination outside."""
    tmp = tmp_path_factory.mktemp("accelerator")
    bundle = ["-m", "experiments.accelerator_bundle", f"--dest={tmp}", "--nowheels"]
    return run_commands(tmp, {"no_gpu": check_command(tmp, "no_gpu"), "bundle_outside": bundle})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole check in its CPU smoke mode on a synthetic Fashion-MNIST subset (~35 s)."""
    tmp = tmp_path_factory.mktemp("accelerator_smoke")
    subset = tmp / "subset.npz"
    train, test = synthetic_subset(128, 64, seed=1)
    write_subset(subset, train, test, source="synthetic (test)")
    args = ("--cpu_smoke", f"--fmnist_npz={subset}", "--deadline_s=900")
    return run_commands(tmp, {"smoke": check_command(tmp, "smoke", *args)})["smoke"]


def _report(out_dir: Path) -> dict:
    assert (out_dir / report.MD_NAME).read_text().startswith("# nr_jax accelerator check")
    return json.loads((out_dir / report.JSON_NAME).read_text())


@pytest.mark.slow  # ~35 s: the default run is near CI's 15 minutes; `make test-all` runs it
def test_cpu_smoke_reports_every_section(smoke):
    code, stdout, stderr, out_dir = smoke
    assert code == 0, stderr
    r = _report(out_dir)
    assert list(r["sections"]) == list(SECTIONS)
    status = {k: v["status"] for k, v in r["sections"].items()}
    assert set(status.values()) <= {"ok", "skipped"}, status
    assert status["export"] in ("ok", "skipped")  # skipped while nr_jax.export does not exist
    assert all(status[k] == "ok" for k in SECTIONS if k != "export"), status
    res = {k: v["result"] for k, v in r["sections"].items()}
    assert res["tests"]["counts"] == {"passed": 1}
    assert res["compiles"]["one_trace_per_width_configuration"]
    assert res["compiles"]["compiles_on_value_changes"] == 0
    assert res["throughput"]["runs"]["vgg_tiny/float32"]["images_per_s"] > 0
    assert res["throughput"]["runs"]["vgg_tiny/float32"]["xla_flops_per_step"] > 0
    assert set(res["post"]["ms_per_step"]) == {"removed", "dense"}
    assert 0.2 < res["post"]["utilization"] < 0.45  # half of every unit's channels dead
    short = res["eval_short"]
    assert short["setting"]["data"] == "synthetic (test)"  # the subset file was read
    assert short["setting"]["train_images"] == 128
    assert short["nr"]["epochs_run"] == 2 and short["baseline_Ek"]["epochs_run"] == 2
    assert len(short["baseline_Ek"]["epochs"]) == 2
    assert "| eval_short | ok |" in stdout  # the markdown is printed at the end


def test_no_gpu_is_one_line(runs):
    code, _, stderr, out_dir = runs["no_gpu"]
    assert code == 2
    assert stderr.startswith("error: no GPU: jax") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert not out_dir.exists()  # refused before anything is written


def test_sections_cut_at_their_deadlines_keep_their_figures(tmp_path):
    """A cut deadline leaves a valid report: a section that checks its deadline, one stuck past
    it (interrupted by the alarm), one skipping itself, one failing, one not selected and one
    left without time; the JSON on disk is valid after every step, with the figures measured
    before each cut, and the markdown has a row per section."""
    r: dict = {}

    def write() -> str:
        return report.write(r, str(tmp_path), {})

    def on_disk() -> dict:
        return json.loads((tmp_path / report.JSON_NAME).read_text())

    def cooperative(deadline: Deadline, result: dict) -> None:
        assert on_disk()["sections"]["cooperative"]["status"] == "running"
        for i in range(1000):
            result["steps"] = i
            deadline.check(f"step {i}")
            time.sleep(0.05)

    def stuck(deadline: Deadline, result: dict) -> None:
        result["started"] = True
        time.sleep(30)  # never checks: the alarm stops it

    def skipping(deadline: Deadline, result: dict) -> None:
        raise SkipSection("not available here")

    total = Deadline(2.0)

    def failing(deadline: Deadline, result: dict) -> None:
        result["partial"] = 1
        while total.left() > 0:  # uses up the overall deadline, then fails
            time.sleep(0.02)
        raise RuntimeError("a broken\nsection")

    sections = [
        runner.Section("cooperative", cooperative, budget_s=0.3),
        runner.Section("stuck", stuck, budget_s=0.2),
        runner.Section("skipping", skipping, budget_s=1.0),
        runner.Section("failing", failing, budget_s=1.0),
        runner.Section("unselected", failing, budget_s=1.0, skip="not selected"),
        runner.Section("late", failing, budget_s=10.0),
    ]
    t = time.monotonic()
    runner.run_sections(sections, r, write, total, grace_s=0.2, min_s=0.1)
    assert time.monotonic() - t < 4
    s = on_disk()["sections"]
    assert {k: v["status"] for k, v in s.items()} == {
        "cooperative": "timeout",
        "stuck": "timeout",
        "skipping": "skipped",
        "failing": "failed",
        "unselected": "skipped",
        "late": "skipped",
    }
    assert s["cooperative"]["result"]["steps"] >= 2 and "deadline" in s["cooperative"]["reason"]
    assert s["stuck"]["result"] == {"started": True} and "stopped" in s["stuck"]["reason"]
    assert s["failing"]["error"] == "RuntimeError: a broken section"
    assert s["failing"]["result"] == {"partial": 1}
    assert s["unselected"]["reason"] == "not selected"
    assert "no time left" in s["late"]["reason"]
    assert (tmp_path / report.MD_NAME).read_text().count("\n| ") >= 6


def test_subset_file_round_trip_and_pytest_counts(tmp_path):
    train, test = synthetic_subset(8, 4)
    size = write_subset(tmp_path / "s.npz", train, test, source="here")
    back = read_subset(tmp_path / "s.npz")
    assert size > 0 and back["source"] == "here"
    for name, split in (("train", train), ("test", test)):
        for a, b in zip(back[name], split, strict=True):
            assert a.dtype == b.dtype and (a == b).all()
    with pytest.raises(ValueError, match="uint8"):
        write_subset(tmp_path / "bad.npz", (train[0].astype("float32"), train[1]), test, "x")
    out = "..F.\n== 1 failed, 3 passed, 2 warnings in 4.20s ==\n"
    assert counts(out) == {"failed": 1, "passed": 3, "warning": 2}


def test_bundle_refuses_a_destination_outside_the_repository(runs):
    code, _, stderr, _ = runs["bundle_outside"]
    assert code == 2 and stderr.startswith("error: --dest ") and stderr.count("\n") == 1, stderr
    for bad in ("/tmp/x", "../x", ""):
        with pytest.raises(ValueError, match="inside the repository"):
            bundle.destination(bad)
    assert bundle.destination(".accel") == bundle.ROOT / ".accel"


def test_bundle_run_call_and_ignore_rule(tmp_path):
    call = bundle.run_call(".accel", with_wheels=True)
    assert call["carry"] == [".accel"] and call["timeout_s"] >= 300
    assert len(call["command"]) < 2000
    assert "--target /tmp/site .accel/whl/*.whl && export PYTHONPATH=/tmp/site" in call["command"]
    assert "--fmnist_npz .accel/fmnist_subset.npz" in call["command"]
    assert "pip install" not in bundle.run_call(".accel", with_wheels=False)["command"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    dest = tmp_path / ".accel"
    dest.mkdir()
    assert bundle.ensure_ignored(dest, tmp_path).startswith("added /.accel/ to ")
    assert bundle.ensure_ignored(dest, tmp_path) == ".accel is ignored by git already"
    assert (tmp_path / ".git/info/exclude").read_text().splitlines().count("/.accel/") == 1


def test_bundle_finds_unmet_requirements(tmp_path):
    """Requirements for the GPU machine's Python on Linux, extras and other Pythons left out,
    against the bundle's wheels and what the machine has."""
    metadata = {
        "foo": ["numpy", "bar>=1", 'baz; extra == "x"', 'qux; python_version < "3.9"', "zot"],
        "zot": ["pyyaml"],
    }
    wheels = []
    for name, requires in metadata.items():
        wheel = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            lines = [f"Name: {name}", *(f"Requires-Dist: {r}" for r in requires)]
            z.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(lines))
        wheels.append(wheel)
    assert bundle.unmet_requirements(wheels, "3.12") == ["bar>=1 (for foo)"]
