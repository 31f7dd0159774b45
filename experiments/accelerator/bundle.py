"""What travels to the GPU machine for the accelerator check, and the `run` call that uses it.

The functions behind `python -m experiments.accelerator_bundle` (whose docstring says what the
bundle holds): the destination inside the repository and its git ignore rule, the Fashion-MNIST
subset, the wheels for the GPU machine's Python and the check of their requirements, and the
`run` tool's arguments.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from experiments.accelerator.fmnist_subset import write_subset

ROOT = Path(__file__).resolve().parents[2]
SUBSET, WHEEL_DIR = "fmnist_subset.npz", "whl"
# What the GPU machine lacks (KINDS.md, its package list read on 2026-11-17), at the versions of
# requirements.txt where it pins them; the rest are their requirements, at the versions tested here.
WHEELS = (
    ("tensorflow-datasets", "4.9.10"),
    ("array_record", "0.8.6"),
    ("grain", "0.2.18"),
    ("ml_collections", "1.1.0"),
    ("dm-tree", "0.1.10"),
    ("immutabledict", "4.3.1"),
    ("simple-parsing", "0.1.9"),
    ("docstring-parser", "0.18.0"),
    ("tensorflow-metadata", "1.21.0"),
    ("googleapis-common-protos", "1.76.0"),
    ("termcolor", "3.3.0"),
    ("toml", "0.10.2"),
    ("portpicker", "1.6.0"),
)
SOURCE_ONLY = (("promise", "2.3"),)  # no wheel on PyPI: built here (pure Python)
# What the machine has among the requirements of the wheels above (KINDS.md, 2026-11-17)
GPU_HAS = frozenset(
    canonicalize_name(n)
    for n in (
        "absl-py", "attrs", "chex", "cloudpickle", "etils", "flax", "fsspec", "jax", "jaxlib",
        "matplotlib", "msgpack", "numpy", "optax", "orbax-checkpoint", "packaging", "pillow",
        "protobuf", "psutil", "pyarrow", "pytest", "pyyaml", "requests", "six", "tensorstore",
        "toolz", "tqdm", "typing-extensions", "wrapt", "zipp", "hypothesis",
    )
)  # fmt: skip
PYTHON_VERSION = "3.12"  # the GPU machine's (KINDS.md)
PLATFORMS = tuple(
    f"manylinux{tag}_x86_64" for tag in ("_2_28", "_2_27", "_2_24", "_2_17", "2014", "1")
)
TIMEOUT_S = 360  # the run's limit: the check's 280 s deadline, its watchdog, install and start
MAX_COMMAND = 2000  # characters of a `run` command line


def destination(dest: str, root: Path = ROOT) -> Path:
    """`dest` as a folder inside the repository (relative to its root).

    Raises:
      ValueError: `dest` is absolute or leaves the repository (it could not travel).
    """
    path = Path(dest)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(
            f"--dest {dest!r}: expected a folder inside the repository, relative to its root "
            "(only the checkout travels, with the ignored paths named in carry)"
        )
    return root / path


def ensure_ignored(dest: Path, root: Path = ROOT) -> str:
    """Adds `/<dest>/` to the repository's `info/exclude` unless git ignores `dest` already;
    says which (`root`: the repository's top folder)."""
    rel = dest.relative_to(root).as_posix()
    if subprocess.run(["git", "check-ignore", "-q", rel], cwd=root).returncode == 0:
        return f"{rel} is ignored by git already"
    git_path = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    exclude = root / git_path
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a") as f:
        f.write(f"/{rel}/\n")
    return f"added /{rel}/ to {exclude.relative_to(root)}"


def write_fmnist(dest: Path, n_train: int, n_test: int) -> int:
    """Writes the subset from the project's loader; returns its size in bytes."""
    from nr_jax import data as nr_data  # tensorflow_datasets: imported only when needed

    train = nr_data.load_arrays("fashion_mnist", "train", limit=n_train)
    test = nr_data.load_arrays("fashion_mnist", "test", limit=n_test)
    source = f"Fashion-MNIST, first {n_train} training and {n_test} test images"
    return write_subset(dest / SUBSET, train, test, source)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download_wheels(folder: Path, python_version: str, extra: list[str]) -> list[Path]:
    """Downloads (or builds) the wheels not in `folder` yet; returns all wheels there."""
    folder.mkdir(parents=True, exist_ok=True)
    have = {canonicalize_name(p.name.split("-")[0]) for p in folder.glob("*.whl")}
    wanted = [f"{n}=={v}" for n, v in WHEELS] + list(extra)
    todo = [w for w in wanted if canonicalize_name(w.split("==")[0]) not in have]
    if todo:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        _pip(
            "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python_version, *platforms, "-d", str(folder), *todo,
        )  # fmt: skip
    for name, version in SOURCE_ONLY:
        if canonicalize_name(name) not in have:
            _pip("wheel", "-q", "--no-deps", "-w", str(folder), f"{name}=={version}")
    return sorted(folder.glob("*.whl"))


def unmet_requirements(wheels: list[Path], python_version: str) -> list[str]:
    """Requirements of `wheels` (for that Python on Linux x86-64, extras left out) that neither
    the wheels nor the GPU machine (`GPU_HAS`) provide."""
    env = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "extra": "",
    }
    provided = {canonicalize_name(w.name.split("-")[0]) for w in wheels} | GPU_HAS
    unmet = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) not in provided:
                unmet.add(f"{req} (for {wheel.name.split('-')[0]})")
    return sorted(unmet)


def folder_mb(folder: Path) -> float:
    """MiB of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def run_call(dest: str, with_wheels: bool) -> dict:
    """The `run` tool's arguments that run the check on the GPU machine."""
    install = (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f"--target /tmp/site {dest}/{WHEEL_DIR}/*.whl && export PYTHONPATH=/tmp/site || exit; "
        if with_wheels
        else ""
    )
    command = (
        f"set -o pipefail; {install}PYTHONUNBUFFERED=1 python3 -m experiments.accelerator_check "
        f"--out $OUT --fmnist_npz {dest}/{SUBSET} --deadline_s 280 2>&1 "
        "| tee $OUT/accelerator_check.log"
    )
    if len(command) > MAX_COMMAND:
        raise ValueError(f"the command has {len(command)} characters, over {MAX_COMMAND}")
    return {"command": command, "carry": [dest], "timeout_s": TIMEOUT_S}
