"""BN-scale liveness, resource utilisation and parameter counters (method.md section 2).

`liveness` and `utilization` are pure jnp functions of the variables and the (static) channel
graph: they run eagerly or inside a jitted train step and never retrace when values change.
`from_scores` (the relative rule on any per-channel score) and `propagate` (fixed units, sticky
masks, residual ties, live inputs) are the shared steps the other liveness criteria of
`nr_jax.criteria` build on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nr_jax.graph import INPUT, ChannelGraph, Segment, Unit
from nr_jax.layers import MASKS

Array = jax.Array
RESOURCES = ("params", "flops")


class Liveness(NamedTuple):
    """Live channels of every unit.

    Attributes:
      out: unit name -> bool (D_out,), live output channels (all False for an all-dead unit).
      inp: unit name -> bool (D_in,), live input channels (classifier included).
      dead: unit name -> bool scalar, the unit is all-dead (method.md 2.1).
    """

    out: dict[str, Array]
    inp: dict[str, Array]
    dead: dict[str, Array]


class Utilization(NamedTuple):
    """Utilisation U = live / total of the chosen resource, with both resources' counts.

    Counts are conv weights (`params`) or conv multiply-accumulates (`flops`), method.md 2.1.
    """

    ratio: Array
    live: Array
    total: Array
    params_live: Array
    params_total: Array
    flops_live: Array
    flops_total: Array


def collection(variables: Any, name: str, required: bool = True) -> dict[tuple[str, ...], Any]:
    """One collection of the variables keyed by path (`flax.traverse_util.flatten_dict`)."""
    if not isinstance(variables, Mapping) or name not in variables:
        if not required:
            return {}
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"variables have no {name!r} collection, got {got}")
    return traverse_util.flatten_dict(variables[name])


def array_module(tree: Any) -> Any:
    """numpy for trees of host arrays (no compilation, used by the host-side surgery), else jnp."""
    leaves = jax.tree.leaves(tree)
    return jnp if any(isinstance(x, jax.Array) for x in leaves) else np


def _gamma(params: dict[tuple[str, ...], Any], unit: Unit, xp: Any) -> Array:
    if unit.norm != "batch":
        raise ValueError(
            f"unit {unit.name} has no BatchNorm (norm={unit.norm!r}): the BN-scale rule cannot "
            "read its liveness; use another criterion, nr_jax.criteria.resolve('norm' | "
            "'outgoing' | 'dormancy')"
        )
    path = (*unit.path, "bn", "scale")
    if path not in params:
        raise ValueError(
            f"variables have no BN scale at {'/'.join(path)}; were they made by another model?"
        )
    g = params[path]
    if g.shape != (unit.out_channels,):
        raise ValueError(
            f"BN scale of unit {unit.name} has shape {g.shape}, the graph expects "
            f"({unit.out_channels},): variables and graph come from different widths"
        )
    return xp.abs(g.astype(xp.float32))


def _segment_mask(seg: Segment, out: dict[str, Array], xp: Any) -> Array:
    producers, start, stop = seg
    if INPUT in producers:
        return xp.ones((stop - start,), bool)
    masks = [out[p][start:stop] for p in sorted(producers)]
    return xp.any(xp.stack(masks), axis=0)


def liveness(
    variables: Any,
    graph: ChannelGraph,
    *,
    threshold: float = 1e-2,
    dead_threshold: float = 1e-3,
) -> Liveness:
    """Live channels from |γ| (method.md 2.1), propagated through the graph.

    A channel is live when |γ_c| >= `threshold` * max_c' |γ_c'| in its unit. A unit is all-dead
    when max |γ| < `dead_threshold`, when none of its inputs is live, or when its channel mask is
    zero (the sticky all-dead mark). Fixed units keep every output live. Units tied by a residual
    sum share one output mask: a channel of the stream is live when it is live in any tied unit
    (fixed units make the whole stream live, the official rule).

    This is the default criterion of `nr_jax.criteria` ("bn"); every unit must have BatchNorm.

    Args:
      variables: the model's variables ({"params", "batch_stats", "nr_masks"}); only "params"
        (BN scales) and "nr_masks" are read.
      graph: the model's `ChannelGraph`.
      threshold: relative liveness threshold (official 1e-2).
      dead_threshold: absolute all-dead threshold on max |γ| (official 1e-3).

    Returns:
      `Liveness` of jnp arrays, or of numpy arrays when every leaf of `variables` is a numpy
      array (the host-side path, which compiles nothing).
    """
    params = collection(variables, "params")
    xp = array_module((params, collection(variables, MASKS, required=False)))
    scores = {u.name: _gamma(params, u, xp) for u in graph.units}
    return from_scores(variables, graph, scores, threshold=threshold, dead_threshold=dead_threshold)


def from_scores(
    variables: Any,
    graph: ChannelGraph,
    scores: Mapping[str, Array],
    *,
    threshold: float = 1e-2,
    dead_threshold: float = 1e-3,
) -> Liveness:
    """The official relative rule (method.md 2.1) on any per-channel score, propagated.

    A channel is live when score_c >= `threshold` * max score of its unit; a unit is all-dead
    when its max score < `dead_threshold`. The scores are |γ| for `liveness`; a GroupNorm /
    LayerNorm scale or the norm of a channel's outgoing weights for other criteria
    (`nr_jax.criteria`).

    Args:
      variables: the model's variables; only "nr_masks" is read here (`propagate`).
      graph: the model's `ChannelGraph`.
      scores: unit name -> non-negative score per output channel, shape (D_out,).
      threshold, dead_threshold: as in `liveness`.
    """
    xp = array_module((collection(variables, MASKS, required=False), dict(scores)))
    own, dead = {}, {}
    for u in graph.units:
        s = scores[u.name]
        smax = xp.max(s)
        own[u.name], dead[u.name] = s >= threshold * smax, smax < dead_threshold
    return propagate(variables, graph, own, dead)


def propagate(
    variables: Any,
    graph: ChannelGraph,
    own: Mapping[str, Array],
    dead: Mapping[str, Array],
) -> Liveness:
    """A `Liveness` from every unit's own verdict, through the graph (method.md 2.1-2.2).

    Fixed units keep every output live; a unit whose channel mask is zero (the sticky all-dead
    mark) or none of whose inputs is live is all-dead; units tied by a residual sum share one
    output mask (a stream channel is live when it is live in a tied unit that is not dead).

    Args:
      variables: the model's variables; only "nr_masks" is read (it may be absent).
      graph: the model's `ChannelGraph`.
      own: unit name -> bool (D_out,), the channels the criterion finds live.
      dead: unit name -> bool scalar, the criterion finds the whole unit dead.
    """
    masks = collection(variables, MASKS, required=False)
    xp = array_module((masks, dict(own), dict(dead)))
    unit_live, unit_dead = {}, {}
    for u in graph.units:
        unit_dead[u.name] = dead[u.name]
        if (*u.path, "mask") in masks:
            unit_dead[u.name] = unit_dead[u.name] | (xp.max(masks[(*u.path, "mask")]) == 0)
        unit_live[u.name] = xp.ones((u.out_channels,), bool) if u.fixed else own[u.name]
    streams = []
    for tie in graph.ties:
        member = [unit_live[n] & ~unit_dead[n] for n in sorted(tie)]
        streams.append(xp.any(xp.stack(member), axis=0))
    out: dict[str, Array] = {}
    inp: dict[str, Array] = {}
    dead_out: dict[str, Array] = {}
    for u in graph.all_units:
        m_in = (
            xp.concatenate([_segment_mask(s, out, xp) for s in u.inputs])
            if u.inputs
            else xp.ones((u.in_channels,), bool)
        )
        inp[u.name] = m_in
        if u.kind != "conv":
            continue
        is_dead = unit_dead[u.name] | ~xp.any(m_in)
        m_out = streams[u.tie] if u.tie is not None else unit_live[u.name]
        out[u.name] = m_out & ~is_dead
        dead_out[u.name] = is_dead
    return Liveness(out, inp, dead_out)


def utilization(live: Liveness, graph: ChannelGraph, resource: str = "params") -> Utilization:
    """Utilisation of the chosen resource (method.md 2.1).

    live_l = sum(m_in) * sum(m_out) * k*k (x H_out*W_out for flops); all_l = D_in*D_out*k*k
    (x H_out*W_out). The classifier, BN and pooling are not counted.
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    xp = array_module(live)
    p_live = p_all = f_live = f_all = xp.float32(0)
    for u in graph.units:
        k2 = u.kernel[0] * u.kernel[1]
        hw = u.out_hw[0] * u.out_hw[1]
        n_in = xp.sum(live.inp[u.name], dtype=xp.float32)
        n_out = xp.sum(live.out[u.name], dtype=xp.float32)
        w_live = n_in * n_out * k2
        p_live, p_all = p_live + w_live, p_all + u.weights
        f_live, f_all = f_live + w_live * hw, f_all + u.macs
    live_r, total_r = (p_live, p_all) if resource == "params" else (f_live, f_all)
    return Utilization(live_r / total_r, live_r, total_r, p_live, p_all, f_live, f_all)


class Counts(NamedTuple):
    """Host-side counters of a graph (python ints).

    Attributes:
      conv: allocated conv (and `NRDense`) weights. bn: the units' per-channel parameters: the
        normalisation's affine γ, β (2 per channel), or the bias of a unit without one (1).
      classifier: classifier weights and bias. total: conv + bn + classifier (method.md 5.3).
      effective: total without the zero cross blocks of removed-cross units (method.md 5.3).
      macs: allocated conv MACs per image. effective_macs: MACs of the blocks actually computed.
    """

    conv: int
    bn: int
    classifier: int
    total: int
    effective: int
    macs: int
    effective_macs: int


def count(graph: ChannelGraph) -> Counts:
    """Parameter and MAC counters of the network described by `graph`."""
    conv = sum(u.weights for u in graph.units)
    eff_conv = sum(u.effective_weights for u in graph.units)
    bn = sum((1 if u.norm is None else 2) * u.out_channels for u in graph.units)
    head = graph.classifier
    cls = head.in_channels * head.out_channels + head.out_channels if head else 0
    macs = sum(u.macs for u in graph.units)
    eff_macs = sum(u.effective_weights * u.out_hw[0] * u.out_hw[1] for u in graph.units)
    return Counts(conv, bn, cls, conv + bn + cls, eff_conv + bn + cls, macs, eff_macs)
