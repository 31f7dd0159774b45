"""TensorFlow-free local tfds builders: raw files on this machine -> array_record.

``FashionMnistLocal`` (``fashion_mnist_local``) reads the IDX ``.gz`` files of the Debian
package ``dataset-fashion-mnist``; ``Cifar10Local`` / ``Cifar100Local`` read the authors'
python-pickle archives or their extracted folders. All keep the original file order
(``disable_shuffling=True``).

tfds-without-TF caveats: ``tfds.features.Image.encode_example`` encodes *numpy* images with
``tf.image.encode_png``; already encoded bytes pass through, so the builders PNG-encode each
image with Pillow (``formats.encode_png``). tfds 4.9.10 also needs ``importlib_resources``
(undeclared, tensorflow/datasets#11212) to prepare a builder defined inside a package;
``code_path`` is overridden so that it does not.

To add a small dataset, subclass ``LocalBuilder`` (``check_source_files`` and
``_generate_examples(split)``) and register it in ``registry.SOURCES`` and ``DATASET_INFO``.
"""

from __future__ import annotations

import abc
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from nr_jax.data import formats, paths, prepared

__all__ = ["Cifar10Local", "Cifar100Local", "FashionMnistLocal", "LocalBuilder"]


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
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
        self.data_root = paths.resolve_data_dir(kwargs.get("data_dir"))
        self.source_dir = paths.resolve_dir(
            source_dir, self.SOURCE_DIR_ENV, self._default_source_dir(self.data_root)
        )
        kwargs.setdefault("file_format", prepared.ARRAY_RECORD)
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


def _encoded_examples(
    images: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in range(images.shape[0]):
        # Encoded bytes, not a numpy image: tfds encodes numpy images with TF.
        yield index, {"image": formats.encode_png(images[index]), "label": int(labels[index])}


class FashionMnistLocal(LocalBuilder):
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
    SOURCE_DIR_ENV = paths.FASHION_MNIST_DIR_ENV

    @classmethod
    def _default_source_dir(cls, data_root: Path) -> str:
        del data_root
        return paths.DEFAULT_FASHION_MNIST_DIR

    def _info(self) -> tfds.core.DatasetInfo:
        # `tfds.core.DatasetInfo` directly: `dataset_info_from_configs` wants a package
        # directory with metadata files next to the builder module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando), read from local IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=formats.FASHION_MNIST_CLASS_NAMES),
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
                for split in formats.FASHION_MNIST_FILES
                for path in formats.fashion_mnist_paths(self.source_dir, split)
                if not path.is_file()
            ]
        if missing:
            raise paths.DatasetNotFoundError(
                f"Fashion-MNIST source not found: {', '.join(str(p) for p in missing)}. "
                "Expected the IDX files {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz in "
                f"{self.source_dir}. Install them with "
                "`apt-get install -y dataset-fashion-mnist` (provides "
                f"{paths.DEFAULT_FASHION_MNIST_DIR}), or set {paths.FASHION_MNIST_DIR_ENV} "
                "(or pass source_dir=) to a directory that contains them."
            )

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        images_path, labels_path = formats.fashion_mnist_paths(self.source_dir, split)
        images = formats.read_idx(images_path, formats.IDX_IMAGES_MAGIC)
        labels = formats.read_idx(labels_path, formats.IDX_LABELS_MAGIC)
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, 28, 28) and labels (N,); got {images.shape} from "
                f"{images_path} and {labels.shape} from {labels_path}"
            )
        yield from _encoded_examples(images, labels)


class _CifarLocal(LocalBuilder, skip_registration=True):
    """CIFAR from the python-pickle archive (or its extracted folder), as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Python-pickle archive, PNG-encoded images, original order."
    }
    SOURCE_DIR_ENV = paths.CIFAR_DIR_ENV
    LAYOUT: ClassVar[formats.CifarLayout]

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
                {"image": tfds.features.Image(shape=(32, 32, 3)), "label": self._label_feature()}
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
        names = [name for split_names in self.LAYOUT.files.values() for name in split_names]
        for candidate in (folder, itself):
            if all((candidate / name).is_file() for name in names):
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
            found = prepared.find_prepared(self.data_root, self.LAYOUT.name)
            raise paths.DatasetNotFoundError(_cifar_not_found_message(self, found))

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        found = self.find_source()
        if found is None:
            self.check_source_files()
            return
        yield from _encoded_examples(*formats.read_cifar_split(self.LAYOUT, *found, split))


class Cifar10Local(_CifarLocal):
    """CIFAR-10 from ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/``.

    Features: ``image`` (uint8 ``(32, 32, 3)``, PNG-encoded) and ``label`` (10 classes).
    Splits ``train`` (``data_batch_1..5``, 50000) and ``test`` (``test_batch``, 10000),
    in file order. ``source_dir`` defaults to ``$NR_JAX_CIFAR_DIR``, else the data dir.
    """

    LAYOUT = formats.CIFAR10_LAYOUT

    def _label_feature(self) -> tfds.features.ClassLabel:
        return tfds.features.ClassLabel(names=formats.CIFAR10_CLASS_NAMES)


class Cifar100Local(_CifarLocal):
    """CIFAR-100 (fine labels) from ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.

    Features: ``image`` (uint8 ``(32, 32, 3)``, PNG-encoded) and ``label`` (the 100 fine
    labels). Splits ``train`` (50000) and ``test`` (10000), in file order.
    """

    LAYOUT = formats.CIFAR100_LAYOUT


def _cifar_not_found_message(builder: _CifarLocal, found: prepared.Prepared) -> str:
    layout = builder.LAYOUT
    folder, itself, archive = builder.candidates()
    pickles = ", ".join(n for names in layout.files.values() for n in names)
    searched = (
        f"the tfds dataset {layout.name!r} prepared in {prepared.ARRAY_RECORD} format under "
        f"{found.dataset_dir}, the extracted python pickles ({pickles}) in {folder} or "
        f"{itself}, and the archive {archive}"
    )
    get_archive = (
        f"download {layout.url} into {builder.source_dir} (or set {paths.CIFAR_DIR_ENV} / pass "
        "source_dir= to the directory that holds it; nr_jax converts it once, without "
        "TensorFlow)"
    )
    if found.unreadable:
        return (
            f"{found.tfrecord_message()} Alternatively, {get_archive}. "
            f"{layout.title} sources searched: {searched}."
        )
    return (
        f"{layout.title} not found. Looked for {searched}. To fix: {get_archive}, or "
        f"prepare the tfds dataset with `{found.build_command()}` (needs TensorFlow "
        "where it runs)."
    )
