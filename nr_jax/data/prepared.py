"""Official tfds datasets already prepared under a data dir (readable only as array_record).

A dataset prepared in ``tfrecord`` format (the tfds default) cannot be read without TensorFlow;
``Prepared.tfrecord_message`` then says how to add array_record files or re-prepare it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import tensorflow_datasets as tfds

logger = logging.getLogger(__name__)

ARRAY_RECORD = "array_record"


@dataclasses.dataclass(frozen=True)
class Prepared:
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
        """``<root>/<name>``."""
        return self.root / self.name

    def build_command(self, overwrite: bool = False) -> str:
        """The ``tfds build`` command that prepares this dataset in array_record."""
        command = f"tfds build {self.name} --file_format={ARRAY_RECORD} --data_dir={self.root}"
        return command + " --overwrite" if overwrite else command

    def tfrecord_message(self) -> str:
        """Why the tfrecord-only versions cannot be read, and the two ways to fix it."""
        found = "; ".join(f"{path} ({', '.join(fmts)})" for path, fmts in self.unreadable)
        newest = self.unreadable[-1][0]
        return (
            f"tfds dataset {self.name!r} is prepared at {found}, but not in {ARRAY_RECORD} "
            "format. Those files can only be read with TensorFlow, which nr_jax does not "
            f"use. Add {ARRAY_RECORD} files next to them with `tfds convert_format "
            f"--dataset_version_dir={newest} --out_file_format={ARRAY_RECORD}`, or "
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


def find_prepared(root: Path, name: str) -> Prepared:
    """Scans ``<root>/<name>/<version>/dataset_info.json`` for prepared versions.

    Args:
        root: tfds data dir.
        name: tfds dataset name.

    Returns:
        What was found; ``readable`` is ``None`` when no version has array_record files.
    """
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
    readable = [path for _, path, fmts in versions if ARRAY_RECORD in fmts]
    return Prepared(
        name=name,
        root=root,
        readable=readable[-1] if readable else None,
        unreadable=tuple((path, fmts) for _, path, fmts in versions if ARRAY_RECORD not in fmts),
    )


def official_builder(prepared: Prepared) -> tfds.core.DatasetBuilder:
    """``tfds.builder_from_directory`` of the readable version (no builder code imported).

    Raises:
        ValueError: ``prepared`` has no readable (array_record) version.
    """
    if prepared.readable is None:
        raise ValueError(
            f"expected a version of {prepared.name!r} prepared in {ARRAY_RECORD} under "
            f"{prepared.dataset_dir}; found none"
        )
    logger.info("Reading tfds %s from %s", prepared.name, prepared.readable)
    return tfds.builder_from_directory(os.fspath(prepared.readable))
