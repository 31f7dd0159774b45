"""The PyTorch comparison driver: times `experiments/torch_reference.py` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments.benchmark.common import FLAGS


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
    script = Path(__file__).parent.parent / "torch_reference.py"
    done = subprocess.run([python, str(script), spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{python} {script} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
