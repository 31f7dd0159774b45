"""Host-side datasets: a TensorFlow-free tfds pipeline plus numpy batching.

Pipeline (no TensorFlow anywhere; ``tensorflow`` is never imported):

1. Small datasets (``load_arrays``): Fashion-MNIST, CIFAR-10 and CIFAR-100.

   * An official tfds dataset (``cifar10`` / ``cifar100``) that is already prepared in
     ``array_record`` format under the tfds data dir (``~/tensorflow_datasets`` by
     default, overridable with ``data_dir=`` or ``$NR_JAX_DATA_DIR``) is read directly
     with ``tfds.builder_from_directory(<data_dir>/<name>/<version>).as_data_source()``.
     That is what ``tfds.builder(name, data_dir=...)`` returns for a prepared dataset,
     but it does not import the dataset's builder code and it accepts any prepared
     version. A dataset prepared only as ``tfrecord`` (the tfds default) cannot be read
     without TensorFlow; ``DatasetNotFoundError`` then says how to re-prepare it.
   * Otherwise nr_jax builds a *local* tfds dataset from the raw files:
     ``FashionMnistLocal`` (``fashion_mnist_local``) from the IDX ``.gz`` files of the
     Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
     ``source_dir=`` or ``$NR_JAX_FASHION_MNIST_DIR``), and ``Cifar10Local`` /
     ``Cifar100Local`` (``cifar10_local`` / ``cifar100_local``) from the python-pickle
     archives ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or their extracted
     folders ``cifar-10-batches-py/`` / ``cifar-100-python/`` (looked for in
     ``source_dir=``, else ``$NR_JAX_CIFAR_DIR``, else the data dir). They are prepared
     with ``download_and_prepare`` into ``array_record`` files and read back with
     ``as_data_source()``. The local builders keep the original file order
     (``disable_shuffling=True``), so ``limit=k`` means "the first k examples of the
     official files"; the official tfds datasets are stored in tfds' shuffled order.

   tfds-without-TF caveats: ``tfds.features.Image.encode_example`` encodes *numpy*
   images with ``tf.image.encode_png``, which needs TensorFlow. It also accepts
   already-encoded bytes, so the local builders PNG-encode each image with Pillow and
   yield the bytes. Decoding on the read side (``deserialize_example_np``) uses Pillow.
   tfds 4.9.10 also needs ``importlib_resources`` (undeclared dependency,
   tensorflow/datasets#11212) to prepare a builder defined inside a package;
   ``code_path`` is overridden so that it does not. The ``tfds`` command-line tool
   itself imports TensorFlow, so the ``tfds build`` commands suggested in error messages
   must run in an environment that has it.

2. Per-example decoding through the data source is slow (~4k examples/s), so
   ``load_arrays`` decodes a whole split once and caches it as an uncompressed ``.npz``
   at ``<data_dir>/<builder name>/nr_jax_cache/<builder version>/<split>.npz``. The
   builder version is part of both the path and the stored metadata, so bumping
   ``VERSION`` invalidates the cache. The cache lives outside the tfds version directory
   on purpose: tfds treats an existing version directory as "already prepared".

3. ``train_batches`` / ``eval_batches`` / ``prefetch`` turn the arrays into fixed-shape
   float32 host batches for a jitted train/eval step (CIFAR: random crop with 4 px
   padding plus horizontal flip).

4. ImageNet is far too big for ``load_arrays``. ``load_imagenet_source`` returns the
   random-access ``as_data_source()`` of the tfds ``imagenet2012`` dataset prepared in
   array_record (images left JPEG-encoded), and ``train_batches_from_source`` /
   ``eval_batches_from_source`` decode, crop and resize each example on the fly on a
   thread pool (torchvision's ``RandomResizedCrop(224)`` + flip for training,
   ``Resize(256)`` + ``CenterCrop(224)`` for evaluation).

To add a small dataset, write a ``_LocalBuilder`` subclass (``check_source_files`` and
``_generate_examples(split)``) and add an entry to ``_REGISTRY`` and ``DATASET_INFO``.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import gzip
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import pickle
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

__all__ = [
    "CIFAR_DIR_ENV",
    "DATASET_INFO",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "Cifar100Local",
    "Cifar10Local",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FashionMnistLocal",
    "eval_batches",
    "eval_batches_from_source",
    "known_datasets",
    "load_arrays",
    "load_image_source",
    "load_imagenet_source",
    "normalize",
    "prefetch",
    "prepare_dataset",
    "resolve_data_dir",
    "steps_per_epoch",
    "train_batches",
    "train_batches_from_source",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATA_DIR_ENV = "NR_JAX_DATA_DIR"
FASHION_MNIST_DIR_ENV = "NR_JAX_FASHION_MNIST_DIR"
CIFAR_DIR_ENV = "NR_JAX_CIFAR_DIR"
DEFAULT_DATA_DIR = "~/tensorflow_datasets"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_CACHE_DIRNAME = "nr_jax_cache"
_CACHE_FORMAT = 1  # Bump to invalidate every cache written by an older nr_jax.
_DECODE_CHUNK = 4096
_ARRAY_RECORD = "array_record"

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

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# tfds split name -> file prefix of the IDX files.
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}

IMAGENET_NAME = "imagenet2012"
_IMAGENET_DOWNLOAD_URL = "https://image-net.org/download-images"


class DatasetNotFoundError(FileNotFoundError):
    """The data of a dataset is missing (or unreadable without TensorFlow) on this machine."""


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


# --------------------------------------------------------------------------------------
# Paths and raw file reading
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


def _resolve_dir(
    explicit: str | os.PathLike[str] | None, env: str, default: str | os.PathLike[str]
) -> Path:
    if explicit is None:
        explicit = os.environ.get(env) or default
    return Path(explicit).expanduser().absolute()


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
    """PNG-encodes a uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image with Pillow."""
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    """File layout of one python-pickle CIFAR archive (as distributed by its authors)."""

    name: str  # Official tfds name, e.g. "cifar10".
    title: str
    archive: str  # e.g. "cifar-10-python.tar.gz".
    folder: str  # Top-level folder inside the archive, e.g. "cifar-10-batches-py".
    files: dict[str, tuple[str, ...]]  # tfds split -> pickle files, in order.
    label_key: bytes
    num_classes: int

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


_CIFAR10_LAYOUT = _CifarLayout(
    name="cifar10",
    title="CIFAR-10",
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key=b"labels",
    num_classes=10,
)
_CIFAR100_LAYOUT = _CifarLayout(
    name="cifar100",
    title="CIFAR-100",
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    files={"train": ("train",), "test": ("test",)},
    label_key=b"fine_labels",
    num_classes=100,
)

# The only globals a CIFAR pickle needs (numpy 1.x files say numpy.core, 2.x numpy._core).
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals a CIFAR batch contains."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR pickle (only numpy arrays, "
                "lists, dicts and bytes are expected)"
            )
        if canonical.startswith("numpy.core"):
            module = _NUMPY_CORE + canonical[len("numpy.core") :]
        return super().find_class(module, name)


def _load_cifar_pickle(raw: bytes, where: str) -> dict[bytes, Any]:
    batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _read_cifar_split(
    layout: _CifarLayout, kind: str, path: Path, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split of a CIFAR pickle folder or archive.

    Args:
        layout: Which CIFAR.
        kind: ``"folder"`` (``path`` holds the pickle files) or ``"archive"`` (``path``
            is the ``.tar.gz``).
        path: Folder or archive.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` (HWC) and int64 ``(N,)``, in file
        order.
    """
    names = layout.files[split]
    raw: dict[str, bytes] = {}
    if kind == "folder":
        for name in names:
            raw[name] = (path / name).read_bytes()
    else:
        wanted = {f"{layout.folder}/{name}": name for name in names}
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                key = member.name.removeprefix("./")
                if key in wanted and member.isfile():
                    handle = archive.extractfile(member)
                    assert handle is not None  # A regular file always has a handle.
                    raw[wanted[key]] = handle.read()
        missing = [member for member, name in wanted.items() if name not in raw]
        if missing:
            raise DatasetNotFoundError(
                f"{path} does not contain {', '.join(missing)}: not a complete "
                f"{layout.title} python archive (download it again from {layout.url})"
            )
    images, labels = [], []
    for name in names:
        where = f"{path}/{name}" if kind == "folder" else f"{path}:{layout.folder}/{name}"
        batch = _load_cifar_pickle(raw.pop(name), where)
        if b"data" not in batch or layout.label_key not in batch:
            raise ValueError(
                f"{where}: expected keys b'data' and {layout.label_key!r}; got {sorted(batch)}"
            )
        data = np.asarray(batch[b"data"])
        batch_labels = np.asarray(batch[layout.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{where}: expected uint8 data (N, 3072); got {data.dtype} {data.shape}"
            )
        if batch_labels.shape != (data.shape[0],):
            raise ValueError(
                f"{where}: {data.shape[0]} images but labels of shape {batch_labels.shape}"
            )
        if batch_labels.size and (
            batch_labels.min() < 0 or batch_labels.max() >= layout.num_classes
        ):
            raise ValueError(f"{where}: labels outside [0, {layout.num_classes})")
        # Rows are channel-major: 1024 red, 1024 green, 1024 blue values (CHW).
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# --------------------------------------------------------------------------------------
# Prepared official tfds datasets (array_record only)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Version directories of one tfds dataset found under a data dir.

    Attributes:
        name: tfds dataset name.
        root: The tfds data dir that was searched.
        readable: Highest version directory that has array_record files, if any.
        unreadable: ``(version dir, formats)`` of prepared versions without array_record.
    """

    name: str
    root: Path
    readable: Path | None
    unreadable: tuple[tuple[Path, tuple[str, ...]], ...]

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name

    def build_command(self, overwrite: bool = False) -> str:
        command = f"tfds build {self.name} --file_format={_ARRAY_RECORD} --data_dir={self.root}"
        return command + " --overwrite" if overwrite else command

    def tfrecord_message(self) -> str:
        found = "; ".join(f"{path} ({', '.join(fmts)})" for path, fmts in self.unreadable)
        newest = self.unreadable[-1][0]
        return (
            f"tfds dataset {self.name!r} is prepared at {found}, but not in {_ARRAY_RECORD} "
            "format. Those files can only be read with TensorFlow, which nr_jax does not "
            f"use. Add {_ARRAY_RECORD} files next to them with `tfds convert_format "
            f"--dataset_version_dir={newest} --out_file_format={_ARRAY_RECORD}`, or "
            f"re-prepare it with `{self.build_command(overwrite=True)}` (without "
            "--overwrite tfds keeps the existing version). Run either where TensorFlow is "
            "installed: the tfds command-line tool imports it."
        )


def _file_formats(info_path: Path) -> tuple[str, ...] | None:
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("Ignoring unreadable %s: %s", info_path, err)
        return None
    # tfds leaves `fileFormat` out of dataset_info.json for the legacy default, tfrecord.
    formats = [info.get("fileFormat") or "tfrecord"]
    formats += [f for f in info.get("alternativeFileFormats", []) if f not in formats]
    return tuple(formats)


def _find_prepared(root: Path, name: str) -> _Prepared:
    """Scans ``<root>/<name>/<version>/dataset_info.json`` for prepared versions."""
    versions: list[tuple[tfds.core.Version, Path, tuple[str, ...]]] = []
    dataset_dir = root / name
    if dataset_dir.is_dir():
        for child in dataset_dir.iterdir():
            try:
                version = tfds.core.Version(child.name)
            except ValueError:  # nr_jax_cache, incomplete.* (tfds' temporary dirs), ...
                continue
            info_path = child / "dataset_info.json"
            formats = _file_formats(info_path) if info_path.is_file() else None
            if formats is not None:
                versions.append((version, child, formats))
    versions.sort(key=lambda item: item[0])
    readable = [path for _, path, fmts in versions if _ARRAY_RECORD in fmts]
    return _Prepared(
        name=name,
        root=root,
        readable=readable[-1] if readable else None,
        unreadable=tuple((path, fmts) for _, path, fmts in versions if _ARRAY_RECORD not in fmts),
    )


def _official_builder(prepared: _Prepared) -> tfds.core.DatasetBuilder:
    assert prepared.readable is not None
    logger.info("Reading tfds %s from %s", prepared.name, prepared.readable)
    return tfds.builder_from_directory(os.fspath(prepared.readable))


# --------------------------------------------------------------------------------------
# Local tfds builders (raw files -> array_record)
# --------------------------------------------------------------------------------------


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery of the builders that convert local raw files to array_record.

    Subclasses set ``SOURCE_DIR_ENV``, implement ``_default_source_dir``,
    ``check_source_files`` and ``_generate_examples(split)``, and list ``SPLITS``.
    """

    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    SOURCE_DIR_ENV: ClassVar[str]

    def __init__(self, *, source_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """Creates the builder.

        Args:
            source_dir: Directory with the raw files. Defaults to ``$<SOURCE_DIR_ENV>``,
                else a dataset-specific default.
            **kwargs: Forwarded to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
                ``file_format``, ...). ``file_format`` defaults to ``"array_record"``.
        """
        data_dir = kwargs.get("data_dir")
        self.data_root = resolve_data_dir(data_dir)
        self.source_dir = _resolve_dir(
            source_dir, self.SOURCE_DIR_ENV, self._default_source_dir(self.data_root)
        )
        kwargs.setdefault("file_format", _ARRAY_RECORD)
        super().__init__(**kwargs)

    @classmethod
    @abc.abstractmethod
    def _default_source_dir(cls, data_root: Path) -> str | os.PathLike[str]:
        """Source directory used when neither ``source_dir`` nor the env var is set."""

    @abc.abstractmethod
    def check_source_files(self) -> None:
        """Raises ``DatasetNotFoundError`` (with a how-to-get-it message) if files are missing."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        """Path of the builder's module, computed without ``importlib_resources``.

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

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download.
        self.check_source_files()
        return {split: self._generate_examples(split) for split in self.SPLITS}


class FashionMnistLocal(_LocalBuilder):
    """Fashion-MNIST from local IDX ``.gz`` files, stored as array_record.

    Features: ``image`` (uint8 ``(28, 28, 1)``, PNG-encoded on disk) and ``label``
    (``ClassLabel`` with 10 classes). Splits: ``train`` (60000) and ``test`` (10000),
    in the original file order. ``source_dir`` defaults to
    ``$NR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Local IDX files, PNG-encoded images, original order."
    }
    SOURCE_DIR_ENV = FASHION_MNIST_DIR_ENV

    @classmethod
    def _default_source_dir(cls, data_root: Path) -> str:
        del data_root
        return DEFAULT_FASHION_MNIST_DIR

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

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        images_path, labels_path = _fashion_mnist_paths(self.source_dir, split)
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


class _CifarLocal(_LocalBuilder, skip_registration=True):
    """CIFAR from the python-pickle archive (or its extracted folder), as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Python-pickle archive, PNG-encoded images, original order."
    }
    SOURCE_DIR_ENV = CIFAR_DIR_ENV
    LAYOUT: ClassVar[_CifarLayout]

    @classmethod
    def _default_source_dir(cls, data_root: Path) -> Path:
        return data_root

    def _label_feature(self) -> tfds.features.ClassLabel:
        return tfds.features.ClassLabel(num_classes=self.LAYOUT.num_classes)

    def _info(self) -> tfds.core.DatasetInfo:
        layout = self.LAYOUT
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{layout.title} (Krizhevsky, 2009), read from {layout.archive}.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": self._label_feature(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            disable_shuffling=True,
        )

    def candidates(self) -> tuple[Path, Path, Path]:
        """The places searched, in order: ``<src>/<folder>``, ``<src>`` and the archive."""
        layout = self.LAYOUT
        return (
            self.source_dir / layout.folder,
            self.source_dir,
            self.source_dir / layout.archive,
        )

    def find_source(self) -> tuple[str, Path] | None:
        """Returns ``("folder" | "archive", path)`` of the first complete source, or None."""
        folder, itself, archive = self.candidates()
        for candidate in (folder, itself):
            if all(
                (candidate / name).is_file()
                for names in self.LAYOUT.files.values()
                for name in names
            ):
                return "folder", candidate
        if archive.is_file():
            return "archive", archive
        return None

    def check_source_files(self) -> None:
        """Raises ``DatasetNotFoundError`` unless a pickle folder or archive exists.

        Raises:
            DatasetNotFoundError: Naming every place searched (including a prepared
                tfds dataset that is tfrecord-only) and how to get the data.
        """
        if self.find_source() is None:
            raise DatasetNotFoundError(
                _cifar_not_found_message(self, _find_prepared(self.data_root, self.LAYOUT.name))
            )

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        found = self.find_source()
        if found is None:
            self.check_source_files()
            return
        images, labels = _read_cifar_split(self.LAYOUT, *found, split)
        for index in range(images.shape[0]):
            # Encoded bytes, not a numpy image: tfds encodes numpy images with TF.
            yield index, {"image": _encode_png(images[index]), "label": int(labels[index])}


class Cifar10Local(_CifarLocal):
    """CIFAR-10 from ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``.

    Features: ``image`` (uint8 ``(32, 32, 3)``, PNG-encoded) and ``label`` (10 classes).
    Splits ``train`` (``data_batch_1..5``, 50000) and ``test`` (``test_batch``, 10000),
    in file order. ``source_dir`` defaults to ``$NR_JAX_CIFAR_DIR``, else the data dir.
    """

    LAYOUT = _CIFAR10_LAYOUT

    def _label_feature(self) -> tfds.features.ClassLabel:
        return tfds.features.ClassLabel(names=CIFAR10_CLASS_NAMES)


class Cifar100Local(_CifarLocal):
    """CIFAR-100 (fine labels) from ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.

    Features: ``image`` (uint8 ``(32, 32, 3)``, PNG-encoded) and ``label`` (the 100 fine
    labels). Splits ``train`` (50000) and ``test`` (10000), in file order.
    """

    LAYOUT = _CIFAR100_LAYOUT


def _cifar_not_found_message(builder: _CifarLocal, prepared: _Prepared) -> str:
    layout = builder.LAYOUT
    folder, itself, archive = builder.candidates()
    pickles = ", ".join(n for names in layout.files.values() for n in names)
    searched = (
        f"the tfds dataset {layout.name!r} prepared in {_ARRAY_RECORD} format under "
        f"{prepared.dataset_dir}, the extracted python pickles ({pickles}) in {folder} or "
        f"{itself}, and the archive {archive}"
    )
    get_archive = (
        f"download {layout.url} into {builder.source_dir} (or set {CIFAR_DIR_ENV} / pass "
        "source_dir= to the directory that holds it; nr_jax converts it once, without "
        "TensorFlow)"
    )
    if prepared.unreadable:
        return (
            f"{prepared.tfrecord_message()} Alternatively, {get_archive}. "
            f"{layout.title} sources searched: {searched}."
        )
    return (
        f"{layout.title} not found. Looked for {searched}. To fix: {get_archive}, or "
        f"prepare the tfds dataset with `{prepared.build_command()}` (needs TensorFlow "
        "where it runs)."
    )


@dataclasses.dataclass(frozen=True)
class _DatasetSource:
    """How to get one named dataset.

    Attributes:
        builder_cls: Local builder, ``builder_cls(data_dir=, source_dir=)``.
        splits: Split names.
        tfds_name: Official tfds dataset read first when prepared in array_record.
    """

    builder_cls: type[_LocalBuilder]
    splits: tuple[str, ...]
    tfds_name: str | None = None


_REGISTRY: dict[str, _DatasetSource] = {
    "fashion_mnist": _DatasetSource(builder_cls=FashionMnistLocal, splits=("train", "test")),
    "cifar10": _DatasetSource(
        builder_cls=Cifar10Local, splits=("train", "test"), tfds_name="cifar10"
    ),
    "cifar100": _DatasetSource(
        builder_cls=Cifar100Local, splits=("train", "test"), tfds_name="cifar100"
    ),
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
) -> _LocalBuilder:
    source = _lookup(name)
    return source.builder_cls(data_dir=os.fspath(resolve_data_dir(data_dir)), source_dir=source_dir)


def _prepare(builder: _LocalBuilder) -> None:
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


def _readable_official(source: _DatasetSource, root: Path) -> _Prepared | None:
    if source.tfds_name is None:
        return None
    prepared = _find_prepared(root, source.tfds_name)
    return prepared if prepared.readable is not None else None


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
        ValueError: Unknown ``name``.
        DatasetNotFoundError: The source files are missing and nothing is prepared yet.
    """
    source = _lookup(name)
    official = _readable_official(source, resolve_data_dir(data_dir))
    if official is not None:
        assert official.readable is not None
        return official.readable
    builder = _make_builder(name, data_dir, source_dir)
    _prepare(builder)
    return Path(os.fspath(builder.data_dir))


# --------------------------------------------------------------------------------------
# Decoding + .npz cache
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CacheKey:
    builder: str
    version: str


def _cache_path(root: Path, key: _CacheKey, split: str) -> Path:
    return root / key.builder / _CACHE_DIRNAME / key.version / f"{split}.npz"


def _cache_meta(key: _CacheKey, split: str) -> dict[str, str]:
    return {
        "builder": key.builder,
        "version": key.version,
        "split": split,
        "format": str(_CACHE_FORMAT),
    }


def _read_cache(path: Path, key: _CacheKey, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    expected = _cache_meta(key, split)
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = {k: str(npz[f"meta_{k}"]) for k in expected}
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
    path: Path, key: _CacheKey, split: str, images: np.ndarray, labels: np.ndarray
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    meta = {f"meta_{k}": np.asarray(v) for k, v in _cache_meta(key, split).items()}
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, **meta)
        os.replace(tmp, path)  # Atomic: readers never see a half-written cache.
    finally:
        tmp.unlink(missing_ok=True)


def _decode_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
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

    Sources, in order: (CIFAR only) the official tfds dataset ``name`` prepared in
    array_record under ``data_dir``; else the local builder (``<name>_local``), prepared
    from the raw files in ``source_dir`` if needed. The first call decodes the split
    through ``as_data_source()`` and writes
    ``<data_dir>/<builder>/nr_jax_cache/<version>/<split>.npz``; later calls only read
    that file.

    Args:
        name: Registered dataset name (see ``known_datasets()``): ``"fashion_mnist"``,
            ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.
        source_dir: Directory with the raw source files (only read when the dataset is
            not prepared yet). Fashion-MNIST: the IDX files, default
            ``$NR_JAX_FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
            CIFAR: ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or the
            extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder (or the
            folder itself), default ``$NR_JAX_CIFAR_DIR``, else ``data_dir``.
        limit: If given, return only the first ``limit`` examples (in stored order).

    Returns:
        ``(images, labels)``: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.

    Raises:
        ValueError: Unknown ``name`` or ``split``, or ``limit`` outside ``[0, N]``.
        TypeError: ``limit`` is not an int.
        DatasetNotFoundError: Nothing readable is prepared and the source files are
            missing; the message names every place searched and how to get the data
            (or how to re-prepare a tfrecord-only tfds dataset).
    """
    source = _lookup(name)
    if split not in source.splits:
        raise ValueError(
            f"unknown split {split!r} for dataset {name!r}; expected one of {source.splits}"
        )
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool)):
        raise TypeError(f"limit must be an int or None; got {type(limit).__name__}")

    root = resolve_data_dir(data_dir)
    official = _readable_official(source, root)
    if official is not None:
        assert official.readable is not None
        key = _CacheKey(official.name, official.readable.name)
        make_builder: Callable[[], tfds.core.DatasetBuilder] = lambda: _official_builder(official)
    else:
        builder_cls = source.builder_cls
        key = _CacheKey(builder_cls.name, str(builder_cls.VERSION))

        def make_builder() -> tfds.core.DatasetBuilder:
            builder = _make_builder(name, root, source_dir)
            _prepare(builder)
            return builder

    cache = _cache_path(root, key, split)
    start = time.perf_counter()
    arrays = _read_cache(cache, key, split)
    if arrays is not None:
        logger.info(
            "Loaded %s/%s from cache %s in %.2f s", name, split, cache, time.perf_counter() - start
        )
    else:
        arrays = _decode_split(make_builder(), split)
        _write_cache(cache, key, split, *arrays)
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
# Large image datasets decoded per example (ImageNet)
# --------------------------------------------------------------------------------------


def _image_source_not_found_message(prepared: _Prepared) -> str:
    root = prepared.root
    if prepared.unreadable:
        return prepared.tfrecord_message()
    message = (
        f"tfds dataset {prepared.name!r} is not prepared in {_ARRAY_RECORD} format under "
        f"{prepared.dataset_dir} (looked for <version>/dataset_info.json there; the tfds "
        f"data dir comes from data_dir= or ${DATA_DIR_ENV}, default {DEFAULT_DATA_DIR}). "
    )
    if prepared.name == IMAGENET_NAME:
        message += (
            "ImageNet needs a manual download: get ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar from {_IMAGENET_DOWNLOAD_URL} (registration required), "
            f"put them in {root / 'downloads' / 'manual'}, then run "
            f"`{prepared.build_command()}` where TensorFlow is installed (the tfds "
            "command-line tool imports it; nr_jax only reads the result)."
        )
    else:
        message += f"Prepare it with `{prepared.build_command()}` where TensorFlow is installed."
    return message


def load_image_source(
    name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None
) -> Sequence[dict[str, Any]]:
    """Random-access source over a tfds image dataset prepared in array_record.

    Reads ``<data_dir>/<name>/<highest version>`` with ``tfds.builder_from_directory``
    (what ``tfds.builder(name, data_dir=...)`` returns for a prepared dataset, without
    importing its builder code) and returns ``as_data_source(split)`` with the
    ``image`` feature left encoded (``tfds.decode.SkipDecoding``), so that
    ``train_batches_from_source`` / ``eval_batches_from_source`` decode and resize each
    image once, on their thread pool.

    Args:
        name: tfds dataset name, e.g. ``"imagenet2012"``; any dataset with an ``image``
            and an integer ``label`` feature works.
        split: tfds split, e.g. ``"train"``, ``"validation"`` or ``"train[:1%]"``.
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.

    Returns:
        A sequence (``len``, ``[i]``, ``__getitems__``) of dicts whose ``image`` is the
        encoded bytes (JPEG for ImageNet) and ``label`` an int.

    Raises:
        DatasetNotFoundError: Not prepared there, or prepared only as tfrecord (which
            cannot be read without TensorFlow); the message says how to fix it.
    """
    prepared = _find_prepared(resolve_data_dir(data_dir), name)
    if prepared.readable is None:
        raise DatasetNotFoundError(_image_source_not_found_message(prepared))
    builder = _official_builder(prepared)
    return builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}, file_format=_ARRAY_RECORD
    )


def imagenet2012_info(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetInfo:
    """The `DatasetInfo` of tfds' `imagenet2012` (image, label, file_name), for local builders.

    A builder named `imagenet2012` (version 5.1.0) that returns this from `_info` and is prepared
    in array_record reads exactly like the official dataset through `load_imagenet_source`: a
    subset of one's own, or the fabricated files of the tests and the benchmark.
    """
    return tfds.core.DatasetInfo(
        builder=builder,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text(),
            }
        ),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )


def load_imagenet_source(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    name: str = IMAGENET_NAME,
) -> Sequence[dict[str, Any]]:
    """Random-access source over tfds ``imagenet2012`` prepared in array_record.

    See ``load_image_source``. ``name`` exists for tests and for copies prepared under
    another name; the real dataset must be prepared (from the manually downloaded
    ILSVRC2012 tars) with ``tfds build imagenet2012 --file_format=array_record``.

    Args:
        split: ``"train"`` or ``"validation"`` (or a tfds slice of them).
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or
            ``~/tensorflow_datasets``.
        name: tfds dataset name.

    Returns:
        Sequence of ``{"image": JPEG bytes, "label": int, "file_name": bytes}``.

    Raises:
        DatasetNotFoundError: Not prepared in array_record under ``data_dir``.
    """
    return load_image_source(name, split, data_dir=data_dir)


_BILINEAR = Image.Resampling.BILINEAR


def _open_rgb(value: Any) -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...) or a uint8 array -> RGB PIL image."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        image = Image.fromarray(
            value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        )
    else:
        raise TypeError(
            "expected an encoded image (bytes) or a uint8 (H, W[, C]) array; got "
            f"{type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', '')}"
        )
    # Grey-scale, CMYK, palette and RGBA images all become RGB.
    return image if image.mode == "RGB" else image.convert("RGB")


def _random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as ``torchvision.transforms.RandomResizedCrop.get_params``.

    Ten tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); then the
    central crop with the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _train_transform(
    value: Any,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """RandomResizedCrop(size, scale, ratio) (bilinear) + RandomHorizontalFlip()."""
    image = _open_rgb(value)
    top, left, h, w = _random_resized_crop_box(rng, image.height, image.width, scale, ratio)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), _BILINEAR)
    out = np.asarray(image)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _eval_transform(value: Any, size: int, resize_size: int) -> np.ndarray:
    """Resize(resize_size) (shorter side, bilinear) + CenterCrop(size), as torchvision."""
    image = _open_rgb(value)
    width, height = image.size
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    image = image.resize((new_w, new_h), _BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _square_size(info: DatasetInfo) -> int:
    height, width, channels = info.image_shape
    if height != width or channels != 3:
        raise ValueError(f"info.image_shape must be (S, S, 3); got {info.image_shape}")
    return height


def _num_workers(num_workers: int | None) -> int:
    if num_workers is None:
        return max(1, os.cpu_count() or 1)
    return _check_int(num_workers, "num_workers", minimum=1)


def _get_records(source: Sequence[Any], indices: np.ndarray) -> Sequence[Any]:
    keys = [int(i) for i in indices]
    getitems = getattr(source, "__getitems__", None)
    return getitems(keys) if getitems is not None else [source[k] for k in keys]


def _normalize_into(
    out: np.ndarray, image: np.ndarray, scale: np.ndarray, shift: np.ndarray
) -> None:
    """``out[...] = normalize(image)`` without temporaries (bitwise the same result)."""
    if image.shape != out.shape or image.dtype != np.uint8:
        raise ValueError(
            f"transform returned {image.dtype} {image.shape}; expected uint8 {out.shape}"
        )
    np.multiply(image, scale, out=out, dtype=np.float32)
    out -= shift


def _source_batches(
    source: Sequence[Any],
    plan: Iterator[np.ndarray],
    batch_size: int,
    transform: Callable[[int, Any], np.ndarray],
    info: DatasetInfo,
    num_workers: int,
    with_mask: bool,
    lookahead: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """Reads records on the calling thread; decodes, transforms and normalises on a pool.

    Each worker writes its normalised float32 image straight into the batch. Up to
    ``lookahead + 1`` batches are in flight, so the pool keeps working while the consumer
    handles the current batch. Pillow and numpy release the GIL while decoding, resizing
    and converting, so the threads run in parallel.
    """
    shape = tuple(info.image_shape)
    std = np.asarray(info.std, dtype=np.float32)
    scale = np.float32(1.0 / 255.0) / std
    shift = np.asarray(info.mean, dtype=np.float32) / std

    def fill(out: np.ndarray, index: int, value: Any) -> None:
        _normalize_into(out, transform(index, value), scale, shift)

    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=num_workers, thread_name_prefix="nr_jax-decode"
    )
    pending: collections.deque[dict[str, Any]] = collections.deque()

    def submit(indices: np.ndarray) -> None:
        records = _get_records(source, indices)
        images = np.empty((batch_size, *shape), dtype=np.float32)
        images[len(indices) :] = -shift  # Padding rows: normalised zero images.
        labels = np.zeros((batch_size,), dtype=np.int32)
        futures = []
        for row, (index, record) in enumerate(zip(indices, records, strict=True)):
            labels[row] = record["label"]
            futures.append(executor.submit(fill, images[row], int(index), record["image"]))
        batch: dict[str, Any] = {"image": images, "label": labels, "futures": futures}
        if with_mask:
            batch["mask"] = np.zeros((batch_size,), dtype=np.float32)
            batch["mask"][: len(indices)] = 1.0
        pending.append(batch)

    def finish(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        for future in batch.pop("futures"):
            future.result()  # Re-raises a decoding error here, on the consumer's side.
        return batch

    try:
        for indices in plan:
            submit(indices)
            if len(pending) > lookahead:
                yield finish(pending.popleft())
        while pending:
            yield finish(pending.popleft())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _check_range(value: tuple[float, float], what: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi:
        raise ValueError(f"{what} must be (lo, hi) with 0 < lo <= hi; got {value!r}")
    return lo, hi


def train_batches_from_source(
    source: Sequence[Any],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    info: DatasetInfo,
    augment: bool = True,
    start_batch: int = 0,
    num_workers: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    resize_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one shuffled epoch of fixed-shape batches decoded from ``source``.

    The order is ``np.random.default_rng([seed, epoch]).permutation(len(source))`` and
    example ``i`` is augmented with ``np.random.default_rng([seed, epoch, i])``, so an
    epoch is a pure function of ``(seed, epoch)`` (independent of ``num_workers`` and of
    the batch size), and ``start_batch=k`` yields exactly batches ``k, k+1, ...``.
    Wrap it in ``prefetch`` so that reading and batching also overlap the train step.

    Args:
        source: Random-access sequence of ``{"image": encoded bytes or uint8 array,
            "label": int}``, e.g. ``load_imagenet_source("train")``.
        batch_size: ``B``; the ragged remainder ``N % B`` is dropped.
        seed: Non-negative run seed.
        epoch: Non-negative epoch index.
        info: Output size (``image_shape`` ``(S, S, 3)``) and normalisation constants,
            e.g. ``DATASET_INFO["imagenet2012"]`` (S = 224).
        augment: ``True``: torchvision ``RandomResizedCrop(S, scale, ratio)`` (bilinear)
            then ``RandomHorizontalFlip()``. ``False``: the evaluation transform.
        start_batch: Index of the first batch to yield, in ``[0, steps_per_epoch]``.
        num_workers: Decoding threads; defaults to ``os.cpu_count()``.
        scale: Range of the crop's fraction of the image area.
        ratio: Range of the crop's aspect ratio (width / height).
        resize_size: Shorter side before the centre crop when ``augment=False``;
            defaults to ``int(S / 0.875)`` (256 for 224).

    Yields:
        ``{"image": float32 (B, S, S, 3), "label": int32 (B,)}``.

    Raises:
        TypeError / ValueError: Bad arguments (as ``train_batches``).
    """
    seed = _check_int(seed, "seed", minimum=0)
    epoch = _check_int(epoch, "epoch", minimum=0)
    start_batch = _check_int(start_batch, "start_batch", minimum=0)
    num = len(source)
    num_batches = steps_per_epoch(num, batch_size)
    if start_batch > num_batches:
        raise ValueError(
            f"start_batch must be in [0, {num_batches}] (steps per epoch); got {start_batch}"
        )
    size = _square_size(info)
    workers = _num_workers(num_workers)
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio")
    if scale[1] > 1.0:
        raise ValueError(f"scale must lie in (0, 1]; got {scale!r}")
    resize = _resize_size(size, resize_size)

    if augment:

        def transform(index: int, value: Any) -> np.ndarray:
            rng = np.random.default_rng([seed, epoch, index])
            return _train_transform(value, rng, size, scale, ratio)

    else:

        def transform(index: int, value: Any) -> np.ndarray:
            return _eval_transform(value, size, resize)

    order = np.random.default_rng([seed, epoch]).permutation(num)
    plan = (
        order[index * batch_size : (index + 1) * batch_size]
        for index in range(start_batch, num_batches)
    )
    return _source_batches(source, plan, batch_size, transform, info, workers, with_mask=False)


def _resize_size(size: int, resize_size: int | None) -> int:
    if resize_size is None:
        return int(size / 0.875)
    resize_size = _check_int(resize_size, "resize_size")
    if resize_size < size:
        raise ValueError(f"resize_size must be >= the crop size {size}; got {resize_size}")
    return resize_size


def eval_batches_from_source(
    source: Sequence[Any],
    batch_size: int,
    *,
    info: DatasetInfo,
    num_workers: int | None = None,
    resize_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example of ``source`` once, in order, resized and centre-cropped.

    Args:
        source: As for ``train_batches_from_source``, e.g.
            ``load_imagenet_source("validation")``.
        batch_size: ``B`` (> 0; may exceed ``N``).
        info: Output size (``(S, S, 3)``) and normalisation constants.
        num_workers: Decoding threads; defaults to ``os.cpu_count()``.
        resize_size: Shorter side before the ``S x S`` centre crop; defaults to
            ``int(S / 0.875)`` (torchvision ``Resize(256)`` + ``CenterCrop(224)``).

    Yields:
        ``{"image": float32 (B, S, S, 3), "label": int32 (B,), "mask": float32 (B,)}``.
        The last batch is padded to ``B`` with zero images (normalised) and label 0;
        ``mask`` is 1 for real examples and 0 for padding.

    Raises:
        TypeError / ValueError: Bad arguments or an empty source.
    """
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    num = len(source)
    if num == 0:
        raise ValueError("eval_batches_from_source needs at least one example; got N = 0")
    size = _square_size(info)
    resize = _resize_size(size, resize_size)
    workers = _num_workers(num_workers)
    plan = (np.arange(lo, min(lo + batch_size, num)) for lo in range(0, num, batch_size))
    return _source_batches(
        source,
        plan,
        batch_size,
        lambda index, value: _eval_transform(value, size, resize),
        info,
        workers,
        with_mask=True,
    )


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
