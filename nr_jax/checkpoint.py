"""Checkpoints of shape-changing training states: a thin wrapper of orbax's CheckpointManager.

Neural Rejuvenation changes parameter *shapes* during training (channel widths grow and shrink)
while the pytree *structure* stays the same. A checkpoint therefore stores, next to the arrays, a
JSON dict (``meta``) from which the caller rebuilds the model, and hence the abstract target tree,
of that particular checkpoint. Restoring is two-phase::

    with Checkpointer("/ckpts", max_to_keep=3) as ckpt:
        ckpt.save(step, state, {"widths": widths, "epoch": epoch})
        ...
        state, meta, step = ckpt.restore(
            lambda meta: jax.eval_shape(make_state, meta["widths"]))

Orbax does the work: one ``CheckpointManager`` step directory per step, holding the composite
``state`` (``StandardSave``: NamedTuple optimiser states, ``optax.MaskedNode``, empty nodes,
``flax.struct`` dataclasses and typed PRNG keys round-trip as they are) and ``meta``
(``JsonSave``); retention (``max_to_keep``, the most recently saved steps); atomic saves (written
into ``<step>.orbax-checkpoint-tmp``, renamed when complete, never listed before); clean-up of the
temporary directories that a killed save left behind (when a ``Checkpointer`` opens the
directory); restore against an abstract target (``StandardRestore``). Saves are synchronous.

What this module adds, because orbax lacks it:

* the JSON ``meta`` read first, so that ``abstract_fn(meta)`` can rebuild the target tree;
* falling back from a corrupt newest checkpoint (unreadable meta or orbax metadata, or an array
  read that fails) to the previous good one, with a warning;
* a caller error (:class:`CheckpointError`, naming the leaf path and both shapes) when the
  abstract tree does not match the checkpoint: orbax would pad, truncate or ignore the target;
* PRNG-key leaves recorded, so that a key restored as a plain array (or the reverse) is an error:
  orbax re-wraps keys from what it saved, whatever the target asks;
* zero-size leaves (a unit of width 0), which orbax refuses to save: stored as empty nodes, their
  shapes recorded, rebuilt as zeros on restore;
* the workaround for CPython gh-106905 (log filters, see :func:`_acquire_log_filters`) for as long
  as a ``Checkpointer`` is open.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "CheckpointNotFoundError", "Checkpointer"]

PyTree = Any
SaveCallback = Callable[[str, int, str], None]

logger = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"
_FORMAT_VERSION = 2  # 1: the hand-flattened layout of earlier versions
_SETTLE_SECONDS = 0.1  # pause after a failed orbax read (see _settle_after_orbax_failure)


class CheckpointError(RuntimeError):
    """Raised when no usable checkpoint exists or a restore request is invalid."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Raised when the directory holds no (finalised) checkpoint, or not the requested step."""


# --------------------------------------------------------------------------- #
# Log filters: installed while a Checkpointer is open, never at import
# --------------------------------------------------------------------------- #
class _CountedFilter(logging.Filter):
    """A filter shared by the open checkpointers; `users` counts them."""

    users = 0


class _QuietOrbaxFilter(_CountedFilter):
    """Drops orbax's DEBUG/INFO chatter (routed through the ``absl`` logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return "/orbax/" not in record.pathname.replace("\\", "/")


class _OrbaxAbandonedTaskFilter(_CountedFilter):
    """Defuses asyncio's "exception was never retrieved" reports for orbax tasks.

    After a failed read orbax abandons its other in-flight asyncio tasks; when they are
    garbage-collected asyncio logs each one at ERROR *with a traceback*. That GC can run inside any
    ``ast.parse`` call, and formatting a traceback there (CPython 3.11 parses source lines to place
    carets) trips CPython bug gh-106905 ("SystemError: AST constructor recursion depth mismatch"),
    which breaks the unrelated outer parse (seen as random pytest crashes). These records duplicate
    an error that :class:`Checkpointer` already handles and reports, so for exceptions from
    orbax/TensorStore the traceback is dropped and the record demoted to DEBUG.
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


_LOG_FILTERS = (("absl", _QuietOrbaxFilter), ("asyncio", _OrbaxAbandonedTaskFilter))


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


def _acquire_log_filters() -> None:
    """Installs the filters of ``_LOG_FILTERS`` (once), counting one more user of each."""
    for name, cls in _LOG_FILTERS:
        target = logging.getLogger(name)
        found = [f for f in target.filters if isinstance(f, cls)]
        log_filter = found[0] if found else cls()
        if not found:
            target.addFilter(log_filter)
        log_filter.users += 1


def _release_log_filters() -> None:
    """Counts one user less; removes each filter when its last user is gone."""
    for name, cls in _LOG_FILTERS:
        target = logging.getLogger(name)
        for log_filter in [f for f in target.filters if isinstance(f, cls)]:
            log_filter.users -= 1
            if log_filter.users <= 0:
                target.removeFilter(log_filter)


def _settle_after_orbax_failure() -> None:
    """Lets orbax's abandoned work finish and be reported *now*, while the filters are installed.

    When one TensorStore read fails, orbax abandons the other in-flight reads and closes its event
    loop; the never-retrieved asyncio tasks log their exception whenever the garbage collector gets
    to them, possibly inside an unrelated ``ast.parse`` (gh-106905, see
    :class:`_OrbaxAbandonedTaskFilter`) or after the checkpointer (and its filters) is gone.
    Waiting briefly and collecting garbage here, at a safe point, avoids both. Only runs on the
    (rare) corrupt-checkpoint path.
    """
    time.sleep(_SETTLE_SECONDS)
    gc.collect()


# --------------------------------------------------------------------------- #
# Leaves: what orbax stores, what the caller asks for
# --------------------------------------------------------------------------- #
def _is_key(dtype: Any) -> bool:
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_name(path: tuple[Any, ...]) -> str:
    """Orbax's own name of a leaf (``opt_state.0.mu.params.Dense_0.kernel``)."""
    return ".".join(ocp.tree.str_keypath(path))


def _check_json(obj: Any, where: str = "meta") -> None:
    """Ensures ``obj`` round-trips exactly through JSON (no tuples, str keys, finite floats)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise TypeError(f"{where}: expected a finite float, got {obj!r} (not valid JSON)")
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
        f"{where}: {type(obj).__name__} does not round-trip through JSON; expected dict (str "
        "keys), list, str, int, float, bool or None (tuples/numpy scalars are not allowed)"
    )


def _to_stored(state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """The tree handed to orbax, and the custom metadata saved with it.

    Scalars become numpy arrays; zero-size leaves (orbax: "Cannot save arrays with zero size")
    become empty nodes, their shapes (of the key data, for keys) recorded in ``zero_size``; the
    names of PRNG-key leaves go to ``prng_keys`` with their implementation.
    """
    keys: dict[str, str] = {}
    zero_size: dict[str, list[int]] = {}

    def convert(path: tuple[Any, ...], leaf: Any) -> Any:
        if isinstance(leaf, (bool, int, float, complex, np.generic)):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"unsupported state leaf {jax.tree_util.keystr(path)} of type "
                f"{type(leaf).__name__}; expected jax/numpy arrays or python/numpy scalars"
            )
        data_shape = leaf.shape
        if _is_key(leaf.dtype):
            keys[_leaf_name(path)] = str(jax.random.key_impl(leaf))
            data_shape = jax.eval_shape(jax.random.key_data, leaf).shape
        if leaf.size == 0:
            zero_size[_leaf_name(path)] = list(data_shape)
            return None
        return leaf

    stored = jax.tree_util.tree_map_with_path(convert, state)
    return stored, {"nr_jax_format": _FORMAT_VERSION, "prng_keys": keys, "zero_size": zero_size}


def _default_sharding() -> jax.sharding.Sharding:
    device = jax.config.jax_default_device
    if isinstance(device, str):
        device = jax.devices(device)[0]
    return jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])


def _as_abstract(leaf: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """An abstract leaf as a ShapeDtypeStruct with a sharding (orbax then returns jax.Array)."""
    if isinstance(leaf, (bool, int, float, complex, np.generic)):
        leaf = np.asarray(leaf)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(
            f"unsupported abstract leaf of type {type(leaf).__name__}; expected "
            "jax.ShapeDtypeStruct or an array"
        )
    sharding = getattr(leaf, "sharding", None) or sharding
    dtype = leaf.dtype if _is_key(leaf.dtype) else jax.dtypes.canonicalize_dtype(leaf.dtype)
    return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype, sharding=sharding)


def _zeros(spec: jax.ShapeDtypeStruct) -> jax.Array:
    """A zero-size leaf rebuilt from its abstract spec."""
    if _is_key(spec.dtype):
        data = jax.eval_shape(jax.random.key_data, spec)
        keys = jax.random.wrap_key_data(np.zeros(data.shape, data.dtype), dtype=spec.dtype)
        return jax.device_put(keys, spec.sharding)
    return jax.device_put(np.zeros(spec.shape, spec.dtype), spec.sharding)


def _restore_target(abstract: PyTree, stored: dict[str, Any], where: str) -> PyTree:
    """Checks ``abstract`` against the checkpoint's leaves; returns the orbax target.

    Raises:
        CheckpointError: The first leaf missing, extra, of another shape, or a PRNG key on one side
            only (a caller error: the abstract tree does not describe this checkpoint).
    """
    sharding = _default_sharding()
    specs = jax.tree.map(lambda leaf: _as_abstract(leaf, sharding), abstract)
    flat = jax.tree_util.tree_flatten_with_path(specs)[0]
    names = {_leaf_name(path) for path, _ in flat}
    for path, spec in flat:
        name, leaf = _leaf_name(path), jax.tree_util.keystr(path) or "<root>"
        if name not in stored["shapes"]:
            raise CheckpointError(
                f"abstract tree does not match {where}: leaf {leaf} is not in the checkpoint"
            )
        if _is_key(spec.dtype) != (name in stored["prng_keys"]):
            held = "a PRNG key" if name in stored["prng_keys"] else "a plain array"
            raise CheckpointError(
                f"abstract tree does not match {where}: leaf {leaf} is stored "
                f"as {held} but requested as {spec.dtype}"
            )
        want = (
            jax.eval_shape(jax.random.key_data, spec).shape if _is_key(spec.dtype) else spec.shape
        )
        have = stored["shapes"][name]
        if tuple(want) != have:
            raise CheckpointError(
                f"shape mismatch for leaf {leaf} in {where}: abstract shape "
                f"{tuple(want)} vs checkpoint shape {have}"
            )
    extra = sorted(set(stored["shapes"]) - names)
    if extra:
        raise CheckpointError(
            f"abstract tree does not match {where}: the checkpoint has "
            f"{len(extra)} leaves not in the abstract tree, e.g. {extra[0]!r}"
        )
    return specs


def _fill_zero_size(specs: PyTree, restored: PyTree) -> PyTree:
    """Puts the zero-size leaves (empty nodes in the checkpoint) back, as zeros."""
    return jax.tree.map(lambda s, r: _zeros(s) if math.prod(s.shape) == 0 else r, specs, restored)


# --------------------------------------------------------------------------- #
# Checkpointer
# --------------------------------------------------------------------------- #
class Checkpointer:
    """Saves and restores (state pytree, JSON meta) pairs, one per training step.

    Array shapes may differ between steps: the caller rebuilds the abstract target from the stored
    ``meta``. See the module docstring for what orbax does and what this class adds. One writer per
    directory: opening a ``Checkpointer`` removes the temporary directories of unfinished saves.

    Args:
        directory: Root directory holding one sub-directory per step; created on the first save.
        max_to_keep: Keep at most this many checkpoints: the most recently saved ones (orbax's
            ``max_to_keep``; on reopening, ordered by step number). The step just saved is kept.
        on_save: Optional callback ``on_save(event, step, directory)``, called with
            ``event="start"`` right before orbax starts writing step ``step`` (its temporary
            directory does not exist yet), and ``event="end"`` right after the step is committed
            (the final rename is done, older steps pruned). Crash tests use it to kill the process
            during or right after a save; exceptions it raises propagate from :meth:`save`.
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
        self._max_to_keep = max_to_keep
        self._on_save = on_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            create=False,  # nothing on disk before the first save
            cleanup_tmp_directories=True,
            # Multi-process (not supported yet): orbax removes temporary directories and old steps
            # on the primary host only; a run with several processes writing to one shared
            # directory would pass `multiprocessing_options=ocp.options.MultiprocessingOptions(
            # primary_host=0)` here (and `primary_host=None` for per-host local storage).
        )
        _acquire_log_filters()
        self._closed = False
        try:
            self._manager = ocp.CheckpointManager(
                self._directory,
                options=options,
                item_handlers={
                    _STATE: ocp.StandardCheckpointHandler(),
                    _META: ocp.JsonCheckpointHandler(),
                },
            )
        except BaseException:
            self._closed = True
            _release_log_filters()
            raise

    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint root directory."""
        return self._directory

    @property
    def max_to_keep(self) -> int:
        """Maximum number of checkpoints kept on disk."""
        return self._max_to_keep

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Saves ``state`` and ``meta`` as checkpoint ``step``; returns once it is committed.

        The write is atomic (orbax's temporary directory, renamed when complete). If ``step``
        already exists it is replaced (with a warning); then orbax prunes to ``max_to_keep``.

        Args:
            step: Non-negative training step.
            state: Pytree whose leaves are jax/numpy arrays (typed PRNG keys included) or
                python/numpy scalars.
            meta: JSON-serialisable dict (str keys; lists, not tuples) from which the caller can
                rebuild the abstract state tree.

        Raises:
            TypeError: If ``meta`` does not round-trip through JSON exactly, or a state leaf has an
                unsupported type (nothing is written then).
            ValueError: If ``step`` is negative.
        """
        self._check_open()
        step = _check_step(step)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        _check_json(meta)
        stored, custom = _to_stored(state)
        os.makedirs(self._directory, exist_ok=True)
        self._manager.reload()
        if step in self._manager.all_steps():
            logger.warning("Checkpoint step %d exists in %s; replacing it", step, self._directory)
            self._manager.delete(step)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(stored, custom_metadata=custom),
                _META: ocp.args.JsonSave(json.loads(json.dumps(meta))),
            }
        )
        self._notify("start", step)
        # force: orbax would otherwise skip a step <= its latest one.
        if not self._manager.save(step, args=args, force=True):
            raise CheckpointError(f"orbax declined to save step {step} in {self._directory}")
        self._notify("end", step)

    def _notify(self, event: str, step: int) -> None:
        if self._on_save is not None:
            self._on_save(event, step, self._directory)

    def all_steps(self) -> list[int]:
        """All finalised checkpoint steps on disk, ascending (corrupt ones included)."""
        self._check_open()
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalised step whose JSON meta and orbax metadata are readable, or None.

        Array payload corruption is only detected by :meth:`restore` (which then falls back).
        """
        for step in reversed(self.all_steps()):
            try:
                self._read_meta(step)
                self._read_stored(step)
            except Exception as e:  # noqa: BLE001 - any failure means "not valid"
                logger.warning(
                    "Skipping invalid checkpoint step %d in %s: %s", step, self._directory, e
                )
                continue
            return step
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
            raise CheckpointError(
                f"cannot read meta of checkpoint step {step} in {self._directory}: {e}"
            ) from e

    def restore(
        self, abstract_fn: Callable[[dict], PyTree], step: int | None = None
    ) -> tuple[PyTree, dict, int]:
        """Restores a checkpoint into the tree described by ``abstract_fn(meta)``.

        Phase 1 reads the JSON meta; phase 2 calls ``abstract_fn(meta)``, which returns a pytree
        (the saved state's structure) of ``jax.ShapeDtypeStruct`` (or arrays, used for their
        shape, dtype and sharding); phase 3 has orbax read the arrays with exactly those shapes
        and dtypes (values cast where the stored dtype differs), as ``jax.Array`` with the
        leaf's sharding or on the default device. PRNG-key leaves come back as typed keys.

        With ``step=None`` the newest checkpoint is tried first; a corrupt or partial one
        (unreadable meta or orbax metadata, or an array read that fails) is skipped with a
        warning for the next older one. An explicitly requested ``step`` never falls back.

        Args:
            abstract_fn: Maps the stored meta dict to the abstract target tree; its exceptions
                propagate unchanged.
            step: Step to restore, or ``None`` for the newest usable one.

        Returns:
            ``(state, meta, step)``.

        Raises:
            CheckpointNotFoundError: If the directory holds no checkpoint, or not ``step``.
            CheckpointError: If no candidate is usable (naming the directory and each step tried
                with its error), or if the abstract tree does not match the checkpoint (naming
                the first mismatching leaf path and both shapes): a caller error, no fallback.
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
            try:
                meta, stored = self._read_meta(cand), self._read_stored(cand)
            except Exception as e:  # noqa: BLE001 - corrupt/partial checkpoint
                failures.append(f"step {cand}: unreadable metadata ({type(e).__name__}: {e})")
                self._warn_skip(failures[-1], step)
                continue
            where = f"checkpoint step {cand} in {self._directory}"
            specs = _restore_target(abstract_fn(meta), stored, where)  # raises on caller error
            try:
                state = self._read_state(cand, specs)
            except Exception as e:  # noqa: BLE001 - corrupt array payload
                _settle_after_orbax_failure()
                failures.append(f"step {cand}: restore failed ({type(e).__name__}: {e})")
                self._warn_skip(failures[-1], step)
                continue
            return state, meta, cand
        raise CheckpointError(
            f"no usable checkpoint in {self._directory} (tried steps {candidates}): "
            + "; ".join(failures)
        )

    def _warn_skip(self, reason: str, requested: int | None) -> None:
        if requested is None:
            logger.warning(
                "Checkpoint in %s is corrupt or partial, falling back to an older one: %s",
                self._directory,
                reason,
            )

    def _read_state(self, step: int, specs: PyTree) -> PyTree:
        target = jax.tree.map(lambda s: None if math.prod(s.shape) == 0 else s, specs)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target, strict=True)})
        restored = self._manager.restore(step, args=args)[_STATE]
        return _fill_zero_size(specs, restored)

    def _read_meta(self, step: int) -> dict:
        args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        meta = self._manager.restore(step, args=args)[_META]
        if not isinstance(meta, dict):
            raise CheckpointError(f"meta of step {step} is {type(meta).__name__}, not a dict")
        return meta

    def _read_stored(self, step: int) -> dict[str, Any]:
        """Shapes (key data, for keys) and PRNG-key names of the leaves saved at ``step``."""
        try:
            tree_meta = self._manager.item_metadata(step).get(_STATE)
        except Exception:
            _settle_after_orbax_failure()
            raise
        if tree_meta is None:
            raise CheckpointError(f"state metadata of step {step} is missing")
        custom = tree_meta.custom_metadata or {}
        if custom.get("nr_jax_format") != _FORMAT_VERSION:
            raise CheckpointError(
                f"state of step {step} has format "
                f"{custom.get('nr_jax_format')!r}, expected {_FORMAT_VERSION}"
            )
        shapes = {
            ".".join(path): tuple(int(d) for d in leaf.shape)
            for path, leaf in ocp.tree.to_flat_dict(tree_meta.tree or {}).items()
        }
        shapes.update({name: tuple(shape) for name, shape in custom["zero_size"].items()})
        return {"shapes": shapes, "prng_keys": custom["prng_keys"]}

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
                _release_log_filters()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self._directory!r}, max_to_keep={self._max_to_keep})"


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)
