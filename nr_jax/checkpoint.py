"""Shape-flexible checkpointing built on orbax-checkpoint.

Neural Rejuvenation changes parameter *shapes* during training (channel widths
grow and shrink) while the pytree *structure* stays the same.  A checkpoint
therefore stores, next to the arrays, a JSON metadata dict (``meta``) from which
the caller can rebuild the model, and hence the abstract target tree, for that
particular checkpoint.  Restoring is two-phase::

    with Checkpointer("/ckpts", max_to_keep=3) as ckpt:
        ckpt.save(step, state, {"widths": widths, "epoch": epoch})
        ...
        state, meta, step = ckpt.restore(
            lambda meta: jax.eval_shape(make_state, meta["widths"]))

On-disk layout (one orbax ``CheckpointManager`` step directory per step)::

    <directory>/<step>/meta/metadata     the caller's JSON ``meta``
    <directory>/<step>/state/...         the arrays (orbax StandardCheckpointHandler)

The state pytree is *flattened* before it is handed to orbax: it is stored as a
flat ``{leaf_name: array}`` dict, where ``leaf_name`` is derived from the leaf's
key path (e.g. ``opt_state.0.mu.params.Dense_0.kernel``).  Restoring flattens
the abstract tree the same way and unflattens the result with the abstract
tree's own treedef.  This makes arbitrary pytree node types (NamedTuples such as
optax states, ``optax.MaskedNode``, empty tuples, ``flax.struct`` dataclasses,
...) round-trip exactly, independent of how orbax would serialise them, and
lets us name the offending leaf path in shape-mismatch errors.  Typed PRNG key
arrays (``jax.random.key``) are stored as their ``jax.random.key_data`` and
re-wrapped on restore with the dtype requested by the abstract tree.

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` only once everything (arrays, JSON, orbax metadata)
has been written; unfinished temporary directories are never listed as steps,
so a crash mid-save leaves nothing that :meth:`Checkpointer.restore` considers.
Saving is synchronous (orbax async checkpointing is disabled).  Orbax does not
``fsync``; "complete on disk" means the final rename has happened.

Corruption vs. caller errors: a step whose JSON meta or orbax tree metadata
cannot be read, or whose array restore raises, is treated as *corrupt*: with
``step=None`` :meth:`Checkpointer.restore` logs a warning and falls back to the
next older step.  A readable checkpoint whose stored leaf names or shapes do not
match the abstract tree returned by ``abstract_fn`` is a *caller* error: this is
detected up-front from orbax's tree metadata (before any array is read) and
raises :class:`CheckpointError` immediately, without falling back.  Dtype
differences are not errors: arrays are cast to the requested dtype (orbax
behaviour), except that PRNG key leaves must be restored as keys.

Single-process only (no multi-host coordination beyond what orbax does itself).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from nr_jax import faults

__all__ = ["CheckpointError", "CheckpointNotFoundError", "Checkpointer"]

PyTree = Any

logger = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"
_FORMAT_VERSION = 1
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
# orbax refuses to save an empty tree; a state without leaves stores this instead.
_EMPTY_SENTINEL = "__nr_jax_empty__"
# Suffix orbax appends to the directory of an unfinished save.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Pause after a failed orbax read (see _settle_after_orbax_failure).
_SETTLE_SECONDS = 0.1


class CheckpointError(RuntimeError):
    """Raised when no usable checkpoint exists or a restore request is invalid."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Raised when the checkpoint directory holds no (finalised) checkpoint at all.

    Subclasses both :class:`CheckpointError` and :class:`FileNotFoundError`.
    """


class _QuietOrbaxFilter(logging.Filter):
    """Drops orbax's DEBUG/INFO chatter (routed through the ``absl`` logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = record.pathname.replace("\\", "/")
        return "/orbax/" not in path


class _OrbaxAbandonedTaskFilter(logging.Filter):
    """Defuses asyncio's "exception was never retrieved" reports for orbax tasks.

    After a failed read orbax abandons its other in-flight asyncio tasks; when
    they are garbage-collected asyncio logs each one at ERROR *with a traceback*.
    That GC can run inside any ``ast.parse`` call, and formatting a traceback
    there (CPython 3.11 parses source lines to place carets) trips CPython bug
    gh-106905 ("SystemError: AST constructor recursion depth mismatch"), which
    breaks the unrelated outer parse (seen as random pytest crashes).  These
    records duplicate an error that :class:`Checkpointer` already handles and
    reports, so for exceptions from orbax/TensorStore we drop the
    traceback and demote the record to DEBUG (message and exception text kept).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _raised_in_orbax(exc):
            return True
        record.msg = f"{record.getMessage()} [{type(exc).__name__}: {exc}]"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _raised_in_orbax(exc: BaseException) -> bool:
    """True for exceptions from orbax code or TensorStore (orbax's I/O layer)."""
    if "tensorstore" in str(exc).lower():
        return True
    tb = exc.__traceback__
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _install_log_filter() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbaxFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbaxFilter())
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxAbandonedTaskFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_OrbaxAbandonedTaskFilter())


_install_log_filter()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _is_prng_key_dtype(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_component(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _leaf_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """Deterministic, unique, filesystem-safe names for the given key paths."""
    names: list[str] = []
    seen: set[str] = set()
    for i, path in enumerate(paths):
        parts = [_NAME_UNSAFE.sub("_", _key_component(e)) or "_" for e in path]
        name = ".".join(parts) or "_root"
        if name in seen:
            name = f"{name}__{i}"
        seen.add(name)
        names.append(name)
    return names


def _flatten(tree: PyTree) -> tuple[list[str], list[str], list[Any], Any]:
    """Returns (names, human-readable paths, leaves, treedef) of ``tree``."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [p for p, _ in path_leaves]
    leaves = [leaf for _, leaf in path_leaves]
    pretty = [jax.tree_util.keystr(p) or "<root>" for p in paths]
    return _leaf_names(paths), pretty, leaves, treedef


def _check_json(obj: Any, where: str = "meta") -> None:
    """Ensures ``obj`` round-trips exactly through JSON."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise TypeError(f"{where}: non-finite float {obj!r} is not valid JSON")
        return
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a str")
            _check_json(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where}: {type(obj).__name__} does not round-trip through JSON; use dict "
        "(str keys), list, str, int, float, bool or None (tuples/numpy scalars "
        "are not allowed)"
    )


def _to_savable(leaf: Any) -> tuple[Any, str | None]:
    """Converts a state leaf to something orbax saves; returns (value, prng_impl)."""
    if isinstance(leaf, jax.Array) and _is_prng_key_dtype(leaf.dtype):
        return jax.random.key_data(leaf), str(jax.random.key_impl(leaf))
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf, None
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        return np.asarray(leaf), None
    raise TypeError(
        f"unsupported state leaf of type {type(leaf).__name__}; expected jax/numpy "
        "arrays or python/numpy scalars"
    )


def _settle_after_orbax_failure() -> None:
    """Lets orbax's abandoned work finish and be reported *now*.

    When one TensorStore read fails, orbax abandons the other in-flight reads
    and closes its event loop: their completion callbacks then fail in
    TensorStore threads ("Event loop is closed"), and the never-retrieved
    asyncio tasks log their exception (with a formatted traceback) whenever the
    garbage collector gets to them.  If that GC happens inside an unrelated
    ``ast.parse`` (e.g. pytest's assertion rewriting, or traceback formatting),
    the nested parse trips a CPython 3.11 bug (``SystemError: AST constructor
    recursion depth mismatch``, cpython gh-106905).  Waiting briefly and
    collecting garbage here, at a safe point in the calling thread, avoids it.
    Only runs on the (rare) corrupt-checkpoint path.
    """
    time.sleep(_SETTLE_SECONDS)
    gc.collect()


def _default_sharding() -> jax.sharding.Sharding:
    device = jax.config.jax_default_device
    if isinstance(device, str):
        device = jax.devices(device)[0]
    if device is None:
        device = jax.local_devices()[0]
    return jax.sharding.SingleDeviceSharding(device)


def _as_abstract(leaf: Any, default_sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """Converts an abstract-tree leaf to a ShapeDtypeStruct carrying a sharding."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else default_sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
        sharding = getattr(leaf, "sharding", None) or default_sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
        return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype, sharding=default_sharding)
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        dtype = jax.dtypes.canonicalize_dtype(np.asarray(leaf).dtype)
        return jax.ShapeDtypeStruct((), dtype, sharding=default_sharding)
    raise TypeError(
        f"unsupported abstract leaf of type {type(leaf).__name__}; expected "
        "jax.ShapeDtypeStruct or an array"
    )


# --------------------------------------------------------------------------- #
# Checkpointer
# --------------------------------------------------------------------------- #
class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs, one per training step.

    Array shapes may differ between steps (the caller rebuilds the abstract
    target from the stored ``meta``).  See the module docstring for the on-disk
    format, atomicity guarantees and the corrupt-vs-mismatch policy.

    Args:
        directory: Root directory holding one sub-directory per step.  Created
            on the first save if it does not exist.
        max_to_keep: Keep at most this many checkpoints (the ones with the
            largest step numbers; the step just saved is always kept).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self._directory = os.path.abspath(os.fspath(directory))
        self._max_to_keep = int(max_to_keep)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            # Pruning is done by us (by step number, after each save): orbax's
            # LatestN orders by insertion, not by step number.
            preservation_policy=ocp_managers.LatestN(n=None),
            create=False,
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )
        self._closed = False

    # ----------------------------------------------------------------- props
    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint root directory."""
        return self._directory

    @property
    def max_to_keep(self) -> int:
        """Maximum number of checkpoints kept on disk."""
        return self._max_to_keep

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Saves ``state`` and ``meta`` as checkpoint ``step``, synchronously.

        Returns once the checkpoint is complete on disk.  The write is atomic:
        orbax writes into a temporary directory that is renamed to the final
        step directory only when everything has been written, and temporary
        directories are never picked up by :meth:`restore`.  If ``step``
        already exists it is replaced (with a warning); afterwards only the
        ``max_to_keep`` checkpoints with the largest step numbers are kept
        (never deleting the one just written).

        Args:
            step: Non-negative training step.
            state: Pytree whose leaves are jax/numpy arrays (including typed PRNG
                key arrays) or python/numpy scalars.
            meta: JSON-serialisable dict (str keys; lists, not tuples) that must
                allow the caller to rebuild the abstract state tree.

        Raises:
            TypeError: If ``meta`` does not round-trip through JSON exactly or a
                state leaf has an unsupported type.
            ValueError: If ``step`` is negative.
        """
        self._check_open()
        step = self._check_step(step)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        _check_json(meta)
        meta = json.loads(json.dumps(meta))  # defensive copy, as it will be read back

        names, _, leaves, _ = _flatten(state)
        flat: dict[str, Any] = {}
        prng_impls: dict[str, str] = {}
        zero_size: dict[str, dict[str, Any]] = {}
        for name, leaf in zip(names, leaves, strict=True):
            value, impl = _to_savable(leaf)
            if impl is not None:
                prng_impls[name] = impl
            if value.size == 0:  # orbax cannot save zero-size arrays: record shape only
                zero_size[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
            else:
                flat[name] = value
        if not flat:  # orbax refuses to save an empty tree
            flat[_EMPTY_SENTINEL] = np.zeros((1,), np.uint8)
        custom = {
            "nr_jax_format": _FORMAT_VERSION,
            "prng_impls": prng_impls,
            "zero_size": zero_size,
        }

        os.makedirs(self._directory, exist_ok=True)
        self._manager.reload()
        if step in self._manager.all_steps():
            logger.warning(
                "Checkpoint step %d already exists in %s; replacing it.", step, self._directory
            )
            self._manager.delete(step)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(flat, custom_metadata=custom),
                _META: ocp.args.JsonSave(meta),
            }
        )
        faults.watch_save(self._directory, step)  # crash-safety tests only (NR_JAX_FAULT)
        try:
            # force=True: orbax would otherwise silently skip steps <= latest step.
            saved = self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except BaseException:
            self._remove_tmp_dirs(step, only=True)
            raise
        if not saved:  # pragma: no cover - defensive, force=True should always save
            raise CheckpointError(f"orbax declined to save step {step} in {self._directory}")
        self._prune(keep=step)
        self._remove_tmp_dirs(step)
        faults.point("after_checkpoint")

    def _remove_tmp_dirs(self, max_step: int, *, only: bool = False) -> None:
        """Best-effort removal of unfinished-save directories.

        Removes ``<s>.orbax-checkpoint-tmp*`` for ``s == max_step`` (``only``)
        or for every ``s <= max_step`` (leftovers of crashed saves; this assumes
        a single writer per directory).
        """
        try:
            entries = os.listdir(self._directory)
        except OSError:
            return
        for entry in entries:
            head, sep, _ = entry.partition(_TMP_SUFFIX)
            if not sep or not head.isdigit():
                continue
            s = int(head)
            if s == max_step or (not only and s < max_step):
                logger.info("Removing unfinished checkpoint %s/%s", self._directory, entry)
                shutil.rmtree(os.path.join(self._directory, entry), ignore_errors=True)

    def _prune(self, keep: int) -> None:
        steps = sorted(self._manager.all_steps(), reverse=True)
        others = [s for s in steps if s != keep]
        for s in others[self._max_to_keep - 1 :]:
            logger.debug("Deleting old checkpoint step %d in %s", s, self._directory)
            self._manager.delete(s)

    # ----------------------------------------------------------------- query
    def all_steps(self) -> list[int]:
        """Returns all finalised checkpoint steps on disk, ascending.

        Temporary (unfinished) saves are excluded; finalised but corrupt steps
        are included (use :meth:`latest_step` for the newest valid one).

        Returns:
            Sorted list of step numbers.
        """
        self._check_open()
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Returns the newest complete checkpoint whose metadata is readable.

        Validity is checked cheaply: the JSON meta must parse to a dict and the
        orbax tree metadata of the state must be readable and consistent.  Array
        payload corruption is only detected by :meth:`restore` (which then falls
        back to an older step).

        Returns:
            The step number, or ``None`` if there is no valid checkpoint.
        """
        for step in reversed(self.all_steps()):
            try:
                self._read_meta(step)
                self._read_state_metadata(step)
            except Exception as e:  # noqa: BLE001 - any failure means "not valid"
                logger.warning(
                    "Skipping invalid checkpoint step %d in %s: %s", step, self._directory, e
                )
                continue
            return step
        return None

    def read_meta(self, step: int | None = None) -> dict:
        """Reads the JSON meta of a checkpoint without touching the arrays.

        Args:
            step: Step to read; ``None`` means :meth:`latest_step`.

        Returns:
            The ``meta`` dict exactly as it was saved.

        Raises:
            CheckpointNotFoundError: If there is no (valid) checkpoint, or
                ``step`` does not exist.
            CheckpointError: If the meta of ``step`` is unreadable.
        """
        self._check_open()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise self._not_found()
        step = self._check_step(step)
        if step not in self.all_steps():
            raise self._not_found(step)
        try:
            return self._read_meta(step)
        except Exception as e:
            raise CheckpointError(
                f"cannot read meta of checkpoint step {step} in {self._directory}: {e}"
            ) from e

    # --------------------------------------------------------------- restore
    def restore(
        self,
        abstract_fn: Callable[[dict], PyTree],
        step: int | None = None,
    ) -> tuple[PyTree, dict, int]:
        """Restores a checkpoint into the tree described by ``abstract_fn(meta)``.

        Phase 1 reads the JSON meta; phase 2 calls ``abstract_fn(meta)`` which
        must return a pytree (same structure as the saved state) of
        ``jax.ShapeDtypeStruct`` (or arrays, used only for shape/dtype/sharding);
        phase 3 restores the arrays with exactly those shapes and dtypes (values
        are cast if the stored dtype differs), as ``jax.Array`` on the default
        device, or with the sharding carried by a ``ShapeDtypeStruct``/array.
        PRNG key leaves (key dtype in the abstract tree) come back as typed keys.

        With ``step=None`` the newest checkpoint is tried first; a corrupt or
        partial one (unreadable meta or orbax metadata, or an array restore that
        raises) is skipped with a logged warning and the next older one is tried.
        An explicitly requested ``step`` never falls back.

        Args:
            abstract_fn: Maps the stored meta dict to the abstract target tree.
                Exceptions it raises propagate unchanged.
            step: Step to restore, or ``None`` for the newest usable one.

        Returns:
            ``(state, meta, step)``.

        Raises:
            CheckpointNotFoundError: If the directory holds no checkpoint, or
                ``step`` does not exist.
            CheckpointError: If no candidate checkpoint is usable (the message
                names the directory and each step tried with its error), or if
                the abstract tree does not match the checkpoint's leaf
                names/shapes (the message names the first mismatching leaf path
                and both shapes); the latter is a caller error and does not
                trigger a fallback.
        """
        self._check_open()
        steps = self.all_steps()
        if not steps:
            raise self._not_found()
        if step is not None:
            step = self._check_step(step)
            if step not in steps:
                raise self._not_found(step)
            candidates = [step]
        else:
            candidates = sorted(steps, reverse=True)

        failures: list[str] = []
        for cand in candidates:
            try:
                meta = self._read_meta(cand)
                stored = self._read_state_metadata(cand)
            except Exception as e:  # noqa: BLE001 - corrupt/partial checkpoint
                failures.append(f"step {cand}: unreadable metadata ({type(e).__name__}: {e})")
                self._warn_skip(cand, failures[-1], step)
                continue

            abstract = abstract_fn(meta)
            plan = self._plan_restore(cand, abstract, stored)  # raises on caller error

            try:
                restored: dict[str, Any] = {}
                if plan.target:  # an empty state has nothing to read
                    restored = self._manager.restore(
                        cand,
                        args=ocp.args.Composite(
                            **{_STATE: ocp.args.StandardRestore(plan.target, strict=True)}
                        ),
                    )[_STATE]
                state = plan.unflatten(restored)
            except Exception as e:  # noqa: BLE001 - corrupt array payload
                _settle_after_orbax_failure()
                failures.append(f"step {cand}: restore failed ({type(e).__name__}: {e})")
                self._warn_skip(cand, failures[-1], step)
                continue
            return state, meta, cand

        tried = "; ".join(failures)
        raise CheckpointError(
            f"no usable checkpoint in {self._directory} (tried steps {candidates}): {tried}"
        )

    def _warn_skip(self, step: int, reason: str, requested: int | None) -> None:
        if requested is None:
            logger.warning(
                "Checkpoint in %s is corrupt or partial, falling back to an older one: %s",
                self._directory,
                reason,
            )

    def _plan_restore(self, step: int, abstract: PyTree, stored: dict[str, Any]) -> _RestorePlan:
        names, pretty, leaves, treedef = _flatten(abstract)
        default_sharding = _default_sharding()
        stored_shapes: dict[str, tuple[int, ...]] = stored["shapes"]
        stored_dtypes: dict[str, str] = stored["dtypes"]
        prng_impls: dict[str, str] = stored["prng_impls"]
        where = f"checkpoint step {step} in {self._directory}"

        missing = [p for n, p in zip(names, pretty, strict=True) if n not in stored_shapes]
        if missing:
            raise CheckpointError(
                f"abstract tree does not match {where}: leaf {missing[0]} is not in the "
                f"checkpoint ({len(missing)} missing leaves)"
            )
        extra = sorted(set(stored_shapes) - set(names))
        if extra:
            raise CheckpointError(
                f"abstract tree does not match {where}: checkpoint has {len(extra)} leaves "
                f"not in the abstract tree, e.g. {extra[0]!r}"
            )

        target: dict[str, jax.ShapeDtypeStruct] = {}
        key_dtypes: dict[str, Any] = {}
        for name, path, leaf in zip(names, pretty, leaves, strict=True):
            want = _as_abstract(leaf, default_sharding)
            have_shape = stored_shapes[name]
            if _is_prng_key_dtype(want.dtype):
                if name not in prng_impls:
                    raise CheckpointError(
                        f"abstract tree does not match {where}: leaf {path} is a PRNG key "
                        f"({want.dtype}) but the checkpoint holds a plain "
                        f"{stored_dtypes[name]} array of shape {have_shape}"
                    )
                data = jax.eval_shape(jax.random.key_data, want)
                if tuple(data.shape) != have_shape:
                    raise CheckpointError(
                        f"shape mismatch for leaf {path} in {where}: abstract key shape "
                        f"{tuple(want.shape)} (key data {tuple(data.shape)}) vs stored key data "
                        f"shape {have_shape} (impl {prng_impls[name]})"
                    )
                target[name] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=want.sharding)
                key_dtypes[name] = want.dtype
            else:
                if name in prng_impls:
                    raise CheckpointError(
                        f"abstract tree does not match {where}: leaf {path} is stored as a "
                        f"PRNG key ({prng_impls[name]}) but requested as {want.dtype}"
                    )
                if tuple(want.shape) != have_shape:
                    raise CheckpointError(
                        f"shape mismatch for leaf {path} in {where}: abstract shape "
                        f"{tuple(want.shape)} vs checkpoint shape {have_shape}"
                    )
                target[name] = want
        return _RestorePlan(names, treedef, target, key_dtypes, stored["zero_size"])

    # -------------------------------------------------------------- internal
    def _read_meta(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        meta = restored[_META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"meta of step {step} is {type(meta).__name__}, not a dict")
        return meta

    def _read_state_metadata(self, step: int) -> dict[str, Any]:
        try:
            item_meta = self._manager.item_metadata(step)
        except Exception:
            _settle_after_orbax_failure()
            raise
        tree_meta = item_meta.get(_STATE)
        if tree_meta is None:
            raise CheckpointError(f"state metadata of step {step} is missing")
        tree = tree_meta.tree
        if not isinstance(tree, dict):
            raise CheckpointError(f"state metadata of step {step} is not a flat dict")
        custom = tree_meta.custom_metadata or {}
        if custom.get("nr_jax_format") != _FORMAT_VERSION:
            raise CheckpointError(
                f"state of step {step} has unknown format {custom.get('nr_jax_format')!r}"
            )
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for name, leaf in tree.items():
            if name == _EMPTY_SENTINEL:
                continue
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise CheckpointError(f"state metadata of step {step}: leaf {name!r} has no shape")
            shapes[name] = tuple(int(d) for d in leaf.shape)
            dtypes[name] = str(leaf.dtype)
        zero_size = set()
        for name, info in (custom.get("zero_size") or {}).items():
            shapes[name] = tuple(int(d) for d in info["shape"])
            dtypes[name] = str(info["dtype"])
            zero_size.add(name)
        return {
            "shapes": shapes,
            "dtypes": dtypes,
            "zero_size": zero_size,
            "prng_impls": dict(custom.get("prng_impls") or {}),
        }

    def _not_found(self, step: int | None = None) -> CheckpointNotFoundError:
        if step is None:
            return CheckpointNotFoundError(f"no valid checkpoint found in {self._directory}")
        return CheckpointNotFoundError(f"checkpoint step {step} not found in {self._directory}")

    @staticmethod
    def _check_step(step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return int(step)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer for {self._directory} is closed")

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Waits for pending orbax work and releases its resources (idempotent)."""
        if not self._closed:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self._directory!r}, max_to_keep={self._max_to_keep})"


class _RestorePlan:
    """Flat orbax restore target plus how to rebuild the caller's pytree."""

    def __init__(
        self,
        names: list[str],
        treedef: Any,
        target: dict[str, jax.ShapeDtypeStruct],
        key_dtypes: dict[str, Any],
        zero_size: set[str],
    ):
        self.names = names
        self.treedef = treedef
        self.key_dtypes = key_dtypes
        self.zero_size = zero_size
        self.all_targets = target
        # What orbax actually reads (zero-size leaves are not stored by orbax).
        self.target = {k: v for k, v in target.items() if k not in zero_size}

    def unflatten(self, restored: dict[str, Any]) -> PyTree:
        leaves = []
        for name in self.names:
            if name in self.zero_size:
                spec = self.all_targets[name]
                value = jax.device_put(np.zeros(spec.shape, spec.dtype), spec.sharding)
            else:
                value = restored[name]
            if name in self.key_dtypes:
                value = jax.random.wrap_key_data(value, dtype=self.key_dtypes[name])
            elif not isinstance(value, jax.Array):
                value = jax.device_put(value, self.all_targets[name].sharding)
            leaves.append(value)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
