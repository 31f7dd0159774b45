"""The state tree as a checkpoint stores it, and the abstract target it is restored into.

What orbax lacks for shape-changing states, on the tree side (`nr_jax.checkpoint` does the
reading and writing): a JSON check of the caller's ``meta`` (exact round trip); zero-size leaves
(orbax: "Cannot save arrays with zero size") stored as empty nodes, with their shapes in the
custom metadata, and rebuilt as zeros; the names and implementations of typed PRNG keys; and a
caller error naming the leaf path and both shapes where the abstract tree does not describe the
checkpoint (orbax would pad, truncate, or re-wrap PRNG keys whatever the target asks).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "check_json",
    "restore_specs",
    "restore_target",
    "stored_layout",
    "to_stored",
    "with_zeros",
]

PyTree = Any

FORMAT_VERSION = 2  # 1: the hand-flattened layout of earlier versions


class CheckpointError(RuntimeError):
    """Raised when no usable checkpoint exists or a restore request is invalid."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Raised when the directory holds no (finalised) checkpoint, or not the requested step."""


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_name(path: tuple[Any, ...]) -> str:
    """Orbax's own name of a leaf (``opt_state.0.mu.Dense_0.kernel``)."""
    return ".".join(ocp.tree.str_keypath(path))


def _data_shape(leaf: Any) -> tuple[int, ...]:
    """The shape orbax stores: the key data's for PRNG keys."""
    if _is_key(leaf.dtype):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def check_json(obj: Any, where: str = "meta") -> None:
    """Ensures ``obj`` round-trips exactly through JSON (str keys, lists, finite floats)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise TypeError(f"{where}: expected a finite float, got {obj!r} (not valid JSON)")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is not a str")
    elif not isinstance(obj, list):
        raise TypeError(
            f"{where}: expected dict, list, str, int, float, bool or None (JSON), got "
            f"{type(obj).__name__}, which does not round-trip through JSON"
        )
    for key, value in obj.items() if isinstance(obj, dict) else enumerate(obj):
        check_json(value, f"{where}[{key!r}]")


def to_stored(state: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """The tree for orbax (zero-size leaves as empty nodes) and the custom metadata to save."""
    keys: dict[str, str] = {}
    zero_size: dict[str, list[int]] = {}

    def convert(path: tuple[Any, ...], leaf: Any) -> Any:
        if isinstance(leaf, (bool, int, float, complex, np.generic)):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"unsupported state leaf {jax.tree_util.keystr(path)}: expected "
                f"jax/numpy arrays or scalars, got {type(leaf).__name__}"
            )
        if _is_key(leaf.dtype):
            keys[_leaf_name(path)] = str(jax.random.key_impl(leaf))
        if leaf.size == 0:
            zero_size[_leaf_name(path)] = list(_data_shape(leaf))
            return None
        return leaf

    stored = jax.tree_util.tree_map_with_path(convert, state)
    return stored, {"nr_jax_format": FORMAT_VERSION, "prng_keys": keys, "zero_size": zero_size}


def stored_layout(tree_meta: Any, step: int) -> dict[str, Any]:
    """Stored shapes (key data shapes, for keys) and PRNG-key names of a step's leaves, from
    orbax's item metadata of its state (``tree`` and the ``custom_metadata`` of `to_stored`)."""
    custom = (tree_meta.custom_metadata if tree_meta is not None else None) or {}
    if custom.get("nr_jax_format") != FORMAT_VERSION:
        raise CheckpointError(f"state of step {step} is not nr_jax format {FORMAT_VERSION}")
    flat = ocp.tree.to_flat_dict(tree_meta.tree or {}, sep=".")
    shapes = {name: tuple(int(d) for d in leaf.shape) for name, leaf in flat.items()}
    shapes.update({name: tuple(shape) for name, shape in custom["zero_size"].items()})
    return {"shapes": shapes, "prng_keys": custom["prng_keys"]}


def _as_spec(leaf: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """An abstract leaf as a ShapeDtypeStruct with a sharding (so orbax returns a jax.Array)."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(f"abstract leaf: expected a ShapeDtypeStruct or array, got {leaf!r}")
    dtype = leaf.dtype if _is_key(leaf.dtype) else jax.dtypes.canonicalize_dtype(leaf.dtype)
    sharding = getattr(leaf, "sharding", None) or sharding
    return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype, sharding=sharding)


def restore_specs(abstract: PyTree, stored: dict[str, Any], where: str) -> PyTree:
    """The abstract tree as ShapeDtypeStructs; CheckpointError on the first leaf missing, extra,
    of another shape, or a PRNG key on one side only (a caller error)."""
    device = jax.config.jax_default_device or jax.local_devices()[0]
    device = jax.devices(device)[0] if isinstance(device, str) else device
    specs = jax.tree.map(lambda x: _as_spec(x, jax.sharding.SingleDeviceSharding(device)), abstract)
    flat = jax.tree_util.tree_flatten_with_path(specs)[0]
    shapes, keys = stored["shapes"], stored["prng_keys"]
    for path, spec in flat:
        name, leaf = _leaf_name(path), jax.tree_util.keystr(path) or "<root>"
        if name not in shapes:
            raise CheckpointError(
                f"abstract tree does not match {where}: leaf {leaf} is not in the checkpoint"
            )
        if _is_key(spec.dtype) != (name in keys):
            held = "a PRNG key" if name in keys else "a plain array"
            raise CheckpointError(
                f"abstract tree does not match {where}: leaf {leaf} is stored as {held} but "
                f"requested as {spec.dtype}"
            )
        if _data_shape(spec) != shapes[name]:
            raise CheckpointError(
                f"shape mismatch for leaf {leaf} in {where}: abstract shape {_data_shape(spec)} "
                f"vs checkpoint shape {shapes[name]}"
            )
    extra = sorted(set(shapes) - {_leaf_name(path) for path, _ in flat})
    if extra:
        raise CheckpointError(
            f"abstract tree does not match {where}: it has {len(extra)} leaves not in the "
            f"abstract tree, e.g. {extra[0]!r}"
        )
    return specs


def restore_target(specs: PyTree) -> PyTree:
    """The tree orbax restores: `restore_specs`'s, zero-size leaves as empty nodes (as stored)."""
    return jax.tree.map(lambda s: None if math.prod(s.shape) == 0 else s, specs)


def with_zeros(specs: PyTree, restored: PyTree) -> PyTree:
    """``restored`` (read against `restore_target`) with its zero-size leaves rebuilt as zeros."""
    return jax.tree.map(lambda s, r: r if r is not None else _zeros(s), specs, restored)


def _zeros(spec: jax.ShapeDtypeStruct) -> jax.Array:
    """A zero-size leaf rebuilt from its spec."""
    if not _is_key(spec.dtype):
        return jax.device_put(np.zeros(spec.shape, spec.dtype), spec.sharding)
    data = jax.eval_shape(jax.random.key_data, spec)
    keys = jax.random.wrap_key_data(np.zeros(data.shape, data.dtype), dtype=spec.dtype)
    return jax.device_put(keys, spec.sharding)
