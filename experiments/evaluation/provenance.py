"""What code wrote a result: the code fingerprint, the commit, the versions, the run markers.

The code fingerprint (`code_fingerprint`) hashes the files that decide results: `nr_jax/**/*.py`,
the driver (`experiments/evaluate.py`, `experiments/evaluation/*.py`), `experiments/main.py` and
`experiments/configs/**/*.py`, nothing else (so committing results or unrelated files does not
change it). A run directory carries a marker (`MARKER`) with the fingerprint and config that
started it; `prepare_workdir` and `check_table` refuse (`MixedCodeError`) to resume a run
directory, or to add to a table, written by code with another fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT_GLOBS = (
    "nr_jax/**/*.py",
    "experiments/evaluate.py",
    "experiments/evaluation/*.py",
    "experiments/main.py",
    "experiments/configs/**/*.py",
)
MARKER = "fingerprint.json"  # in every run directory: the code and config that started it
VERSIONED = ("jax", "jaxlib", "flax", "optax", "grain", "numpy")


class MixedCodeError(RuntimeError):
    """A run directory or a table was written by code with another fingerprint (or config)."""


def fingerprint_files(root: Path = ROOT) -> list[Path]:
    """The files whose contents decide results, sorted by their path relative to `root`."""
    files = {p for pattern in FINGERPRINT_GLOBS for p in root.glob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 over (relative path, contents) of `fingerprint_files(root)`, 16 hex digits."""
    h = hashlib.sha256()
    for p in fingerprint_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(root: Path = ROOT) -> dict[str, Any]:
    """HEAD's commit and whether the fingerprinted files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        paths = [p.relative_to(root).as_posix() for p in fingerprint_files(root)]
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def versions() -> dict[str, str]:
    """Versions of the packages that compute the results."""
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# vector extensions by which the CPU kernels are chosen (oneDNN's, measured: experiments/README.md,
# "The default run"), so results differ between machines that differ in them
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """What computed the results: the CPU (model, logical CPUs, the vector extensions the CPU
    kernels are chosen by) and the JAX backend. Runs of one config on the same code and
    versions are bit-identical on one machine kind, not across CPU kinds (rounding differs)."""
    import jax

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "backend": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def check_table(table_dir: Path, fingerprint: str) -> None:
    """Refuses to add to a table whose finished results come from other code."""
    for path in sorted(table_dir.glob("*.json")):
        found = read_json(path).get("fingerprint")
        if found != fingerprint:
            raise MixedCodeError(
                f"{path} was written by code with fingerprint {found}, this code is "
                f"{fingerprint}: a table never mixes code; move {table_dir} away or use a new "
                "--table"
            )


def prepare_workdir(workdir: Path, fingerprint: str, config_json: Any) -> bool:
    """Creates the run directory with its marker, or checks the marker of an existing one.

    Returns whether the run resumes (the directory existed). Raises `MixedCodeError` when the
    existing directory was started by other code, with another config, or has no marker.
    """
    marker = workdir / MARKER
    if marker.exists():
        found = read_json(marker)
        if found["fingerprint"] != fingerprint:
            raise MixedCodeError(
                f"{workdir} was started by code with fingerprint {found['fingerprint']}, this "
                f"code is {fingerprint}: refusing to resume it (move it away to start afresh)"
            )
        if found["config"] != config_json:
            raise MixedCodeError(f"{workdir} was started with another config: refusing to resume")
        return True
    if workdir.exists() and any(workdir.iterdir()):
        raise MixedCodeError(f"{workdir} exists without {MARKER}: refusing to resume unknown code")
    write_json(marker, {"fingerprint": fingerprint, "config": config_json, "machine": machine()})
    return False
