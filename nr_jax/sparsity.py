"""The L1 pressure on BN scales, as an optax transform (method.md 1.4).

`l1_bn_scales(graph, lam)` adds `lam * sign(γ)` to the gradient of every non-fixed unit's BN
scale. It goes first in the chain, before weight decay and momentum, as in the official `nr.SGD`:

    tx = optax.chain(nr_jax.l1_bn_scales(graph, 1.5e-4),
                     optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9))

λ lives in the optimiser state (`L1State.lam`), so changing it (the adaptive controller, λ = 0
after rejuvenation) never retraces; `set_lambda` / `get_lambda` find it in any optax state. The
transform depends only on the graph's structure (which units are prunable), never on widths, so
the same `tx` serves before and after rejuvenation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nr_jax.graph import ChannelGraph


class L1State(NamedTuple):
    """State of `l1_bn_scales`: the current sparsity coefficient λ (float32 scalar)."""

    lam: jax.Array


def l1_bn_scales(graph: ChannelGraph, lam: float = 1e-4) -> optax.GradientTransformation:
    """L1 sparsity on the BN scales γ of the prunable units.

    Args:
      graph: the model's channel graph; only its structure (unit names, fixed flags) is used.
      lam: initial λ (>= 0). Change it later with `set_lambda`.

    Returns:
      An optax transformation; `update(updates, state, params)` needs the params (for sign(γ)).
    """
    if lam < 0:
        raise ValueError(f"l1_bn_scales: lam must be >= 0, got {lam}")
    paths = {"/".join(p) for p in graph.l1_scale_paths()}  # unit names are "/"-joined paths

    def init(params: Any) -> L1State:
        del params  # accepts placeholders (optax.tree_map_params)
        return L1State(lam=jnp.asarray(lam, jnp.float32))

    def update(updates: Any, state: L1State, params: Any = None) -> tuple[Any, L1State]:
        if params is None:
            raise ValueError("l1_bn_scales needs params: call tx.update(grads, state, params)")

        def add(path: tuple, g: Any, p: Any) -> Any:
            if jax.tree_util.keystr(path, simple=True, separator="/") in paths:
                return g + (state.lam * jnp.sign(p)).astype(g.dtype)
            return g

        return jax.tree_util.tree_map_with_path(add, updates, params), state

    return optax.GradientTransformation(init, update)


def _is_l1(x: Any) -> bool:
    return isinstance(x, L1State)


def set_lambda(opt_state: Any, lam: float | jax.Array) -> Any:
    """Returns `opt_state` with every `L1State.lam` set to `lam` (pure)."""
    found = []

    def replace(x: Any) -> Any:
        if _is_l1(x):
            found.append(x)
            return L1State(lam=jnp.asarray(lam, jnp.float32))
        return x

    new = jax.tree.map(replace, opt_state, is_leaf=_is_l1)
    if not found:
        raise ValueError("set_lambda: the optimiser state has no l1_bn_scales state")
    return new


def get_lambda(opt_state: Any) -> jax.Array:
    """The λ of the (first) `L1State` in `opt_state`."""
    states = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_l1) if _is_l1(x)]
    if not states:
        raise ValueError("get_lambda: the optimiser state has no l1_bn_scales state")
    return states[0].lam


def adapt_lambda(
    lam: float | jax.Array,
    previous: float | jax.Array,
    current: float | jax.Array,
    *,
    step: float | jax.Array = 5e-5,
    threshold: float | jax.Array = 0.01,
) -> float | jax.Array:
    """The official ImageNet controller (method.md 1.2): λ += step when U fell by < threshold.

    Python floats in, a float out; arrays in, an array out (no branch on values: jit-able).
    """
    return lam + step * (previous - current < threshold)
