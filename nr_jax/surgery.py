"""Rejuvenation: a pure host-side function from old trees to new trees (method.md sections 3-4).

`apply_plan(key, plan, model, variables, opt_state, tx, graph)` carries out a `nr_jax.plan`:
it drops the dead channels, widens every unit to its planned width, reinitialises the new
channels and returns a new model (same class, new static widths), new variables, a new optimiser
state (survivors' moments carried over, new slots zero, counters kept), the new graph and a
report. `rejuvenate` computes the liveness, plans, then applies. Nothing is mutated. Surgery is
plain numpy; new weights are drawn on the host, seeded from `key`, so it is deterministic and
compiles nothing.

Layout after rejuvenation: every channel axis is [survivors (original order), new]; for a unit
whose input is a concatenation, [survivors of every input, new channels of every input].
Conv and dense units (`nr_jax.layers.NRDense`) are handled alike, with any normalisation: every
per-channel leaf of a unit (BN, GroupNorm / LayerNorm, or the bias of a unit without one) follows
its output channels; a GroupNorm / LayerNorm unit's new channels form groups of their own
(`nr_jax.norms.regroup`), so they do not change the survivors' statistics.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from nr_jax import planning
from nr_jax.allocation import Allocation
from nr_jax.derived import derived_graph, derived_widths
from nr_jax.graph import ChannelGraph, channel_graph
from nr_jax.hostmem import gc_paused
from nr_jax.layers import MASKS, WidthSpec
from nr_jax.live import Liveness, count, liveness
from nr_jax.optstate import Axis, carry, remap_opt_state
from nr_jax.planning import Plan
from nr_jax.report import Rejuvenation, RejuvenationReport

__all__ = ["Rejuvenation", "RejuvenationReport", "apply_plan", "host_rng", "rejuvenate"]


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded from a JAX PRNG key (typed or raw uint32)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def _host(variables: Any) -> dict:
    """Nested plain dicts of numpy arrays, checked for the collections surgery needs."""
    tree = (
        flax.core.unfreeze(variables) if isinstance(variables, flax.core.FrozenDict) else variables
    )
    tree = jax.tree.map(np.asarray, tree)
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError("variables lack the 'params' collection")
    return tree


def _check_inputs(model: nn.Module, graph: ChannelGraph) -> None:
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph, got {type(graph).__name__}")
    if graph.rejuvenated:
        raise ValueError("this network was already rejuvenated (one rejuvenation per network)")
    if not isinstance(getattr(model, "widths", None), WidthSpec):
        raise TypeError(
            f"{type(model).__name__} needs a `widths: WidthSpec` field to be rejuvenated"
        )


@gc_paused()  # thousands of short-lived objects, no cycles (`nr_jax.hostmem`)
def rejuvenate(
    key: jax.Array,
    model: nn.Module,
    variables: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
    *,
    live: Liveness | None = None,
    resource: str = "params",
    allocation: Allocation | None = None,
    min_width: int = 1,
    new_gamma: float = 0.5,
    threshold: float = 1e-2,
    dead_threshold: float = 1e-3,
    check: bool = False,
) -> Rejuvenation:
    """Drops dead channels, widens survivors by r = sqrt(all/live), reinitialises new channels.

    `liveness`, then `nr_jax.plan`, then `apply_plan` (see both for the details).

    Args:
      key: PRNG key for the new weights (host-side draw, deterministic).
      model: the model; must have a `widths: WidthSpec` field.
      variables: {"params", "batch_stats", "nr_masks"} of `model`.
      opt_state: state of `tx` for `variables["params"]` (None: return None).
      tx: the optimiser; reused unchanged after rejuvenation.
      graph: `channel_graph(model, ...)`.
      live: precomputed liveness (default: `liveness(variables, graph)`).
      resource: "params" or "flops", the budget measure (method.md 2.1, 3.1).
      allocation: the width rule (default `sqrt_allocation`).
      min_width: floor on every unit's width; an all-dead unit keeps this many channels with a
        sticky zero mask (method.md 7.3).
      new_gamma: BN scale of new channels (official 0.5).
      threshold, dead_threshold: liveness thresholds when `live` is None.
      check: also trace the new model and verify that it builds exactly the new graph and the
        new variables' shapes (slower; the tests do it for every model family).

    Returns:
      `Rejuvenation(model, variables, opt_state, graph, report)`.
    """
    _check_inputs(model, graph)
    host = _host(variables)
    if live is None:
        live = liveness(host, graph, threshold=threshold, dead_threshold=dead_threshold)
    the_plan = planning.plan(
        graph, live, resource=resource, allocation=allocation, min_width=min_width
    )
    # the planner's own plan fits the graph: `apply_plan`'s check of a given plan is skipped
    return _apply(key, the_plan, model, host, opt_state, tx, graph, new_gamma, check)


@gc_paused()
def apply_plan(
    key: jax.Array,
    plan: Plan,
    model: nn.Module,
    variables: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
    *,
    new_gamma: float = 0.5,
    check: bool = False,
) -> Rejuvenation:
    """Carries out `plan` (from `nr_jax.plan(graph, ...)`) on the model, variables and state.

    Args: as `rejuvenate`'s; `plan` must have been made for `graph`.

    Returns:
      `Rejuvenation(model, variables, opt_state, graph, report)`; the arrays are jax arrays.
    """
    _check_inputs(model, graph)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a nr_jax.Plan, got {type(plan).__name__}")
    plan.check(graph)
    return _apply(key, plan, model, _host(variables), opt_state, tx, graph, new_gamma, check)


def _apply(
    key: jax.Array,
    plan: Plan,
    model: nn.Module,
    host: dict,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
    new_gamma: float,
    check: bool,
) -> Rejuvenation:
    """`apply_plan` on host variables and a plan known to fit `graph`."""
    new_vars, axes = _new_variables(host, graph, plan, host_rng(key), new_gamma)
    new_model = model.clone(widths=derived_widths(graph, plan))
    new_graph = derived_graph(graph, plan)
    if check:
        traced = channel_graph(new_model, graph.input_shape)
        if traced != new_graph:
            raise ValueError(
                f"rejuvenate: {type(model).__name__} does not build the widths it was given "
                "(its units must take their widths from `self.widths` via nr_jax.layers)"
            )
        _check_shapes(new_vars, traced.variable_shapes)
    state = None
    if opt_state is not None:
        state = remap_opt_state(tx, opt_state, host["params"], new_vars["params"], axes)
    report = RejuvenationReport(
        resource=plan.resource,
        utilization=plan.utilization,
        r=plan.r,
        widths_before=graph.widths,
        widths_after=new_graph.widths,
        survivors=plan.survivors,
        dead_units=plan.dead_units,
        counts_before=count(graph),
        counts_after=count(new_graph),
    )
    new_vars, state = jax.device_put((new_vars, state))
    return Rejuvenation(new_model, new_vars, state, new_graph, report)


# the value of a new channel in a unit's per-channel leaves, by leaf name (others: 0)
CHANNEL_FILL = {"var": 1.0}


def _new_variables(
    host: dict, graph: ChannelGraph, plan: Plan, rng: np.random.Generator, new_gamma: float
) -> tuple[dict, dict]:
    """The new variables (numpy) and the axis plan of every parameter leaf that changes.

    Only the weights that stay random are drawn, unit by unit in graph order (one key, one
    result): a unit's new inputs -> new outputs (all inputs -> new outputs when it has no new
    inputs), He normal with the new fan-out; the classifier's new inputs, N(0, 0.01). New
    inputs never reach old outputs and, where the unit has new inputs, old inputs never reach
    new outputs (zero blocks: the survivors stay exact, the cross connections removed). Every
    other leaf of a unit is per output channel (normalisation scale and bias, running
    statistics, the bias of a unit without normalisation): new channels get scale `new_gamma`,
    running variance 1, everything else 0.
    """
    flat = traverse_util.flatten_dict(host, keep_empty_nodes=True)
    per_unit: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for key in flat:  # the per-channel leaves of every unit, by unit path
        for n in range(2, len(key)):
            if key[0] != MASKS and key[-1] != "kernel":
                per_unit.setdefault(key[1:n], []).append(key)
    new: dict[tuple[str, ...], Any] = {}
    axes: dict[tuple[str, ...], tuple[Axis | None, ...]] = {}
    for u in graph.all_units:
        p = plan[u.name]
        ax_in, l_in = Axis(p.d_in, np.asarray(p.in_src, np.intp)), len(p.in_src)
        path = (*u.path, "kernel")
        if u.kind == "classifier":
            axes[path] = (ax_in, None)
            new[("params", *path)] = k = carry(flat[("params", *path)], axes[path])
            if l_in < p.d_in:
                values = rng.standard_normal((p.d_in - l_in, k.shape[1]), dtype=np.float32)
                values *= np.float32(0.01)
                k[l_in:] = values
            continue
        ax_out, l_out = Axis(p.d_out, np.asarray(p.out_src, np.intp)), len(p.out_src)
        old_k = flat[("params", *path)]
        axes[path] = (None,) * (old_k.ndim - 2) + (ax_in, ax_out)
        new[("params", *path)] = k = carry(old_k, axes[path])
        *taps, d_in, d_out = k.shape
        if l_out < d_out:
            first = l_in if l_in < d_in else 0
            values = rng.standard_normal((*taps, d_in - first, d_out - l_out), np.float32)
            fan_out = math.prod(taps) * d_out
            values *= np.float32(math.sqrt(2.0 / fan_out))  # He, the new fan-out
            k[..., first:, l_out:] = values
        for key in per_unit.get(u.path, ()):
            fill = new_gamma if key[-1] == "scale" else CHANNEL_FILL.get(key[-1], 0.0)
            new[key] = carry(flat[key], (ax_out,), fill)
            if key[0] == "params":
                axes[key[1:]] = (ax_out,)
        if MASKS in host:
            new[(MASKS, *u.path, "mask")] = np.full((p.d_out,), 0.0 if p.dead else 1.0, np.float32)
    # leaves taken over unchanged are copied, as the caller may still own them
    copied = {k: new[k] if k in new else np.array(v) for k, v in flat.items()}
    return traverse_util.unflatten_dict({**copied, **new}), axes


def _check_shapes(new_vars: Any, expected: Any) -> None:
    got = jax.tree_util.tree_flatten_with_path(new_vars)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, leaf in got:
        if path in want and tuple(leaf.shape) != tuple(want[path].shape):
            raise ValueError(
                f"rejuvenate: {jax.tree_util.keystr(path)} has shape {leaf.shape}, the new model "
                f"expects {want[path].shape}; this model's units are not all nr_jax.layers units"
            )
    if len(got) != len(want):
        raise ValueError("rejuvenate: the new model's variables differ from the rejuvenated ones")
