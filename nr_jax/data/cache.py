"""Whole splits decoded once into an uncompressed ``.npz`` cache, read back as arrays.

Per-example decoding through a tfds data source is slow (~4k examples/s), so ``load_arrays``
decodes a split once and caches it at
``<data_dir>/<builder name>/nr_jax_cache/<builder version>/<split>.npz``. The builder version is
part of both the path and the stored metadata, so bumping ``VERSION`` invalidates the cache. The
cache lives outside the tfds version directory on purpose: tfds treats an existing version
directory as "already prepared".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from nr_jax.data import paths, prepared, registry

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "nr_jax_cache"
CACHE_FORMAT = 1  # Bump to invalidate every cache written by an older nr_jax.
_DECODE_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """What a cached split was decoded from: tfds builder name and version."""

    builder: str
    version: str

    def path(self, root: Path, split: str) -> Path:
        """``<root>/<builder>/nr_jax_cache/<version>/<split>.npz``."""
        return root / self.builder / CACHE_DIRNAME / self.version / f"{split}.npz"

    def meta(self, split: str) -> dict[str, str]:
        """The metadata stored next to the arrays and checked on reading."""
        return {
            "builder": self.builder,
            "version": self.version,
            "split": split,
            "format": str(CACHE_FORMAT),
        }


def read_cache(path: Path, key: CacheKey, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(images, labels)`` of a valid cache file, else ``None`` (stale, corrupt, malformed)."""
    if not path.is_file():
        return None
    expected = key.meta(split)
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: str(npz[f"meta_{k}"]) for k in expected}
            if found != expected:
                logger.warning("Ignoring stale cache %s: %s != %s", path, found, expected)
                return None
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, EOFError) as err:  # Corrupt or truncated file.
        logger.warning("Ignoring unreadable cache %s: %s", path, err)
        return None
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or labels.dtype != np.int32
        or labels.shape != images.shape[:1]
    ):
        logger.warning(
            "Ignoring malformed cache %s: images %s %s, labels %s %s",
            *(path, images.dtype, images.shape, labels.dtype, labels.shape),
        )
        return None
    return images, labels


def write_cache(
    path: Path, key: CacheKey, split: str, images: np.ndarray, labels: np.ndarray
) -> None:
    """Writes the cache atomically: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    meta = {f"meta_{k}": np.asarray(v) for k, v in key.meta(split).items()}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, **meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def decode_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole prepared split through ``as_data_source`` into numpy arrays."""
    data_source = builder.as_data_source(split=split)
    num = len(data_source)
    images = np.empty((num, *builder.info.features["image"].shape), dtype=np.uint8)
    labels = np.empty((num,), dtype=np.int32)
    start = time.perf_counter()
    for lo in range(0, num, _DECODE_CHUNK):
        hi = min(lo + _DECODE_CHUNK, num)
        for offset, example in enumerate(data_source.__getitems__(list(range(lo, hi)))):
            images[lo + offset] = example["image"]
            labels[lo + offset] = example["label"]
    logger.info(
        "Decoded %s/%s (%d examples) in %.1f s",
        *(builder.name, split, num, time.perf_counter() - start),
    )
    return images, labels


def _builder_for(
    name: str, root: Path, source_dir: str | os.PathLike[str] | None
) -> tuple[CacheKey, Callable[[], tfds.core.DatasetBuilder]]:
    """The cache key of ``name`` and a function that returns its (prepared) builder."""
    source = registry.local_source(name)
    official = registry.readable_official(source, root)
    if official is not None and official.readable is not None:
        return CacheKey(official.name, official.readable.name), (
            lambda: prepared.official_builder(official)
        )

    def make() -> tfds.core.DatasetBuilder:
        builder = registry.make_builder(name, root, source_dir)
        registry.prepare_builder(builder)
        return builder

    return CacheKey(source.builder_cls.name, str(source.builder_cls.VERSION)), make


def _check_limit(limit: object) -> None:
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool)):
        raise TypeError(f"limit must be an int or None; got {type(limit).__name__}")


def load_arrays(
    name: str = "fashion_mnist",
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split as numpy arrays, preparing and caching it on first use.

    Sources, in order: (CIFAR only) the official tfds dataset ``name`` prepared in
    array_record under ``data_dir``; else the local builder (``<name>_local``), prepared
    from the raw files in ``source_dir`` if needed. The first call decodes the split
    through ``as_data_source()`` and writes the ``.npz`` cache; later calls only read it.

    Args:
        name: Registered dataset name (see ``known_datasets()``): ``"fashion_mnist"``,
            ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or ``~/tensorflow_datasets``.
        source_dir: Directory with the raw source files (only read when the dataset is
            not prepared yet). Fashion-MNIST: the IDX files, default
            ``$NR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
            CIFAR: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or the
            extracted folder (or the folder itself), default ``$NR_JAX_CIFAR_DIR``, else
            ``data_dir``.
        limit: If given, return only the first ``limit`` examples (in stored order).

    Returns:
        ``(images, labels)``: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.

    Raises:
        ConfigError: Unknown ``name`` (a ``ValueError``).
        ValueError: Unknown ``split``, or ``limit`` outside ``[0, N]``.
        TypeError: ``limit`` is not an int.
        DatasetNotFoundError: Nothing readable is prepared and the source files are
            missing; the message names every place searched and how to get the data.
    """
    source = registry.local_source(name)
    if split not in source.splits:
        raise ValueError(f"unknown split {split!r} for {name!r}; expected one of {source.splits}")
    _check_limit(limit)
    root = paths.resolve_data_dir(data_dir)
    key, make_builder = _builder_for(name, root, source_dir)
    cache, start = key.path(root, split), time.perf_counter()
    arrays = read_cache(cache, key, split)
    if arrays is None:
        arrays = decode_split(make_builder(), split)
        write_cache(cache, key, split, *arrays)
        logger.info("Wrote cache %s (%.1f s in total)", cache, time.perf_counter() - start)
    else:
        logger.info(
            "Loaded %s/%s from %s in %.2f s", name, split, cache, time.perf_counter() - start
        )
    images, labels = arrays
    if limit is None:
        return images, labels
    if not 0 <= limit <= images.shape[0]:
        raise ValueError(f"limit must be in [0, {images.shape[0]}] for {name}/{split}; got {limit}")
    return images[:limit], labels[:limit]
