"""Host-side datasets: a TensorFlow-free tfds pipeline plus numpy batching.

Pipeline (no TensorFlow anywhere; ``tensorflow`` is never imported):

1. ``FashionMnistLocal`` is a ``tfds.core.GeneratorBasedBuilder`` (registered as
   ``fashion_mnist_local``) that reads the local IDX ``.gz`` files shipped by the Debian
   package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist`` by default,
   overridable with ``source_dir=`` or ``$NR_JAX_FASHION_MNIST_DIR``). It is prepared
   with ``download_and_prepare(download_config=tfds.download.DownloadConfig(...))`` into
   ``array_record`` files under the tfds data dir (``~/tensorflow_datasets`` by default,
   overridable with ``data_dir=`` or ``$NR_JAX_DATA_DIR``) and read back with
   ``builder.as_data_source()``.

   tfds-without-TF caveat: ``tfds.features.Image.encode_example`` encodes *numpy*
   images with ``tf.image.encode_png``, which needs TensorFlow. It also accepts
   already-encoded bytes, so the builder PNG-encodes each image with Pillow and yields
   the bytes. Decoding on the read side (``deserialize_example_np``) uses Pillow, so
   reading works without TensorFlow as well. ``DatasetInfo(disable_shuffling=True)``
   keeps the original IDX order, so ``limit=k`` means "the first k examples of the
   official file". tfds 4.9.10 also needs ``importlib_resources`` (undeclared
   dependency, tensorflow/datasets#11212) to prepare a builder defined inside a package;
   ``FashionMnistLocal.code_path`` is overridden so that it does not.

2. Per-example decoding through the data source is slow (~4k examples/s), so
   ``load_arrays`` decodes a whole split once and caches it as an uncompressed ``.npz``
   at ``<data_dir>/<builder name>/nr_jax_cache/<builder version>/<split>.npz``. The
   builder version is part of both the path and the stored metadata, so bumping
   ``VERSION`` invalidates the cache. The cache lives outside the tfds version directory
   on purpose: tfds treats an existing version directory as "already prepared".

3. ``train_batches`` / ``eval_batches`` / ``prefetch`` turn the arrays into fixed-shape
   float32 host batches for a jitted train/eval step.

To add a dataset (e.g. CIFAR-10), write a builder that accepts ``data_dir`` and
``source_dir`` keyword arguments and implements ``check_source_files()``, then add an
entry to ``_REGISTRY`` and ``DATASET_INFO``.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import io
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

__all__ = [
    "DATASET_INFO",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FashionMnistLocal",
    "eval_batches",
    "known_datasets",
    "load_arrays",
    "normalize",
    "prefetch",
    "prepare_dataset",
    "resolve_data_dir",
    "steps_per_epoch",
    "train_batches",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATA_DIR_ENV = "NR_JAX_DATA_DIR"
FASHION_MNIST_DIR_ENV = "NR_JAX_FASHION_MNIST_DIR"
DEFAULT_DATA_DIR = "~/tensorflow_datasets"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_CACHE_DIRNAME = "nr_jax_cache"
_CACHE_FORMAT = 1  # Bump to invalidate every cache written by an older nr_jax.
_DECODE_CHUNK = 4096

# IDX magic numbers: two zero bytes, a dtype code (0x08 = uint8) and the number of dims.
_IDX_UINT8 = 0x08
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims (N, rows, cols).
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim (N,).

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# tfds split name -> file prefix of the IDX files.
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


class DatasetNotFoundError(FileNotFoundError):
    """The raw source files of a dataset are missing on this machine."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset needed by models and input pipelines.

    Attributes:
        num_classes: Number of label classes.
        image_shape: ``(H, W, C)`` of one image.
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


DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        num_classes=10, image_shape=(28, 28, 1), mean=(0.2860,), std=(0.3530,)
    ),
}


# --------------------------------------------------------------------------------------
# Paths and raw IDX reading
# --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the tfds data dir: ``data_dir``, else ``$NR_JAX_DATA_DIR``, else default.

    Args:
        data_dir: Explicit directory, or ``None`` to use the environment/default.

    Returns:
        Absolute, user-expanded path (``~/tensorflow_datasets`` by default).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser().absolute()


def _resolve_fashion_mnist_dir(source_dir: str | os.PathLike[str] | None) -> Path:
    if source_dir is None:
        source_dir = os.environ.get(FASHION_MNIST_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR
    return Path(source_dir).expanduser().absolute()


def _fashion_mnist_paths(source_dir: Path, split: str) -> tuple[Path, Path]:
    prefix = _FASHION_MNIST_FILES[split]
    return (
        source_dir / f"{prefix}-images-idx3-ubyte.gz",
        source_dir / f"{prefix}-labels-idx1-ubyte.gz",
    )


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Reads a gzip-compressed uint8 IDX file into an array of shape ``dims``."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: expected an IDX file, got only {len(data)} bytes")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: expected IDX magic number {expected_magic}, got {magic} "
            f"(dtype code {(magic >> 8) & 0xFF:#x}, {magic & 0xFF} dims)"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header + math.prod(dims)
    if len(data) != expected_bytes:
        raise ValueError(
            f"{path}: header says dims {dims} ({expected_bytes} bytes in total), "
            f"but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _encode_png(image: np.ndarray) -> bytes:
    """PNG-encodes a uint8 ``(H, W)`` or ``(H, W, 1)`` image with Pillow (no TF)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.reshape(image.shape[:2])), mode="L").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# tfds builder
# --------------------------------------------------------------------------------------


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX ``.gz`` files, stored as array_record.

    Features: ``image`` (uint8 ``(28, 28, 1)``, PNG-encoded on disk) and ``label``
    (``ClassLabel`` with 10 classes). Splits: ``train`` (60000) and ``test`` (10000),
    in the original file order.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Local IDX files, PNG-encoded images, original order."
    }

    def __init__(self, *, source_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """Creates the builder.

        Args:
            source_dir: Directory with the four IDX ``.gz`` files. Defaults to
                ``$NR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
            **kwargs: Forwarded to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
                ``file_format``, ...). ``file_format`` defaults to ``"array_record"``.
        """
        self.source_dir = _resolve_fashion_mnist_dir(source_dir)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        """Path of this module, computed without ``importlib_resources``.

        tfds 4.9.10's ``DatasetBuilder.code_path`` references
        ``importlib_resources.abc.Traversable`` for builders defined inside a package,
        but only declares that dependency for Python < 3.9, so ``download_and_prepare``
        dies with ``ModuleNotFoundError: importlib_resources`` (tensorflow/datasets#11212).
        This returns what tfds' own fallback branch computes: the builder's source file.
        """
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    def _info(self) -> tfds.core.DatasetInfo:
        # `tfds.core.DatasetInfo` directly: `dataset_info_from_configs` wants a package
        # directory with metadata files next to the builder module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando), read from local IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            disable_shuffling=True,
        )

    def check_source_files(self) -> None:
        """Raises ``DatasetNotFoundError`` unless all four IDX files exist.

        Raises:
            DatasetNotFoundError: Naming the missing directory or file(s).
        """
        if not self.source_dir.is_dir():
            missing: list[Path] = [self.source_dir]
        else:
            missing = [
                path
                for split in _FASHION_MNIST_FILES
                for path in _fashion_mnist_paths(self.source_dir, split)
                if not path.is_file()
            ]
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise DatasetNotFoundError(
                f"Fashion-MNIST source not found: {names}. Expected the IDX files "
                "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz in "
                f"{self.source_dir}. Install them with "
                "`apt-get install -y dataset-fashion-mnist` (provides "
                f"{DEFAULT_FASHION_MNIST_DIR}), or set {FASHION_MNIST_DIR_ENV} "
                "(or pass source_dir=) to a directory that contains them."
            )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download.
        self.check_source_files()
        return {
            split: self._generate_examples(*_fashion_mnist_paths(self.source_dir, split))
            for split in _FASHION_MNIST_FILES
        }

    def _generate_examples(
        self, images_path: Path, labels_path: Path
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, 28, 28) and labels (N,); got {images.shape} from "
                f"{images_path} and {labels.shape} from {labels_path}"
            )
        for index in range(images.shape[0]):
            # Encoded bytes, not a numpy image: tfds encodes numpy images with TF.
            yield index, {"image": _encode_png(images[index]), "label": int(labels[index])}


@dataclasses.dataclass(frozen=True)
class _DatasetSource:
    """How to build one named dataset. ``builder_cls(data_dir=, source_dir=)``."""

    builder_cls: type[tfds.core.GeneratorBasedBuilder]
    splits: tuple[str, ...]


_REGISTRY: dict[str, _DatasetSource] = {
    "fashion_mnist": _DatasetSource(builder_cls=FashionMnistLocal, splits=("train", "test")),
}


def known_datasets() -> tuple[str, ...]:
    """Returns the names accepted by ``load_arrays``, sorted."""
    return tuple(sorted(_REGISTRY))


def _lookup(name: str) -> _DatasetSource:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    return _REGISTRY[name]


def _make_builder(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    source_dir: str | os.PathLike[str] | None,
) -> tfds.core.GeneratorBasedBuilder:
    source = _lookup(name)
    return source.builder_cls(data_dir=os.fspath(resolve_data_dir(data_dir)), source_dir=source_dir)


def _prepare(builder: tfds.core.GeneratorBasedBuilder) -> None:
    if builder.is_prepared():
        return
    builder.check_source_files()  # One clear error before tfds creates any directory.
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
    """Prepares the tfds array_record files of ``name`` (no-op if already prepared).

    Args:
        name: Registered dataset name (see ``known_datasets()``).
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.
        source_dir: Directory with the raw source files; dataset-specific default.

    Returns:
        The prepared version directory, e.g. ``<data_dir>/fashion_mnist_local/1.0.0``.

    Raises:
        ValueError: Unknown ``name``.
        DatasetNotFoundError: The source files are missing and nothing is prepared yet.
    """
    builder = _make_builder(name, data_dir, source_dir)
    _prepare(builder)
    return Path(os.fspath(builder.data_dir))


# --------------------------------------------------------------------------------------
# Decoding + .npz cache
# --------------------------------------------------------------------------------------


def _cache_path(root: Path, source: _DatasetSource, split: str) -> Path:
    builder_cls = source.builder_cls
    return root / builder_cls.name / _CACHE_DIRNAME / str(builder_cls.VERSION) / f"{split}.npz"


def _cache_meta(source: _DatasetSource, split: str) -> dict[str, str]:
    return {
        "builder": source.builder_cls.name,
        "version": str(source.builder_cls.VERSION),
        "split": split,
        "format": str(_CACHE_FORMAT),
    }


def _read_cache(
    path: Path, source: _DatasetSource, split: str
) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    expected = _cache_meta(source, split)
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {key: str(npz[f"meta_{key}"]) for key in expected}
            if found != expected:
                logger.warning("Ignoring stale cache %s: %s != %s", path, found, expected)
                return None
            images = npz["images"]
            labels = npz["labels"]
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
            path,
            images.dtype,
            images.shape,
            labels.dtype,
            labels.shape,
        )
        return None
    return images, labels


def _write_cache(
    path: Path, source: _DatasetSource, split: str, images: np.ndarray, labels: np.ndarray
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    meta = {f"meta_{k}": np.asarray(v) for k, v in _cache_meta(source, split).items()}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, **meta)
        os.replace(tmp, path)  # Atomic: readers never see a half-written cache.
    finally:
        tmp.unlink(missing_ok=True)


def _decode_split(
    builder: tfds.core.GeneratorBasedBuilder, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole prepared split through ``as_data_source`` into numpy arrays."""
    data_source = builder.as_data_source(split=split)
    num = len(data_source)
    shape = tuple(builder.info.features["image"].shape)
    images = np.empty((num, *shape), dtype=np.uint8)
    labels = np.empty((num,), dtype=np.int32)
    start = time.perf_counter()
    for lo in range(0, num, _DECODE_CHUNK):
        hi = min(lo + _DECODE_CHUNK, num)
        for offset, example in enumerate(data_source.__getitems__(list(range(lo, hi)))):
            images[lo + offset] = example["image"]
            labels[lo + offset] = example["label"]
    logger.info(
        "Decoded %s/%s (%d examples) in %.1f s",
        builder.name,
        split,
        num,
        time.perf_counter() - start,
    )
    return images, labels


def load_arrays(
    name: str = "fashion_mnist",
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split as numpy arrays, preparing and caching it on first use.

    The first call prepares the tfds dataset (if needed), decodes the split through
    ``builder.as_data_source()`` and writes
    ``<data_dir>/<builder>/nr_jax_cache/<version>/<split>.npz``; later calls only read
    that file.

    Args:
        name: Registered dataset name (see ``known_datasets()``).
        split: ``"train"`` or ``"test"``.
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.
        source_dir: Directory with the raw source files (only read when the dataset is
            not prepared yet); for Fashion-MNIST defaults to
            ``$NR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
        limit: If given, return only the first ``limit`` examples (in file order).

    Returns:
        ``(images, labels)``: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.

    Raises:
        ValueError: Unknown ``name`` or ``split``, or ``limit`` outside ``[0, N]``.
        TypeError: ``limit`` is not an int.
        DatasetNotFoundError: Source files are missing and the split is not prepared.
    """
    source = _lookup(name)
    if split not in source.splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {name!r}; expected one of {source.splits}"
        )
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool)):
        raise TypeError(f"limit must be an int or None; got {type(limit).__name__}")

    root = resolve_data_dir(data_dir)
    cache = _cache_path(root, source, split)
    start = time.perf_counter()
    arrays = _read_cache(cache, source, split)
    if arrays is not None:
        logger.info(
            "Loaded %s/%s from cache %s in %.2f s", name, split, cache, time.perf_counter() - start
        )
    else:
        builder = _make_builder(name, root, source_dir)
        _prepare(builder)
        arrays = _decode_split(builder, split)
        _write_cache(cache, source, split, *arrays)
        logger.info("Wrote cache %s (%.1f s in total)", cache, time.perf_counter() - start)
    images, labels = arrays

    if limit is not None:
        if not 0 <= limit <= images.shape[0]:
            raise ValueError(
                f"limit must be in [0, {images.shape[0]}] for {name}/{split}; got {limit}"
            )
        images, labels = images[:limit], labels[:limit]
    return images, labels


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def normalize(images_uint8: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Scales uint8 pixels to ``(x / 255 - mean) / std`` per channel.

    Args:
        images_uint8: uint8 array ``(..., C)``, e.g. ``(B, H, W, C)``.
        info: Supplies per-channel ``mean`` and ``std`` (length ``C``).

    Returns:
        float32 array with the same shape.

    Raises:
        TypeError: ``images_uint8`` is not a uint8 array.
        ValueError: The channel count does not match ``info``.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 images; got dtype {images_uint8.dtype}")
    channels = len(info.mean)
    if images_uint8.ndim == 0 or images_uint8.shape[-1] != channels:
        raise ValueError(
            f"expected images (..., {channels}) to match info.mean/std; "
            f"got shape {images_uint8.shape}"
        )
    std = np.asarray(info.std, dtype=np.float32)
    scale = np.float32(1.0 / 255.0) / std
    shift = np.asarray(info.mean, dtype=np.float32) / std
    out = images_uint8.astype(np.float32)
    out *= scale
    out -= shift
    return out


def _to_float(images: np.ndarray, info: DatasetInfo | None) -> np.ndarray:
    if info is not None:
        return normalize(images, info)
    out = images.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _check_int(value: Any, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}; got {value}")
    return int(value)


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {images.shape[0]} (from images); "
            f"got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}")
    return images, labels


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches per epoch (the ragged remainder is dropped).

    Args:
        num_examples: Examples in the split.
        batch_size: Examples per batch, ``1 <= batch_size <= num_examples``.

    Returns:
        ``num_examples // batch_size``.

    Raises:
        ValueError: ``batch_size <= 0`` or ``batch_size > num_examples``.
    """
    num_examples = _check_int(num_examples, "num_examples", minimum=0)
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size ({batch_size}) must not exceed num_examples ({num_examples}): "
            "an epoch would contain no full batch"
        )
    return num_examples // batch_size


def _augment_padding(height: int, width: int) -> int:
    return 4 if min(height, width) >= 32 else 2


def _crop_and_flip(
    batch: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
    """Random crop after zero padding, then optional horizontal flip, in one gather.

    Args:
        batch: uint8 ``(B, H, W, C)``.
        offsets: int ``(B, 2)`` top/left crop offsets in ``[0, 2 * pad]``.
        flips: bool ``(B,)``; True flips that image left-right.
        pad: Zero padding on each side.

    Returns:
        uint8 ``(B, H, W, C)``.
    """
    num, height, width, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(height)  # (B, H)
    cols = offsets[:, 1, None] + np.arange(width)  # (B, W)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(num)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: bool = False,
    info: DatasetInfo | None = None,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one shuffled epoch of fixed-shape training batches.

    The permutation (and, with ``augment``, every crop offset and flip) is drawn up
    front from ``np.random.default_rng([seed, epoch])``, so an epoch is a pure function
    of ``(seed, epoch)`` and ``start_batch=k`` yields exactly batches ``k, k+1, ...`` of
    the full epoch without computing the first ``k``.

    Args:
        images: uint8 ``(N, H, W, C)``.
        labels: integer ``(N,)``.
        batch_size: ``B``; the ragged remainder ``N % B`` is dropped.
        seed: Non-negative run seed.
        epoch: Non-negative epoch index.
        augment: Random crop after zero padding (2 px; 4 px for images >= 32x32) and
            random horizontal flip, vectorised over the batch.
        info: If given, images are normalised with ``normalize(.., info)``; otherwise
            they are scaled to ``[0, 1]``.
        start_batch: Index of the first batch to yield, in ``[0, steps_per_epoch]``.

    Yields:
        ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``.

    Raises:
        TypeError: Bad dtypes or non-int ``seed``/``epoch``/``start_batch``.
        ValueError: Mismatched lengths, bad ``batch_size`` or ``start_batch`` range.
    """
    images, labels = _check_arrays(images, labels)
    seed = _check_int(seed, "seed", minimum=0)
    epoch = _check_int(epoch, "epoch", minimum=0)
    start_batch = _check_int(start_batch, "start_batch", minimum=0)
    num = images.shape[0]
    num_batches = steps_per_epoch(num, batch_size)
    if start_batch > num_batches:
        raise ValueError(
            f"start_batch must be in [0, {num_batches}] (steps per epoch); got {start_batch}"
        )
    if info is not None and tuple(info.image_shape) != images.shape[1:]:
        raise ValueError(
            f"images have shape {images.shape[1:]} per example but info.image_shape is "
            f"{info.image_shape}"
        )
    return _train_batches(
        images, labels, batch_size, seed, epoch, augment, info, start_batch, num_batches
    )


def _train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: bool,
    info: DatasetInfo | None,
    start_batch: int,
    num_batches: int,
) -> Iterator[dict[str, np.ndarray]]:
    num, height, width, _ = images.shape
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num)
    if augment:
        pad = _augment_padding(height, width)
        offsets = rng.integers(0, 2 * pad + 1, size=(num, 2))
        flips = rng.random(num) < 0.5
    for index in range(start_batch, num_batches):
        window = slice(index * batch_size, (index + 1) * batch_size)
        chosen = order[window]
        batch = images[chosen]
        if augment:
            batch = _crop_and_flip(batch, offsets[window], flips[window], pad)
        yield {
            "image": _to_float(batch, info),
            "label": labels[chosen].astype(np.int32),
        }


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    info: DatasetInfo | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example once, in order, in fixed-shape batches with a mask.

    Args:
        images: uint8 ``(N, H, W, C)``.
        labels: integer ``(N,)``.
        batch_size: ``B`` (> 0; may exceed ``N``).
        info: If given, images are normalised with ``normalize``; otherwise scaled
            to ``[0, 1]``.

    Yields:
        ``{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": float32 (B,)}``.
        The last batch is zero-padded to ``B`` examples; ``mask`` is 1 for real examples
        and 0 for padding, so ``sum(mask)`` over all batches is ``N``.

    Raises:
        TypeError: Bad dtypes or non-int ``batch_size``.
        ValueError: Mismatched lengths, empty input or ``batch_size <= 0``.
    """
    images, labels = _check_arrays(images, labels)
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("eval_batches needs at least one example; got N = 0")
    return _eval_batches(images, labels, batch_size, info)


def _eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, info: DatasetInfo | None
) -> Iterator[dict[str, np.ndarray]]:
    num = images.shape[0]
    for lo in range(0, num, batch_size):
        batch = images[lo : lo + batch_size]
        batch_labels = labels[lo : lo + batch_size].astype(np.int32)
        real = batch.shape[0]
        mask = np.ones((batch_size,), dtype=np.float32)
        if real < batch_size:
            missing = batch_size - real
            batch = np.concatenate(
                [batch, np.zeros((missing, *batch.shape[1:]), dtype=batch.dtype)]
            )
            batch_labels = np.concatenate([batch_labels, np.zeros((missing,), np.int32)])
            mask[real:] = 0.0
        yield {"image": _to_float(batch, info), "label": batch_labels, "mask": mask}


# --------------------------------------------------------------------------------------
# Prefetch
# --------------------------------------------------------------------------------------


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _Prefetcher(Generic[T]):
    """Iterator that pulls from ``source`` on a daemon thread into a bounded queue."""

    def __init__(self, source: Iterable[T], size: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(iter(source),), name="nr_jax-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except Exception as error:  # Handed to the consumer, which re-raises it.
            self._put(_Raised(error))
            return
        self._put(_END)

    def __iter__(self) -> _Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the producer thread (it exits at its next queue operation)."""
        self._stop.set()
        self._done = True

    def __del__(self) -> None:
        self._stop.set()


def prefetch(iterator: Iterable[T], size: int = 2) -> Iterator[T]:
    """Produces items of ``iterator`` ahead of the consumer on a background thread.

    Args:
        iterator: Any iterable, e.g. ``train_batches(...)``.
        size: Maximum number of items buffered ahead (>= 1).

    Returns:
        An iterator over the same items in the same order. An exception raised by
        ``iterator`` is re-raised from ``next()`` at the point where it occurred.
        ``close()`` (or dropping the iterator) stops the daemon thread.

    Raises:
        TypeError / ValueError: ``size`` is not an int >= 1.
    """
    size = _check_int(size, "size", minimum=1)
    return _Prefetcher(iterator, size)
