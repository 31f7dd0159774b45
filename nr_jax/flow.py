"""The helpers that move activations between units: pools, ReLU, residual sums, concatenation.

Each (`max_pool`, `avg_pool`, `relu`, `add`, `concat`, `flatten`, `identity`, `passthrough`) is a
plain function at run time; while `nr_jax.channel_graph` traces a model it also records which
channels flow where. Models reach them as `nr_jax.layers.<name>` (re-exported there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import ops, tracing

__all__ = [
    "add",
    "avg_pool",
    "concat",
    "flatten",
    "identity",
    "max_pool",
    "passthrough",
    "relu",
]

Array = jax.Array


def passthrough(fn: Callable[[Array], Array], x: Array) -> Array:
    """Applies a channel-preserving function `fn` and keeps the channel graph informed."""
    return tracing.passthrough(x, fn(x))


def max_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Max pooling over H, W (channel-preserving).

    Non-overlapping windows without padding (window == strides, "VALID": every VGG pool) are
    `ops.block_max_pool` (a reshape and a max; the gradient goes to each window's first maximum,
    as `nn.max_pool`'s does, 2.5-4.5x faster on CPU). Other pools are `nn.max_pool`.
    """
    s = strides or window
    if s == window and isinstance(padding, str) and padding.upper() == "VALID":
        return tracing.passthrough(x, ops.block_max_pool(x, window))
    return tracing.passthrough(x, nn.max_pool(x, (window, window), (s, s), padding))


def avg_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Average pooling over H, W (channel-preserving)."""
    s = strides or window
    return tracing.passthrough(x, nn.avg_pool(x, (window, window), (s, s), padding))


def relu(x: Array) -> Array:
    """ReLU (channel-preserving)."""
    return tracing.passthrough(x, nn.relu(x))


def flatten(x: Array) -> Array:
    """(B, H, W, C) -> (B, H*W*C) for the network input (an MLP's first `NRDense`).

    The channel graph can follow it on the input only: flattening a unit's output would spread
    each of its channels over many features.
    """
    y = x.reshape(x.shape[0], -1)
    tracker = tracing.active()
    if tracker is not None:
        source = tracker.source_of(x, "<flatten>")
        if any(tracing.INPUT not in producers for producers, _, _ in source):
            raise ValueError(
                "nr_jax.layers.flatten: only the network input can be flattened (a unit's "
                "channels would be spread over many features); pool unit outputs instead"
            )
        tracker.tag(y, ((frozenset([tracing.INPUT]), 0, y.shape[-1]),))
    return y


def identity(x: Array) -> Array:
    """Identity (channel-preserving); useful to name a shortcut."""
    return x


def add(*xs: Array) -> Array:
    """Residual sum: the summed units become tied (they share one channel space)."""
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    tracker = tracing.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<add>") for x in xs]
        out = tracing.add_sources(sources)
        tracker.ties.append(out[0][0])
        tracker.tag(y, out)
    return y


def concat(xs: Sequence[Array], splits: Sequence[int] | None = None) -> Array:
    """Channel concatenation (dense connections).

    Args:
      xs: activations (B, H, W, C_i).
      splits: survivor count of each input after rejuvenation; the result is then laid out
        [survivors of every input, new channels of every input] so that the consumer sees the
        [survivors, new] layout. None before rejuvenation.
    """
    if splits is None:
        y = jnp.concatenate(xs, axis=-1)
    else:
        old = [x[..., :k] for x, k in zip(xs, splits, strict=True)]
        new = [x[..., k:] for x, k in zip(xs, splits, strict=True)]
        y = jnp.concatenate(old + new, axis=-1)
    tracker = tracing.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<concat>") for x in xs]
        tracker.tag(y, tracing.concat_sources(sources, splits))
    return y
