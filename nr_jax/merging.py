"""Merging a rejuvenated network back into an ordinary one: the step between two NR cycles.

After a rejuvenation with cross connections removed, every unit computes its old and new output
channels from separate blocks of one kernel, the cross blocks held at zero, and the classifier has
two heads whose sum is the prediction (method.md 4.1-4.3). Merging makes it an ordinary network
with the same function: the units lose their split points (the zero cross blocks become ordinary,
trainable weights), the two heads become one classifier (its bias doubled where the official
preset adds it to both heads, method.md 7.6), and where a concatenation laid its inputs out as
[survivors of every producer, new channels of every producer] the consumer's input rows are
permuted to the ordinary producer-by-producer layout (DenseNet). The optimiser state follows its
parameters. A cross-attention network cannot be merged: its cross blocks are not zero but gated,
so an ordinary convolution would change its function.

    merged = nr_jax.merge(res.model, res.variables, res.opt_state, tx, res.graph)
    # merged.model: ordinary, merged.graph not rejuvenated: the search can start again
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

from nr_jax.graph import ChannelGraph, Segment, channel_graph
from nr_jax.optstate import Axis, carry, remap_opt_state

__all__ = ["Merged", "merge"]


class Merged(NamedTuple):
    """Result of `merge`: the ordinary model, its variables, optimiser state and graph."""

    model: nn.Module
    variables: dict[str, Any]
    opt_state: Any
    graph: ChannelGraph


def _rows(segments: tuple[Segment, ...]) -> list[tuple[Any, int]]:
    """Every input row of a unit as (its producer set, the producer's channel)."""
    return [(producers, c) for producers, start, stop in segments for c in range(start, stop)]


def _input_order(old: tuple[Segment, ...], new: tuple[Segment, ...]) -> np.ndarray | None:
    """Old row indices in the order of the ordinary layout `new`, or None when unchanged."""
    position = {row: i for i, row in enumerate(_rows(old))}
    order = np.asarray([position[row] for row in _rows(new)], np.intp)
    return None if np.array_equal(order, np.arange(len(order))) else order


def merge(
    model: nn.Module,
    variables: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
) -> Merged:
    """The rejuvenated `model` as an ordinary network with the same function.

    Args:
      model: a rejuvenated model (scheme "removed"), e.g. `nr_jax.rejuvenate(...).model`.
      variables: its {"params", "batch_stats", "nr_masks"}.
      opt_state: `tx`'s state for its parameters (None: return None).
      tx: the optimiser (reused unchanged).
      graph: the model's channel graph (`Rejuvenation.graph`).

    Returns:
      `Merged(model, variables, opt_state, graph)`: jax arrays; `graph` is not rejuvenated.

    Raises:
      ValueError: the network is not rejuvenated, or uses cross-attention.
    """
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph, got {type(graph).__name__}")
    if not graph.rejuvenated:
        raise ValueError("merge: this network is not rejuvenated (nothing to merge)")
    gated = sorted(u.name for u in graph.units if u.scheme == "attention")
    if gated:
        raise ValueError(
            f"merge: units {gated[:3]}{'...' if len(gated) > 3 else ''} use cross-attention, "
            "whose gated cross blocks no ordinary convolution reproduces; only networks "
            "rejuvenated with cross connections removed (nr.scheme='removed') can be merged"
        )
    new_model = model.clone(widths=model.widths.plain())
    new_graph = channel_graph(new_model, graph.input_shape)
    host = jax.tree.map(np.asarray, jax.device_get(variables))
    flat = traverse_util.flatten_dict(host, keep_empty_nodes=True)
    new = {k: np.array(v) for k, v in flat.items()}
    axes: dict[tuple[str, ...], tuple[Axis | None, ...]] = {}
    plain = {u.name: u for u in new_graph.all_units}
    for u in graph.all_units:
        path = (*u.path, "kernel")
        order = _input_order(u.inputs, plain[u.name].inputs)
        if order is not None:  # kernels are [..., D_in, D_out] (conv, dense and classifier)
            kernel = flat[("params", *path)]
            axes[path] = (None,) * (kernel.ndim - 2) + (Axis(len(order), order), None)
            new[("params", *path)] = carry(kernel, axes[path])
        if u.kind == "classifier" and getattr(model, "bias_in_both_heads", False):
            bias = ("params", *u.path, "bias")
            new[bias] = 2 * flat[bias]  # z_old + z_new counted the bias twice
    new_vars = traverse_util.unflatten_dict(new)
    state = None
    if opt_state is not None:
        state = remap_opt_state(tx, opt_state, host["params"], new_vars["params"], axes)
    new_vars, state = jax.device_put((new_vars, state))
    return Merged(new_model, new_vars, state, new_graph)
