"""The Fashion-MNIST subset that travels to the GPU machine (`.npz`), and its use there as the
dataset of ordinary nr_jax runs.

`write_subset` stores the first N training and M test images of the project's own loader
(`nr_jax.data.load_arrays`, stored order) in one compressed `.npz`; `install_as_cache` writes them
where `load_arrays(data_dir=...)` finds its decoded-split cache, so that `train_and_evaluate` with
`config.data_dir` set to that directory trains on exactly these images, with no tfds preparation
and no source files. A CPU run of the same setting reads the same file, so both see the same data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FORMAT = 1
SHAPE = (28, 28, 1)
Split = tuple[np.ndarray, np.ndarray]  # images uint8 (N, 28, 28, 1), labels int32 (N,)


def write_subset(path: str | os.PathLike[str], train: Split, test: Split, source: str) -> int:
    """Writes the subset atomically; returns its size in bytes.

    Args:
      path: the `.npz` file (its folder is made).
      train, test: (images uint8 (N, 28, 28, 1), labels int32 (N,)).
      source: where the images came from (stored with them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        _check(name, images, labels)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                train_images=train[0],
                train_labels=train[1],
                test_images=test[0],
                test_labels=test[1],
                format=np.asarray(FORMAT),
                source=np.asarray(source),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_subset(path: str | os.PathLike[str]) -> dict[str, Split | str]:
    """{"train": (images, labels), "test": (images, labels), "source": str} of a subset file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a subset file of this format.
    """
    with np.load(path, allow_pickle=False) as npz:
        if "format" not in npz or int(npz["format"]) != FORMAT:
            raise ValueError(f"{path}: not a Fashion-MNIST subset file of format {FORMAT}")
        out: dict[str, Split | str] = {"source": str(npz["source"])}
        for name in ("train", "test"):
            images, labels = npz[f"{name}_images"], npz[f"{name}_labels"]
            _check(name, images, labels)
            out[name] = (images, labels)
    return out


def synthetic_subset(n_train: int, n_test: int, seed: int = 0) -> tuple[Split, Split]:
    """Random images and labels of the subset's shapes (the CPU smoke mode's stand-in)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        images = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)
        return images, rng.integers(0, 10, n).astype(np.int32)

    return split(n_train), split(n_test)


def install_as_cache(subset: dict[str, Split | str], data_dir: str | os.PathLike[str]) -> str:
    """Writes the subset's splits as nr_jax's Fashion-MNIST cache under `data_dir`; returns
    `data_dir` (for `config.data_dir`)."""
    from nr_jax.data import cache, registry  # tensorflow_datasets: only where it is installed

    builder = registry.local_source("fashion_mnist").builder_cls
    key = cache.CacheKey(builder.name, str(builder.VERSION))
    root = Path(data_dir).absolute()
    for split in ("train", "test"):
        images, labels = subset[split]
        cache.write_cache(key.path(root, split), key, split, images, labels)
    return os.fspath(root)


def _check(name: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.shape[1:] != SHAPE:
        raise ValueError(
            f"{name} images: expected uint8 (N, 28, 28, 1), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{name} labels: expected int32 ({images.shape[0]},), got {labels.dtype} {labels.shape}"
        )
