"""The NR outer step on the host, between two compiled phases (method.md 1.3).

After a search epoch: the liveness by the run's criterion (`nr_jax.run_liveness`, computed once
and handed to the surgery), the utilisation of the live network, the masks of all-dead units set
to zero (sticky), the pure decision `nr_jax.controller.decide`, its λ written into the optimiser
state, and, when it says so, the rejuvenation with the run's width rule (and neural rescaling,
method.md 4.4, for BatchNorm networks only: `nr_jax.run_liveness.run_criterion` refuses it
otherwise). Every function here is pure: it takes a `TrainState` (and the model, graph and
`tx` of its width configuration) and returns new values; the trainer swaps in the new jitted steps.
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nr_jax.allocation import Allocation
from nr_jax.allocation import resolve as resolve_allocation
from nr_jax.controller import REJUVENATE, SEARCH, decide, end_of_cycle
from nr_jax.criteria import Criterion
from nr_jax.graph import ChannelGraph
from nr_jax.layers import MASKS
from nr_jax.live import Liveness, utilization
from nr_jax.merging import Merged, merge
from nr_jax.run_liveness import measure, run_criterion
from nr_jax.slimming import prune
from nr_jax.sparsity import get_lambda, set_lambda
from nr_jax.steps import TrainState
from nr_jax.surgery import Rejuvenation, rejuvenate

log = logging.getLogger("nr_jax")


def allocation_name(config: ml_collections.ConfigDict) -> str:
    """The width rule in force: `nr.allocation`, or for "auto" the preset's choice."""
    if config.nr.allocation != "auto":
        return config.nr.allocation
    return "round8" if config.preset == "improved" else "sqrt"


def allocation_rule(config: ml_collections.ConfigDict) -> Allocation:
    """The width rule; rounded rules match the budget in the run's resource (params or flops)."""
    return resolve_allocation(
        allocation_name(config), resource=config.nr.resource, min_width=config.nr.min_width
    )


def sticky_masks(masks: Any, dead: dict[str, Any]) -> Any:
    """Zeroes the mask of every all-dead unit (sticky: a zero mask stays zero)."""
    masks = flax.core.unfreeze(masks) if isinstance(masks, flax.core.FrozenDict) else masks
    flat = flax.traverse_util.flatten_dict(masks)
    for name, is_dead in dead.items():
        if bool(is_dead):
            path = (*name.split("/"), "mask")
            flat[path] = jnp.zeros_like(flat[path])
    return flax.traverse_util.unflatten_dict(flat)


def with_variables(state: TrainState, variables: dict[str, Any], opt_state: Any) -> TrainState:
    """`state` holding the new network's variables and optimiser state (after a surgery);
    `batch_stats` {} when the variables have none (a network without BatchNorm)."""
    return state.replace(
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        masks=variables[MASKS],
        opt_state=opt_state,
    )


def search_epoch_end(
    state: TrainState,
    model: Any,
    graph: ChannelGraph,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    key: jax.Array,
    *,
    criterion: Criterion | None = None,
    images: np.ndarray | None = None,
) -> tuple[TrainState, dict[str, Any], Rejuvenation | None]:
    """The once-per-epoch NR decision and what it asks for (nothing outside the search).

    The liveness is computed once, by `criterion` (default: the run's, `run_criterion`), and the
    surgery takes it. A criterion that needs activity ("dormancy") reads it over `images`, the
    run's fixed activity batch (float32 (N, H, W, C), `nr.activity_images` training images).

    Returns the new state, an event dict (`utilization`, `lam`; `search_timeout`, `rejuvenation`
    (the report), `gammas` (the normalisation scales γ before surgery, of the units that have one)
    when they happen) and the `Rejuvenation` or None.
    """
    nr = config.nr
    if int(state.controller.phase) != SEARCH:
        return state, {}, None
    criterion = run_criterion(config, graph) if criterion is None else criterion
    host = jax.device_get(state.variables)
    live = measure(criterion, host, graph, model, images, config.eval_batch_size)
    util = float(utilization(live, graph, nr.resource).ratio)
    ctrl, action = decide(state.controller, util, get_lambda(state.opt_state), config)
    state = state.replace(
        masks=sticky_masks(state.masks, live.dead),
        opt_state=set_lambda(state.opt_state, action.lam),
        controller=ctrl,
    )
    event: dict[str, Any] = {"utilization": util, "lam": float(action.lam)}
    if bool(action.timed_out):
        log.warning(
            "utilisation %.4f did not reach the target %.3f within %d search epochs: %s",
            *(util, nr.target, nr.max_search_epochs, action.name),
        )
        event["search_timeout"] = True
    if int(action.kind) != REJUVENATE:
        return state, event, None
    state, res = rejuvenate_state(state, model, graph, tx, config, key, live=live)
    flat = flax.traverse_util.flatten_dict(host["params"])
    event["gammas"] = {  # for the |γ| histograms of the run's plots (units without one: none)
        u.name.replace("/", "."): np.asarray(flat[u.scale_path])
        for u in graph.units
        if u.scale_path is not None
    }
    event["rejuvenation"] = res.report
    return state, event, res


def cycle_epoch_end(
    state: TrainState,
    model: Any,
    graph: ChannelGraph,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, Any], Merged | None]:
    """After a rejuvenated epoch: the end of a cycle (`nr.cycles` > 1), when it is due.

    The network is merged back into an ordinary one (`nr_jax.merge`: the function unchanged), λ
    comes back on (`nr.lam`) and the controller searches again. Returns the new state, an event
    dict (`merged`: the cycle that ended) and the `Merged` or None.
    """
    ctrl, due = end_of_cycle(state.controller, state.epoch, config)
    if not bool(due):
        return state, {}, None
    # host copies, as for the rejuvenation: in a multi-process job the arrays span processes
    variables, opt_state = jax.device_get((state.variables, state.opt_state))
    res = merge(model, variables, opt_state, tx, graph)
    v = res.variables
    state = with_variables(state, v, set_lambda(res.opt_state, config.nr.lam)).replace(
        controller=ctrl
    )
    log.info("cycle %d ended: merged into an ordinary network, searching again", int(ctrl.cycle))
    return state, {"merged": int(ctrl.cycle)}, res


def rejuvenate_state(
    state: TrainState,
    model: Any,
    graph: ChannelGraph,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    key: jax.Array,
    *,
    live: Liveness | None = None,
) -> tuple[TrainState, Rejuvenation]:
    """`nr_jax.rejuvenate` with the run's rules, applied to the state (λ kept as it is); with
    `nr.regrow = False` the slimming control instead (`nr_jax.slimming.prune`).

    `live` is the liveness the decision read (default: the run's criterion on the state's
    variables, for criteria without activity); the surgery never recomputes it by the BN rule.
    """
    nr = config.nr
    rules = dict(
        resource=nr.resource,
        min_width=nr.min_width,
        threshold=nr.threshold,
        dead_threshold=nr.dead_threshold,
    )
    # host copies: the surgery is numpy work, and in a multi-process job the state's arrays span
    # other processes' devices (the trainer replicates the new state again)
    host = jax.device_get((state.variables, state.opt_state))
    if live is None:
        live = measure(run_criterion(config, graph), host[0], graph)
    args = (key, model, *host, tx, graph)
    if nr.regrow:
        alloc = allocation_rule(config)
        res = rejuvenate(*args, live=live, allocation=alloc, new_gamma=nr.new_gamma, **rules)
    else:
        res = prune(*args, live=live, **rules)
    v = res.variables
    # official preset: a fresh optimiser (all momentum lost); improved: survivors' moments kept
    opt_state = tx.init(v["params"]) if config.preset == "official" else res.opt_state
    state = with_variables(state, v, set_lambda(opt_state, get_lambda(state.opt_state)))
    return state, res


def rescale_state(
    state: TrainState, graph: ChannelGraph, config: ml_collections.ConfigDict
) -> TrainState:
    """Neural rescaling (method.md 4.4) to `nr.rescale_target`, once (the controller's
    `rescaled` flag); preserves the function. BatchNorm networks only (it moves BN scales and
    statistics): `nr_jax.run_liveness.run_criterion` refuses `nr.rescale_target` for others."""
    if bool(state.controller.rescaled):
        return state
    from nr_jax.rescale import rescale

    new = rescale(state.variables, graph, config.nr.rescale_target)
    log.info("neural rescaling applied (target %g)", config.nr.rescale_target)
    return state.replace(
        params=jax.tree.map(jnp.asarray, new["params"]),
        batch_stats=jax.tree.map(jnp.asarray, new["batch_stats"]),
        controller=state.controller._replace(rescaled=jnp.array(True)),
    )
