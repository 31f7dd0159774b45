"""The Python packages the accelerator check imports, checked before anything imports them.

The GPU machine has its own Python, jax and libraries and no network (`../shared`'s device notes,
KINDS.md): what it lacks travels as wheels (`experiments.accelerator_bundle`). This module uses
the standard library only, so that a missing package is one clear line, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

# import name -> the distribution to carry when it is missing; the modules whose import pulls in
# the rest (tensorflow_datasets needs promise, dm-tree, simple_parsing, tensorflow_metadata, ...)
REQUIRED = {
    "numpy": "numpy",
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "absl": "absl-py",
    "ml_collections": "ml_collections",
    "etils.epath": "etils",
    "grain": "grain",
    "array_record": "array_record",
    "tensorflow_datasets": "tensorflow-datasets",
    "orbax.checkpoint": "orbax-checkpoint",
    "PIL": "pillow",
    "tqdm": "tqdm",
}
# only the `tests` section's pytest child imports these: found, not imported (faster)
TEST_ONLY = {"pytest": "pytest", "chex": "chex", "hypothesis": "hypothesis"}
BUNDLE_COMMAND = "python -m experiments.accelerator_bundle --dest .accel"


def missing_modules(
    required: dict[str, str] | None = None, found: dict[str, str] | None = None
) -> dict[str, str]:
    """The modules that fail to import: {module: why} (e.g. "No module named 'promise'").

    Args:
      required: import name -> distribution, imported (default `REQUIRED`).
      found: import name -> distribution, only looked up (default `TEST_ONLY`).
    """
    missing = {}
    for module in REQUIRED if required is None else required:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - ImportError, or a broken install of another kind
            missing[module] = " ".join(str(e).split()) or type(e).__name__
    for module in TEST_ONLY if found is None else found:
        if importlib.util.find_spec(module) is None:
            missing[module] = f"No module named {module!r}"
    return missing


def message(missing: dict[str, str]) -> str:
    """The one-line refusal naming every missing module and how to bring it."""
    parts = "; ".join(f"{m} ({why})" for m, why in missing.items())
    return (
        f"missing Python packages on this machine: {parts}. Carry them as wheels: here, "
        f"`{BUNDLE_COMMAND}` writes them and prints the run command that installs them"
    )
