"""The datasets nr_jax knows: their static facts (``DATASET_INFO``) and where to get them.

``dataset_info(name)`` and ``local_source(name)`` are the look-ups; an unknown name raises the
one-line ``ConfigError`` of ``nr_jax.config``, before any compute.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import tensorflow_datasets as tfds

from nr_jax.config import ConfigError
from nr_jax.data import builders, paths, prepared

logger = logging.getLogger(__name__)

IMAGENET_NAME = "imagenet2012"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset needed by models and input pipelines.

    Attributes:
        num_classes: Number of label classes.
        image_shape: ``(H, W, C)`` of one (model input) image.
        mean: Per-channel mean of ``pixels / 255`` over the training set, length ``C``.
        std: Per-channel standard deviation of ``pixels / 255``, length ``C``.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C); got {self.image_shape!r}")
        channels = self.image_shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need one entry per channel ({channels}); "
                f"got mean={self.mean!r}, std={self.std!r}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std entries must be > 0; got {self.std!r}")


# The official Neural Rejuvenation code normalises CIFAR-100 with the CIFAR-10 constants.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)

DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        num_classes=10, image_shape=(28, 28, 1), mean=(0.2860,), std=(0.3530,)
    ),
    "cifar10": DatasetInfo(
        num_classes=10, image_shape=(32, 32, 3), mean=_CIFAR_MEAN, std=_CIFAR_STD
    ),
    "cifar100": DatasetInfo(
        num_classes=100, image_shape=(32, 32, 3), mean=_CIFAR_MEAN, std=_CIFAR_STD
    ),
    IMAGENET_NAME: DatasetInfo(
        num_classes=1000,
        image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """The ``DatasetInfo`` of ``name``.

    Raises:
        ConfigError: ``name`` is not a key of ``DATASET_INFO``; the one-line message
            ``config.dataset = 'x' is not allowed: one of [...]``.
    """
    if not isinstance(name, str) or name not in DATASET_INFO:
        raise ConfigError(
            f"config.dataset = {name!r} is not allowed: one of {sorted(DATASET_INFO)}"
        )
    return DATASET_INFO[name]


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """How to get one small dataset as arrays.

    Attributes:
        builder_cls: Local builder, ``builder_cls(data_dir=, source_dir=)``.
        splits: Split names.
        tfds_name: Official tfds dataset read first when prepared in array_record.
    """

    builder_cls: type[builders.LocalBuilder]
    splits: tuple[str, ...]
    tfds_name: str | None = None


SOURCES: dict[str, DatasetSource] = {
    "fashion_mnist": DatasetSource(builders.FashionMnistLocal, splits=("train", "test")),
    "cifar10": DatasetSource(builders.Cifar10Local, ("train", "test"), tfds_name="cifar10"),
    "cifar100": DatasetSource(builders.Cifar100Local, ("train", "test"), tfds_name="cifar100"),
}


def known_datasets() -> tuple[str, ...]:
    """Returns the names accepted by ``load_arrays``, sorted."""
    return tuple(sorted(SOURCES))


def local_source(name: str) -> DatasetSource:
    """The ``DatasetSource`` of a dataset ``load_arrays`` reads.

    Raises:
        ConfigError: ``name`` is not in ``known_datasets()`` (ImageNet is read per example,
            with ``load_imagenet_source``).
    """
    if not isinstance(name, str) or name not in SOURCES:
        raise ConfigError(
            f"config.dataset = {name!r} is not allowed: one of {list(known_datasets())} "
            f"(as arrays; {IMAGENET_NAME} is read per example with load_imagenet_source)"
        )
    return SOURCES[name]


def readable_official(source: DatasetSource, root: Path) -> prepared.Prepared | None:
    """The official tfds dataset of ``source`` if it is prepared in array_record under root."""
    if source.tfds_name is None:
        return None
    found = prepared.find_prepared(root, source.tfds_name)
    return found if found.readable is not None else None


def make_builder(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    source_dir: str | os.PathLike[str] | None,
) -> builders.LocalBuilder:
    """The local builder of ``name`` (not prepared yet)."""
    data_root = os.fspath(paths.resolve_data_dir(data_dir))
    return local_source(name).builder_cls(data_dir=data_root, source_dir=source_dir)


def prepare_builder(builder: builders.LocalBuilder) -> None:
    """Prepares ``builder`` into array_record unless it already is (no TensorFlow).

    Raises:
        DatasetNotFoundError: The raw files are missing (before tfds creates any directory).
    """
    if builder.is_prepared():
        return
    builder.check_source_files()
    logger.info("Preparing %s into %s", builder.name, builder.data_dir)
    start = time.perf_counter()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    logger.info("Prepared %s in %.1f s", builder.name, time.perf_counter() - start)


def prepare_dataset(
    name: str = "fashion_mnist",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Makes ``name`` readable: finds or prepares its tfds array_record files.

    Args:
        name: Registered dataset name (see ``known_datasets()``).
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.
        source_dir: Directory with the raw source files; dataset-specific default.

    Returns:
        The version directory that will be read: an official tfds dataset prepared in
        array_record (CIFAR, e.g. ``<data_dir>/cifar10/3.0.2``), else the local one,
        e.g. ``<data_dir>/fashion_mnist_local/1.0.0`` (prepared now if needed).

    Raises:
        ConfigError: Unknown ``name`` (a ``ValueError``).
        DatasetNotFoundError: The source files are missing and nothing is prepared yet.
    """
    official = readable_official(local_source(name), paths.resolve_data_dir(data_dir))
    if official is not None and official.readable is not None:
        return official.readable
    builder = make_builder(name, data_dir, source_dir)
    prepare_builder(builder)
    return Path(os.fspath(builder.data_dir))
