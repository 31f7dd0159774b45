"""Raw dataset files: gzip IDX (Fashion-MNIST), python-pickle CIFAR batches, PNG encoding.

The CIFAR pickles are read with an unpickler that resolves only the handful of numpy globals
a CIFAR batch contains, so a tampered archive cannot run code.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import math
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nr_jax.data import paths

# IDX magic numbers: two zero bytes, a dtype code (0x08 = uint8) and the number of dims.
IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims (N, rows, cols).
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim (N,).

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

# tfds split name -> file prefix of the Fashion-MNIST IDX files.
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}


def fashion_mnist_paths(source_dir: Path, split: str) -> tuple[Path, Path]:
    """``(images, labels)`` IDX paths of a Fashion-MNIST split (``"train"`` or ``"test"``)."""
    prefix = FASHION_MNIST_FILES[split]
    return (
        source_dir / f"{prefix}-images-idx3-ubyte.gz",
        source_dir / f"{prefix}-labels-idx1-ubyte.gz",
    )


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Reads a gzip-compressed uint8 IDX file.

    Args:
        path: The ``.gz`` file.
        expected_magic: ``IDX_IMAGES_MAGIC`` or ``IDX_LABELS_MAGIC``.

    Returns:
        uint8 array of the shape the header declares, e.g. ``(N, 28, 28)``.

    Raises:
        ValueError: Wrong magic number, or a size that does not match the header.
    """
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


def encode_png(image: np.ndarray) -> bytes:
    """PNG-encodes a uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image with Pillow.

    tfds encodes *numpy* images with ``tf.image.encode_png`` (TensorFlow); already encoded
    bytes pass through, so the local builders yield these.
    """
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """File layout of one python-pickle CIFAR archive (as distributed by its authors).

    Attributes:
        name: Official tfds name, e.g. ``"cifar10"``.
        title: Human-readable name, e.g. ``"CIFAR-10"``.
        archive: Archive file name, e.g. ``"cifar-10-python.tar.gz"``.
        folder: Top-level folder inside the archive, e.g. ``"cifar-10-batches-py"``.
        files: tfds split -> pickle files, in order.
        label_key: Key of the labels in each pickled dict.
        num_classes: Number of label classes.
    """

    name: str
    title: str
    archive: str
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: bytes
    num_classes: int

    @property
    def url(self) -> str:
        """Where the authors distribute the archive."""
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


CIFAR10_LAYOUT = CifarLayout(
    name="cifar10",
    title="CIFAR-10",
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key=b"labels",
    num_classes=10,
)
CIFAR100_LAYOUT = CifarLayout(
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


def load_cifar_pickle(raw: bytes, where: str) -> dict[bytes, Any]:
    """Unpickles one CIFAR batch safely (numpy arrays, lists, dicts and bytes only).

    Args:
        raw: The pickle's bytes.
        where: File name for error messages.

    Returns:
        The pickled dict, keys as bytes.

    Raises:
        pickle.UnpicklingError: The pickle references any other global.
        ValueError: It is not a dict.
    """
    batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _read_raw(layout: CifarLayout, kind: str, path: Path, split: str) -> dict[str, bytes]:
    """The pickle files of ``split``, from a folder or out of the ``.tar.gz`` archive."""
    names = layout.files[split]
    if kind == "folder":
        return {name: (path / name).read_bytes() for name in names}
    raw: dict[str, bytes] = {}
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
        raise paths.DatasetNotFoundError(
            f"{path} does not contain {', '.join(missing)}: not a complete "
            f"{layout.title} python archive (download it again from {layout.url})"
        )
    return raw


def _parse_batch(layout: CifarLayout, batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 32, 32, 3) HWC, labels int64 (N,))`` of one checked batch."""
    if b"data" not in batch or layout.label_key not in batch:
        raise ValueError(
            f"{where}: expected keys b'data' and {layout.label_key!r}; got {sorted(batch)}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: expected uint8 data (N, 3072); got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise ValueError(f"{where}: labels outside [0, {layout.num_classes})")
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values (CHW).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar_split(
    layout: CifarLayout, kind: str, path: Path, split: str
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

    Raises:
        DatasetNotFoundError: The archive lacks a pickle of the split.
        ValueError: A pickle has unexpected keys, dtypes, shapes or labels.
    """
    raw = _read_raw(layout, kind, path, split)
    images, labels = [], []
    for name in layout.files[split]:
        where = f"{path}/{name}" if kind == "folder" else f"{path}:{layout.folder}/{name}"
        batch_images, batch_labels = _parse_batch(
            layout, load_cifar_pickle(raw.pop(name), where), where
        )
        images.append(batch_images)
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
