"""The sparsity pressures, as optax transforms: L1 on BN scales (method.md 1.4), group lasso.

`l1_bn_scales(graph, lam)` adds `lam * sign(γ)` to the gradient of every non-fixed unit's BN
scale. It goes first in the chain, before weight decay and momentum, as in the official `nr.SGD`:

    tx = optax.chain(nr_jax.l1_bn_scales(graph, 1.5e-4),
                     optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9))

λ lives in the optimiser state (`L1State.lam`), so changing it (the adaptive controller, λ = 0
after rejuvenation) never retraces; `set_lambda` / `get_lambda` find it in any optax state. The
transform depends only on the graph's structure (which units are prunable), never on widths, so
the same `tx` serves before and after rejuvenation. The L1 term reads the scale of any
normalisation (BatchNorm, GroupNorm, LayerNorm: `ChannelGraph.l1_scale_paths`).

For units without a scale, `group_lasso(graph, lam)` is the pressure (issue 16): λ times the
L2 norm of each channel's outgoing weights (`nr_jax.outgoing`), whose gradient λ·w/‖w‖ shrinks
a channel's whole group of weights at once; the "outgoing" liveness criterion reads the result.
It depends on the graph's structure only, too.
It keeps its λ in the same `L1State`, so `set_lambda`, `get_lambda` and the λ controllers work
unchanged. `resolve(name, graph, lam)` picks a pressure by name ("l1", "group_lasso", "none").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nr_jax.graph import INPUT, ChannelGraph


class L1State(NamedTuple):
    """State of the pressures (`l1_bn_scales`, `group_lasso`, `resolve`'s "none"): the current
    sparsity coefficient λ (float32 scalar)."""

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


def group_lasso(graph: ChannelGraph, lam: float = 1e-4) -> optax.GradientTransformation:
    """Group lasso on the prunable channels' outgoing weights: λ Σ ‖W[..., i, :]‖₂.

    One group per consumer kernel row i that reads a channel of a non-fixed unit (a residual
    stream's channel when every unit summed into it is prunable; never the image). For a
    channel read by one consumer, as in every chain (VGG, `cnn_nobn_fmnist`, the MLP), that is
    all of its outgoing weights; a channel read by several consumers (DenseNet's
    concatenations) has a group in each and is dead when all of them are (the "outgoing"
    criterion reads their combined norm). The gradient of the penalty, λ·W_i/‖W_i‖ (0 for an
    exactly zero row), is added to the row's gradient: it moves the whole group toward zero, by
    λ·lr per plain SGD step, without turning it. Goes first in the chain, like `l1_bn_scales`.

    Which rows of a consumer are pressed is all or none in every registered family (it reads
    only prunable units, or the image or fixed units): that does not depend on widths, so the
    same `tx` serves after rejuvenation (and after a merge). A consumer that reads both kinds is
    pressed by the graph's row offsets and then refuses other widths.

    Args:
      graph: the model's channel graph; only its structure is used.
      lam: initial λ (>= 0), in `L1State` (`set_lambda`).

    Returns:
      An optax transformation; `update(updates, state, params)` needs the params.
    """
    if lam < 0:
        raise ValueError(f"group_lasso: lam must be >= 0, got {lam}")
    prunable = {u.name for u in graph.prunable}
    consumers = {}  # "/"-joined kernel path -> (unit, the pressed flag of each input segment)
    for v in graph.all_units:
        flags = tuple(INPUT not in p and p <= prunable for p, _, _ in v.inputs)
        if any(flags):
            consumers[f"{v.name}/kernel"] = (v, flags)

    def init(params: Any) -> L1State:
        del params
        return L1State(lam=jnp.asarray(lam, jnp.float32))

    def pressure(w: Any, unit: Any, flags: tuple[bool, ...]) -> Any:
        """λ W_i / ‖W_i‖ on the pressed rows i of kernel `w` (..., D_in, D_out)."""
        w = w.astype(jnp.float32)
        axes = tuple(i for i in range(w.ndim) if i != w.ndim - 2)
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
        if not all(flags):
            if w.shape[-2] != unit.in_channels:
                raise ValueError(
                    f"group_lasso: unit {unit.name} reads pressed and unpressed channels and "
                    f"its kernel has {w.shape[-2]} input rows, the graph {unit.in_channels}: "
                    "build the group lasso for the current graph"
                )
            segments = zip(flags, unit.inputs, strict=True)
            rows = jnp.concatenate(
                [jnp.full((b - a,), f, jnp.float32) for f, (_, a, b) in segments]
            )
            inverse = inverse * rows.reshape((1,) * (w.ndim - 2) + (-1, 1))
        return w * inverse

    def update(updates: Any, state: L1State, params: Any = None) -> tuple[Any, L1State]:
        if params is None:
            raise ValueError("group_lasso needs params: call tx.update(grads, state, params)")

        def add(path: tuple, g: Any, w: Any) -> Any:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            if name not in consumers:
                return g
            return g + (state.lam * pressure(w, *consumers[name])).astype(g.dtype)

        return jax.tree_util.tree_map_with_path(add, updates, params), state

    return optax.GradientTransformation(init, update)


def no_pressure(lam: float = 0.0) -> optax.GradientTransformation:
    """No pressure (gradients unchanged), with an `L1State` so that λ can still be set and read:
    the search then waits for the dormancy that arises in ordinary training."""

    def init(params: Any) -> L1State:
        del params
        return L1State(lam=jnp.asarray(lam, jnp.float32))

    def update(updates: Any, state: L1State, params: Any = None) -> tuple[Any, L1State]:
        del params
        return updates, state

    return optax.GradientTransformation(init, update)


PRESSURES = ("l1", "group_lasso", "none")


def resolve(name: str, graph: ChannelGraph, lam: float) -> optax.GradientTransformation:
    """The pressure called `name`: "l1" (`l1_bn_scales`, on any normalisation scale),
    "group_lasso" (`group_lasso`) or "none" (`no_pressure`).

    Raises:
      ConfigError: `name` is no known pressure (the one-line message of `nr_jax.config`).
    """
    if name == "l1":
        return l1_bn_scales(graph, lam)
    if name == "group_lasso":
        return group_lasso(graph, lam)
    if name == "none":
        return no_pressure(lam)
    from nr_jax.config import refuse  # here: `import nr_jax` does not load the config

    refuse("nr.pressure", name, f"one of {list(PRESSURES)}")
    raise AssertionError  # refuse raises


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
