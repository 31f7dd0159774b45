"""Channels follow their index plan: parameter leaves and any optax chain's state (host, numpy).

`carry(old, axes, fill)` builds a new leaf whose every planned axis is [the kept old entries, in
order; `fill`]. `remap_opt_state` applies the same plans to every parameter-shaped slot of an
optimiser state (momentum, Adam moments...) through `optax.tree_map_params`, whatever the chain:
survivors' slots carried over, new slots zero, counters and λ untouched; the result has exactly
the structure, shapes and dtypes of `tx.init(new_params)` (conventions.md 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import traverse_util

from nr_jax.hostmem import aligned_zeros

__all__ = ["Axis", "carry", "remap_opt_state"]


class Axis(NamedTuple):
    """One planned axis: its new size and the old indices kept, in their new order, placed first
    (ascending for surviving channels; a permutation where a concatenation is re-laid out)."""

    size: int
    src: np.ndarray


Axes = Sequence[Axis | None]  # one entry per axis of a leaf; None: the axis is unchanged


def new_shape(old_shape: Sequence[int], axes: Axes) -> tuple[int, ...]:
    return tuple(int(n) if a is None else a.size for n, a in zip(old_shape, axes, strict=True))


def carry(old: np.ndarray, axes: Axes, fill: float = 0.0) -> np.ndarray:
    """A new array: `old`'s kept entries at the front of every planned axis, `fill` elsewhere.

    Args:
      old: the old leaf, shape (..., D_old, ...).
      axes: per axis of `old`, an `Axis` or None (unchanged).
      fill: the value of every new entry.

    Returns:
      A fresh numpy array of shape `new_shape(old.shape, axes)` and `old`'s dtype.
    """
    shape = new_shape(old.shape, axes)
    out = aligned_zeros(shape, old.dtype)
    if fill != 0:
        out[...] = fill
    block, dst = old, []
    for i, a in enumerate(axes):
        if a is None:
            dst.append(slice(None))
            continue
        full = len(a.src) == old.shape[i]
        if not full or np.any(np.diff(a.src) < 0):  # all kept in order: nothing to gather
            block = block.take(a.src, axis=i)
        dst.append(slice(0, len(a.src)))
    out[tuple(dst)] = block
    return out


class _Slot:
    """Marks a parameter-shaped slot of the optimiser state (a leaf for tree utilities)."""

    __slots__ = ("axes", "old_shape")

    def __init__(self, axes: Axes | None, old_shape: tuple[int, ...]) -> None:
        self.axes, self.old_shape = axes, old_shape


_NON_PARAM = object()


def _labels(tx: optax.GradientTransformation, opt_state: Any, slots: Any) -> list[Any]:
    """Per leaf of `opt_state`: the `_Slot` of the parameter it follows, or `_NON_PARAM`."""

    def is_masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    labels = optax.tree_map_params(
        tx,
        lambda leaf, slot: leaf if is_masked(leaf) else slot,
        opt_state,
        slots,
        transform_non_params=lambda _: _NON_PARAM,
        is_leaf=lambda x: is_masked(x) or isinstance(x, _Slot),
    )
    return jax.tree.leaves(labels, is_leaf=lambda x: isinstance(x, _Slot) or x is _NON_PARAM)


def remap_opt_state(
    tx: optax.GradientTransformation,
    opt_state: Any,
    old_params: dict,
    new_params: Any,
    axes: Mapping[tuple[str, ...], Axes],
) -> Any:
    """The optimiser state for `new_params`: survivors' slots carried, new slots zero.

    Args:
      tx: the optimiser that made `opt_state` (reused unchanged).
      opt_state: `tx`'s state for `old_params`.
      old_params: the old parameters, nested plain dicts.
      new_params: the new parameters (arrays, numpy or jax).
      axes: per parameter path (`flax.traverse_util.flatten_dict` keys) the plan of its axes;
        a parameter without one is unchanged.

    Returns:
      The new state (numpy leaves where slots moved, `tx.init(new_params)`'s value where a slot
      cannot follow its parameter, e.g. factored statistics; other leaves kept).
    """
    flat = traverse_util.flatten_dict(old_params)
    slots = traverse_util.unflatten_dict(
        {k: _Slot(axes.get(k), tuple(np.shape(v))) for k, v in flat.items()}
    )
    template = jax.eval_shape(tx.init, new_params)  # no arrays allocated, nothing compiled
    labels = _labels(tx, opt_state, slots)
    old_leaves = jax.tree.leaves(opt_state)
    new_leaves, treedef = jax.tree.flatten(template)
    if not len(labels) == len(old_leaves) == len(new_leaves):
        raise ValueError(
            "rejuvenate: opt_state does not have the structure of tx.init(params); "
            "was it made by another optimiser or model?"
        )
    out: list[Any] = []
    fresh: list[int] = []  # leaves that take tx.init(new_params)'s value
    for label, old, init in zip(labels, old_leaves, new_leaves, strict=True):
        old_shape, want = tuple(np.shape(old)), tuple(init.shape)
        if label is _NON_PARAM:
            keep = old_shape == want  # counters and λ are kept
        elif label.axes is None or old_shape != label.old_shape:
            keep = old_shape == want and label.axes is None  # else factored statistics
        elif new_shape(old_shape, label.axes) == want:
            out.append(carry(np.asarray(old), label.axes))
            continue
        else:
            keep = False
        if not keep:
            fresh.append(len(out))
        out.append(old)
    if fresh:  # only then pay for a real initialisation
        real = jax.tree.leaves(tx.init(new_params))
        for i in fresh:
            out[i] = real[i]
    return jax.tree.unflatten(treedef, out)
