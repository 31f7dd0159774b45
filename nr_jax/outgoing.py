"""The outgoing weights of each channel: the kernel rows of every consumer that reads it.

A unit without a normalisation scale has no γ to read its liveness from or to put pressure on.
What it has are its channels' outgoing weights: for channel c of a unit, the rows `W[..., i, :]`
of every consumer's kernel (units and the classifier) whose input channel i is c, through
concatenations. A channel whose outgoing weights are all zero computes nothing that reaches the
network's output. `norms` gives their L2 norm per channel (the "outgoing" liveness criterion,
`nr_jax.criteria`; the group-lasso pressure, `nr_jax.group_lasso`, shrinks them). A residual
stream's channel is one channel: its key is the frozenset of the units summed into it, as in the
graph's input segments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
from flax import traverse_util

from nr_jax.graph import INPUT, ChannelGraph, Unit
from nr_jax.live import array_module

Array = jax.Array
Source = frozenset[str]  # the units summed into a channel (one unit, or a residual stream)


def flat_params(params: Any) -> dict[tuple[str, ...], Any]:
    """`params` keyed by path (`flax.traverse_util.flatten_dict`)."""
    if isinstance(params, flax.core.FrozenDict):
        params = flax.core.unfreeze(params)
    return traverse_util.flatten_dict(params)


def kernel_of(flat: Mapping[tuple[str, ...], Any], unit: Unit) -> Array:
    """The unit's kernel from path-keyed params (`flat_params`), checked against the graph."""
    path = (*unit.path, "kernel")
    if path not in flat:
        raise ValueError(f"params have no kernel at {'/'.join(path)}; made by another model?")
    k = flat[path]
    if tuple(k.shape) != unit.kernel_shape:
        raise ValueError(
            f"kernel of unit {unit.name} has shape {tuple(k.shape)}, the graph expects "
            f"{unit.kernel_shape}: params and graph come from different widths"
        )
    return k


def sources(graph: ChannelGraph) -> dict[Source, int]:
    """Every channel source some unit reads (not the image), with its width."""
    out: dict[Source, int] = {}
    for v in graph.all_units:
        for producers, _, _ in v.inputs:
            if INPUT not in producers:
                out[producers] = graph[sorted(producers)[0]].out_channels
    return out


def norms(params: Any, graph: ChannelGraph) -> dict[Source, Array]:
    """L2 norm of every channel's outgoing weights, per source: shape (D,) each.

    jnp arrays (jit-able) when a leaf of `params` is a jax array, numpy otherwise.
    """
    flat = flat_params(params)
    xp = array_module(flat)
    widths = sources(graph)
    sq = {s: xp.zeros((d,), xp.float32) for s, d in widths.items()}
    for v in graph.all_units:
        k = kernel_of(flat, v).astype(xp.float32)
        axes = tuple(i for i in range(k.ndim) if i != k.ndim - 2)
        rows = xp.sum(xp.square(k), axis=axes)  # (D_in,)
        offset = 0
        for producers, start, stop in v.inputs:
            n = stop - start
            if INPUT not in producers:
                piece = rows[offset : offset + n]
                sq[producers] = sq[producers] + xp.pad(piece, (start, widths[producers] - stop))
            offset += n
    return {s: xp.sqrt(v) for s, v in sq.items()}


def unit_norms(params: Any, graph: ChannelGraph) -> dict[str, Array]:
    """Per unit, the outgoing-weight norm of each output channel, shape (D_out,).

    A unit in a residual stream gets the stream's norms; a unit nothing reads (no consumer)
    gets ones (it cannot be judged by what it sends).
    """
    per_source = norms(params, graph)
    xp = array_module(params)
    out = {}
    for u in graph.units:
        mine = [v for s, v in per_source.items() if u.name in s]
        out[u.name] = sum(mine[1:], mine[0]) if mine else xp.ones((u.out_channels,), xp.float32)
    return out
