"""Section `tests`: a subset of the project's tests on the device under test, by pytest in a
subprocess with a deadline.

The subset (`settings.GPU_TESTS`) needs one device, no real dataset and no CPU-only path.
`tests/conftest.py` only sets `JAX_PLATFORMS` and `XLA_FLAGS` where they are unset, so the child
gets the parent's backend explicitly (and, off the CPU, the parent's `XLA_FLAGS`, so that none of
the CPU test flags applies). The child does not preallocate device memory: the parent holds its
share already. A run past the deadline is killed with its whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

from experiments.accelerator.deadline import Deadline, SectionTimeout
from experiments.accelerator.settings import Setting

TITLE = "Tests on the device"
ROOT = Path(__file__).resolve().parents[2]
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)")


def command(setting: Setting) -> list[str]:
    """The pytest command line of the subset."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if setting.pytest_warnings:
        cmd += ["-W", setting.pytest_warnings]
    return cmd + list(setting.tests)


def environment() -> dict[str, str]:
    """The child's environment: the parent's backend, no memory preallocation."""
    backend = jax.default_backend()
    env = dict(os.environ, JAX_PLATFORMS=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if backend != "cpu":
        env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return env


def counts(output: str) -> dict[str, int]:
    """pytest's final counts ({"passed": 58, "warnings": 3, ...}) from its output."""
    lines = [line for line in output.splitlines() if _COUNTS.search(line) and " in " in line]
    if not lines:
        return {}
    return {kind.rstrip("s"): int(n) for n, kind in _COUNTS.findall(lines[-1])}


def run(setting: Setting, deadline: Deadline, result: dict[str, Any]) -> None:
    """Runs the subset; fails when a test fails, times out at the deadline."""
    cmd = command(setting)
    result.update(tests=list(setting.tests), platform=jax.default_backend())
    result["command"] = " ".join(cmd[1:])
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=max(1.0, deadline.left()))
    except subprocess.TimeoutExpired as e:
        _kill(proc)
        output = proc.communicate()[0] or ""
        result["output_tail"] = output.splitlines()[-20:]
        raise SectionTimeout(f"pytest still running at the deadline ({e.timeout:.0f} s)") from e
    finally:
        if proc.poll() is None:  # an alarm or another exception interrupted the wait
            _kill(proc)
    result.update(returncode=proc.returncode, counts=counts(output))
    result["output_tail"] = output.splitlines()[-20:]
    if proc.returncode != 0:
        last = result["output_tail"][-1] if result["output_tail"] else ""
        raise RuntimeError(f"pytest exit status {proc.returncode}: {last}")


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def summary(result: dict[str, Any]) -> str:
    c = result.get("counts", {})
    return ", ".join(f"{n} {k}" for k, n in c.items()) + f" on {result.get('platform', '?')}"


def markdown(result: dict[str, Any]) -> list[str]:
    return [
        f"`{result.get('command', '')}`",
        "",
        "```",
        *result.get("output_tail", [])[-8:],
        "```",
    ]
