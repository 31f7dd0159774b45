"""Checkpoints of shape-changing training states: a thin wrapper of orbax's CheckpointManager.

Neural Rejuvenation changes parameter *shapes* during training (channel widths grow and shrink)
while the pytree *structure* stays the same. A checkpoint therefore stores, next to the arrays, a
JSON dict (``meta``) from which the caller rebuilds the model, and hence the abstract target tree,
of that checkpoint. Restoring is two-phase::

    with Checkpointer("/ckpts", max_to_keep=3) as ckpt:
        ckpt.save(step, state, {"widths": widths, "epoch": epoch})
        ...
        state, meta, step = ckpt.restore(
            lambda meta: jax.eval_shape(make_state, meta["widths"]))

Orbax does the work: a ``CheckpointManager`` step directory per step with a composite ``state``
(``StandardSave``: optax NamedTuple states, ``MaskedNode``, empty nodes, ``flax.struct`` dataclasses
and typed PRNG keys round-trip as they are) and ``meta`` (``JsonSave``); retention
(``max_to_keep``); atomic, synchronous saves (into ``<step>.orbax-checkpoint-tmp``, renamed when
complete, never listed before); removal of killed saves' temporary directories by a
``Checkpointer``'s first save (never by one that only reads); restore against an abstract
target (``StandardRestore``).
Added here, because orbax lacks it: the JSON ``meta`` read first, for ``abstract_fn(meta)``;
falling back from a corrupt newest checkpoint to the previous good one (with a warning); the tree
as stored (:mod:`nr_jax.checkpoint_tree`: zero-size leaves, PRNG keys, and a caller error naming
the leaf path and both shapes where the abstract tree does not describe the checkpoint); the
gh-106905 log filters (:mod:`nr_jax.orbax_logging`) while a ``Checkpointer`` is open; a table of
the array files (:mod:`nr_jax.file_table`: size and CRC-32 of every file of the ``state`` item,
written right after the commit) checked before orbax reads a step. A truncated, missing or altered
array file is then refused by name before any read: orbax would detect some of these only in the
middle of its concurrent reads (and abandon the others, which then report "Event loop is closed"
to the terminal, past any logging filter) and others not at all (silent corruption of
uncompressed chunks). A step without the table is read with orbax's own checks only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from nr_jax import checkpoint_tree, file_table, orbax_logging

# re-exported: the errors every reader of checkpoints catches
from nr_jax.checkpoint_tree import CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "Checkpointer"]

PyTree = Any
SaveCallback = Callable[[str, int, str], None]

logger = logging.getLogger(__name__)

_STATE, _META = "state", "meta"
_PRIMARY = 0  # the process that commits, prunes and cleans up in a multi-process job


class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs, one per training step.

    Shapes may differ between steps: the caller rebuilds the abstract target from ``meta``. One
    writer per directory: its first save removes unfinished saves' temporary directories (also
    those of a save that failed midway); a ``Checkpointer`` that only reads changes nothing. In a
    multi-process job (``jax.distributed``) every process opens one on the shared directory and
    calls every method in the same order (``save`` and ``restore`` are collective); process 0
    commits, prunes, cleans up and writes the file table, so no process deletes what another
    writes. Restored arrays take the shardings of the abstract target (replicated over the
    job's mesh, for a trainer's state).

    Args:
        directory: Root directory holding one sub-directory per step; created on the first save.
        max_to_keep: Keep at most this many checkpoints: the most recently saved ones (orbax's
            ``max_to_keep``; on reopening, ordered by step number). The step just saved is kept.
        on_save: Optional callback ``on_save(event, step, directory)``, called with
            ``event="start"`` right before orbax starts writing step ``step`` (nothing of it is on
            disk yet), and ``event="end"`` right after the step is committed (final rename done,
            older steps pruned). Crash tests use it to kill the process during or right after a
            save; what it raises propagates from :meth:`save`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        on_save: SaveCallback | None = None,
    ):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        self._directory = os.path.abspath(os.fspath(directory))
        self._on_save = on_save or (lambda event, step, directory: None)
        self._max_to_keep = max_to_keep
        # Reads go through a manager that cleans nothing up (orbax's `read_only` would log three
        # warnings); the manager that writes, and removes killed saves' temporary directories
        # before its first save starts, is opened by the first save. A Checkpointer that only
        # reads, or whose caller refuses to go on, leaves the directory as it found it and no
        # orbax clean-up thread behind.
        self._manager = self._open_manager(cleanup=False)
        self._writing = False
        orbax_logging.install_filters()  # until close()
        self._closed = False

    def _open_manager(self, *, cleanup: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep,
            enable_async_checkpointing=False,
            create=False,  # nothing on disk before the first save
            cleanup_tmp_directories=cleanup,
            # A multi-process job writes one shared directory: every process calls save (each
            # writes the shards it holds; of a replicated array the first replica's) and restore;
            # process 0 alone creates and renames the step directory, removes temporary
            # directories and prunes old steps, after barriers orbax places around each of them.
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=_PRIMARY),
        )
        items = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self._directory, options=options, item_handlers=items)

    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint root directory."""
        return self._directory

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Saves ``state`` and ``meta`` as checkpoint ``step``; returns once it is committed.

        Args:
            step: Non-negative training step; an existing one is replaced (with a warning).
            state: Pytree of jax/numpy arrays (typed PRNG keys included) or python/numpy scalars.
            meta: JSON dict (str keys; lists, not tuples) that rebuilds the abstract state tree.

        Raises:
            TypeError: If ``meta`` does not round-trip through JSON exactly, or a state leaf has an
                unsupported type (nothing is written then).
            ValueError: If ``step`` is negative.
        """
        self._check_open()
        step = _check_step(step)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        checkpoint_tree.check_json(meta)
        stored, custom = checkpoint_tree.to_stored(state)
        os.makedirs(self._directory, exist_ok=True)
        if not self._writing:  # the first save: the reading manager gives way to the writer
            self._manager.close()
            self._manager = self._open_manager(cleanup=True)
            self._writing = True
        if step in self.all_steps():
            logger.warning("Checkpoint step %d exists in %s; replacing it", step, self._directory)
            self._manager.delete(step)
        state_args = ocp.args.StandardSave(stored, custom_metadata=custom)
        args = ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonSave(meta)})
        self._on_save("start", step, self._directory)
        # force: orbax would otherwise skip a step <= its latest one.
        if not self._manager.save(step, args=args, force=True):
            raise CheckpointError(f"orbax declined to save step {step} in {self._directory}")
        if jax.process_index() == _PRIMARY:  # once, by the process that committed the step
            file_table.write(self._step_dir(step), _STATE)
        self._on_save("end", step, self._directory)

    def all_steps(self) -> list[int]:
        """All finalised checkpoint steps on disk, ascending (corrupt ones included)."""
        self._check_open()
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step whose array files are as written (sizes and CRC-32, checked before
        orbax reads anything) and whose meta and orbax metadata read, or None."""
        for step in reversed(self.all_steps()):
            try:
                file_table.check(self._step_dir(step))  # before orbax reads anything
                self._read_meta(step)
                self._read_stored(step)
                return step
            except Exception as e:  # noqa: BLE001 - any failure means "not valid"
                logger.warning("Skipping invalid step %d in %s: %s", step, self._directory, e)
        return None

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta of checkpoint ``step`` (default: :meth:`latest_step`), arrays untouched.

        Raises:
            CheckpointNotFoundError: If there is no valid checkpoint, or ``step`` does not exist.
            CheckpointError: If the meta of ``step`` is unreadable.
        """
        self._check_open()
        step = self.latest_step() if step is None else _check_step(step)
        if step is None or step not in self.all_steps():
            raise self._not_found(step)
        try:
            return self._read_meta(step)
        except Exception as e:
            raise CheckpointError(f"meta of step {step} in {self._directory}: {e}") from e

    def restore(
        self, abstract_fn: Callable[[dict], PyTree], step: int | None = None
    ) -> tuple[PyTree, dict, int]:
        """Restores a checkpoint into the tree described by ``abstract_fn(meta)``.

        ``abstract_fn(meta)`` returns the saved state's structure with ``jax.ShapeDtypeStruct``
        (or array) leaves; orbax reads exactly those shapes and dtypes (casting values), as
        ``jax.Array`` with the leaf's sharding or on the default device; PRNG keys as typed keys.
        With ``step=None`` a corrupt or partial checkpoint (unreadable meta or orbax metadata, an
        array file missing, truncated or altered since the save, or a failing array read) is
        skipped with a warning for the next older one.

        Returns:
            ``(state, meta, step)``.

        Raises:
            CheckpointNotFoundError: If the directory holds no checkpoint, or not ``step``.
            CheckpointError: If no candidate is usable (naming each step tried with its error), or
                the abstract tree does not match (naming the leaf path and both shapes; a caller
                error, no fallback). What ``abstract_fn`` raises propagates unchanged.
        """
        self._check_open()
        steps = self.all_steps()
        if step is not None and _check_step(step) not in steps:
            raise self._not_found(int(step))
        if not steps:
            raise self._not_found()
        candidates = [int(step)] if step is not None else steps[::-1]
        failures: list[str] = []
        for cand in candidates:
            try:  # before orbax reads anything: a damaged file would fail amid concurrent reads
                file_table.check(self._step_dir(cand))
            except file_table.DamagedFileError as e:
                self._skip(failures, f"step {cand}: damaged array files", e, step)
                continue
            try:
                meta, stored = self._read_meta(cand), self._read_stored(cand)
            except Exception as e:  # noqa: BLE001 - corrupt/partial checkpoint
                self._skip(failures, f"step {cand}: unreadable metadata", e, step)
                continue
            where = f"checkpoint step {cand} in {self._directory}"
            # a caller error raises here (no fallback)
            specs = checkpoint_tree.restore_specs(abstract_fn(meta), stored, where)
            try:
                return self._read_state(cand, specs), meta, cand
            except Exception as e:  # noqa: BLE001 - corrupt array payload
                orbax_logging.settle_after_failure()
                self._skip(failures, f"step {cand}: restore failed", e, step)
        raise CheckpointError(
            f"no usable checkpoint in {self._directory} (tried steps {candidates}): "
            + "; ".join(failures)
        )

    def _skip(self, failures: list[str], what: str, e: Exception, step: int | None) -> None:
        failures.append(f"{what} ({type(e).__name__}: {e})")
        if step is None:
            logger.warning(
                "%s: corrupt checkpoint, falling back: %s", self._directory, failures[-1]
            )

    def _read_state(self, step: int, specs: PyTree) -> PyTree:
        """The arrays of ``step``; zero-size leaves (empty nodes on disk) rebuilt as zeros."""
        target = checkpoint_tree.restore_target(specs)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target, strict=True)})
        return checkpoint_tree.with_zeros(specs, self._manager.restore(step, args=args)[_STATE])

    def _read_meta(self, step: int) -> dict:
        args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        meta = self._manager.restore(step, args=args)[_META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"meta of step {step} is {type(meta).__name__}, not a dict")
        return meta

    def _read_stored(self, step: int) -> dict[str, Any]:
        """Stored shapes (key data shapes, for keys) and PRNG-key names of ``step``'s leaves."""
        try:
            tree_meta = self._manager.item_metadata(step).get(_STATE)
        except Exception:
            orbax_logging.settle_after_failure()
            raise
        return checkpoint_tree.stored_layout(tree_meta, step)

    def _step_dir(self, step: int) -> str:
        """The directory of ``step`` (orbax's default step name: the number itself)."""
        return os.path.join(self._directory, str(step))

    def _not_found(self, step: int | None = None) -> CheckpointNotFoundError:
        if step is None:
            return CheckpointNotFoundError(f"no valid checkpoint found in {self._directory}")
        return CheckpointNotFoundError(f"checkpoint step {step} not found in {self._directory}")

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer for {self._directory} is closed")

    def close(self) -> None:
        """Waits for pending orbax work, releases it and the log filters (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._manager.close()
            finally:
                orbax_logging.remove_filters()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self._directory!r})"


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)
