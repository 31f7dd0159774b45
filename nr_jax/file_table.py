"""The array files of a checkpoint step, as written: a table of their sizes and CRC-32s.

orbax keeps no checksums, and a damaged array file makes its concurrent reads fail amid other
reads (the abandoned-read noise "Event loop is closed" after a fallback). `write` records every
file of a committed step in `FILE_TABLE` inside the step directory; `check` compares them before
orbax reads anything, so a truncated, missing or altered file is refused by name and never handed
to orbax. A step without the table (older runs, or one killed between commit and table) passes.
"""

from __future__ import annotations

import json
import os
import zlib

__all__ = ["FILE_TABLE", "DamagedFileError", "check", "crc32", "write"]

FILE_TABLE = "nr_jax_files.json"  # in the step directory (not an orbax item)


class DamagedFileError(RuntimeError):
    """An array file of a step is missing, or differs in size or contents from what was written."""


def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write(step_dir: str, item: str) -> None:
    """Records size and CRC-32 of every file of the committed step's `item` folder (atomically:
    a temporary file renamed into place)."""
    table = {}
    for root, _, files in os.walk(os.path.join(step_dir, item)):
        for name in sorted(files):
            path = os.path.join(root, name)
            table[os.path.relpath(path, step_dir)] = [os.path.getsize(path), crc32(path)]
    tmp = os.path.join(step_dir, f"{FILE_TABLE}.tmp")
    with open(tmp, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, FILE_TABLE))


def check(step_dir: str) -> None:
    """Raises `DamagedFileError` naming the first array file of the step that is missing, has
    another size or other contents (CRC-32) than at the save; a step without the table passes
    (orbax's own checks remain)."""
    path = os.path.join(step_dir, FILE_TABLE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedFileError(f"unreadable file table {path}: {e}") from e
    for name, (size, crc) in sorted(table.items()):
        file = os.path.join(step_dir, name)
        if not os.path.isfile(file):
            raise DamagedFileError(f"array file {file} is missing")
        if os.path.getsize(file) != size:
            got = os.path.getsize(file)
            raise DamagedFileError(f"array file {file} has {got} bytes; {size} were written")
        if crc32(file) != crc:
            raise DamagedFileError(f"array file {file} differs from what was written (CRC-32)")
