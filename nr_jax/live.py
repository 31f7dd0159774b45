"""BN-scale liveness, resource utilisation and parameter counters (method.md section 2).

`liveness` and `utilization` are pure jnp functions of the variables and the (static) channel
graph: they run eagerly or inside a jitted train step and never retrace when values change.
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


def _flat(variables: Any, collection: str, required: bool = True) -> dict[tuple[str, ...], Any]:
    """One collection of the variables keyed by path (`flax.traverse_util.flatten_dict`)."""
    if not isinstance(variables, Mapping) or collection not in variables:
        if not required:
            return {}
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"variables have no {collection!r} collection, got {got}")
    return traverse_util.flatten_dict(variables[collection])


def _xp(tree: Any) -> Any:
    """numpy for trees of host arrays (no compilation, used by the host-side surgery), else jnp."""
    leaves = jax.tree.leaves(tree)
    return jnp if any(isinstance(x, jax.Array) for x in leaves) else np


def _gamma(params: dict[tuple[str, ...], Any], unit: Unit, xp: Any) -> Array:
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
    params, masks = _flat(variables, "params"), _flat(variables, MASKS, required=False)
    xp = _xp((params, masks))
    gamma_live, gamma_dead = {}, {}
    for u in graph.units:
        g = _gamma(params, u, xp)
        gmax = xp.max(g)
        gamma_dead[u.name] = gmax < dead_threshold
        if (*u.path, "mask") in masks:
            gamma_dead[u.name] |= xp.max(masks[(*u.path, "mask")]) == 0
        gamma_live[u.name] = xp.ones_like(g, bool) if u.fixed else g >= threshold * gmax
    streams = []
    for tie in graph.ties:
        member = [gamma_live[n] & ~gamma_dead[n] for n in sorted(tie)]
        streams.append(xp.any(xp.stack(member), axis=0))
    out: dict[str, Array] = {}
    inp: dict[str, Array] = {}
    dead: dict[str, Array] = {}
    for u in graph.all_units:
        m_in = (
            xp.concatenate([_segment_mask(s, out, xp) for s in u.inputs])
            if u.inputs
            else xp.ones((u.in_channels,), bool)
        )
        inp[u.name] = m_in
        if u.kind != "conv":
            continue
        is_dead = gamma_dead[u.name] | ~xp.any(m_in)
        m_out = streams[u.tie] if u.tie is not None else gamma_live[u.name]
        out[u.name] = m_out & ~is_dead
        dead[u.name] = is_dead
    return Liveness(out, inp, dead)


def utilization(live: Liveness, graph: ChannelGraph, resource: str = "params") -> Utilization:
    """Utilisation of the chosen resource (method.md 2.1).

    live_l = sum(m_in) * sum(m_out) * k*k (x H_out*W_out for flops); all_l = D_in*D_out*k*k
    (x H_out*W_out). The classifier, BN and pooling are not counted.
    """
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
    xp = _xp(live)
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
      conv: allocated conv weights. bn: BN affine parameters (2 per channel).
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
    bn = sum(2 * u.out_channels for u in graph.units)
    head = graph.classifier
    cls = head.in_channels * head.out_channels + head.out_channels if head else 0
    macs = sum(u.macs for u in graph.units)
    eff_macs = sum(u.effective_weights * u.out_hw[0] * u.out_hw[1] for u in graph.units)
    return Counts(conv, bn, cls, conv + bn + cls, eff_conv + bn + cls, macs, eff_macs)
