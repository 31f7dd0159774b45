"""Where datasets live: the tfds data dir and the raw-source directories.

These are the only environment reads of nr_jax: ``$NR_JAX_DATA_DIR`` (the tfds data dir),
``$NR_JAX_FASHION_MNIST_DIR`` and ``$NR_JAX_CIFAR_DIR`` (raw source files), each consulted only
when the caller passes no explicit directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CIFAR_DIR_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "DatasetNotFoundError",
    "resolve_data_dir",
    "resolve_dir",
]

DATA_DIR_ENV = "NR_JAX_DATA_DIR"
FASHION_MNIST_DIR_ENV = "NR_JAX_FASHION_MNIST_DIR"
CIFAR_DIR_ENV = "NR_JAX_CIFAR_DIR"
DEFAULT_DATA_DIR = "~/tensorflow_datasets"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """The data of a dataset is missing (or unreadable without TensorFlow) on this machine."""


def resolve_dir(
    explicit: str | os.PathLike[str] | None, env: str, default: str | os.PathLike[str]
) -> Path:
    """Returns ``explicit``, else ``$env``, else ``default``, user-expanded and absolute.

    Args:
        explicit: Directory passed by the caller, or ``None``.
        env: Name of the environment variable consulted when ``explicit`` is ``None``.
        default: Directory used when neither is set.

    Returns:
        The absolute path.
    """
    if explicit is None:
        explicit = os.environ.get(env) or default
    return Path(explicit).expanduser().absolute()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the tfds data dir: ``data_dir``, else ``$NR_JAX_DATA_DIR``, else default.

    Args:
        data_dir: Explicit directory, or ``None`` to use the environment/default.

    Returns:
        Absolute, user-expanded path (``~/tensorflow_datasets`` by default).
    """
    return resolve_dir(data_dir, DATA_DIR_ENV, DEFAULT_DATA_DIR)
