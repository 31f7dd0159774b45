"""Neural rescaling (method.md 4.4), corrected: the function is preserved exactly.

After rejuvenation, survivors whose |γ| is below the target t (new channels start at γ = 0.5) are
brought up to |γ| = t so that old and new neurons start at comparable scales. For a channel with
g = min(|γ|, t):

    γ -> sign(γ) * t,  β -> β * t / g

multiplies the unit's BN output (and, through ReLU, its activation) by t / g; the factor g / t is
folded into exactly the consumers of that channel (every unit, and the classifier, that reads it,
through concatenations), so every pre-BN activation downstream is unchanged, in eval and train
mode, under both schemes. The same holds for a GroupNorm / LayerNorm scale (its normalised
output does not depend on γ); units without normalisation have no scale and pass factor 1, as do
fixed units and units tied to a residual stream, which are not rescaled (the official code
multiplies their consumers by a uniform 1/t, which leaves running statistics stale, and leaves
the logits scaled by t; its DenseNet folding is misaligned: all fixed here).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np
from flax import traverse_util

from nr_jax.graph import INPUT, ChannelGraph


def _host_params(variables: Any) -> dict[tuple[str, ...], np.ndarray]:
    """The parameters as numpy arrays, keyed by path (`flax.traverse_util.flatten_dict`)."""
    params = jax.device_get(flax.core.unfreeze(variables)["params"])
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, params))


def channel_factors(variables: Any, graph: ChannelGraph, target: float) -> dict[str, np.ndarray]:
    """Per-unit output factor g / t (1 for fixed, tied and |γ| >= t channels)."""
    params = _host_params(variables)
    factors = {}
    for u in graph.units:
        if u.fixed or u.tie is not None or u.scale_path is None:
            factors[u.name] = np.ones((u.out_channels,), np.float32)
            continue
        gamma = np.asarray(params[u.scale_path], np.float32)
        g = np.minimum(np.abs(gamma), target)
        factors[u.name] = np.where(g > 0, g / target, 1.0).astype(np.float32)
    return factors


def _input_factor(unit: Any, factors: dict[str, np.ndarray]) -> np.ndarray:
    parts = []
    for producers, start, stop in unit.inputs:
        if INPUT in producers or len(producers) > 1:
            parts.append(np.ones(stop - start, np.float32))  # image, or a residual stream
        else:
            (p,) = producers
            parts.append(factors[p][start:stop])
    return np.concatenate(parts) if parts else np.ones(unit.in_channels, np.float32)


def rescale(variables: Any, graph: ChannelGraph, target: float = 0.5) -> dict[str, Any]:
    """Neural rescaling as a pure function over the variables.

    Args:
      variables: {"params", "batch_stats", "nr_masks"} of a (typically rejuvenated) model.
      graph: its channel graph.
      target: t > 0; survivors with |γ| < t are brought to |γ| = t (official 0.5).

    Returns:
      New variables (numpy leaves) computing the same function.
    """
    if not target > 0:
        raise ValueError(f"rescale: target must be > 0, got {target}")
    host = jax.tree.map(np.asarray, jax.device_get(flax.core.unfreeze(variables)))
    params = _host_params(host)
    new = dict(params)  # leaves replaced below
    factors = channel_factors(host, graph, target)
    for u in graph.all_units:
        f_in = _input_factor(u, factors)
        kernel = params[(*u.path, "kernel")]
        shape = (1,) * (kernel.ndim - 2) + (-1, 1)
        new[(*u.path, "kernel")] = kernel * f_in.reshape(shape).astype(kernel.dtype)
        if u.kind != "conv" or u.fixed or u.tie is not None or u.scale_path is None:
            continue
        f, up = factors[u.name], factors[u.name] < 1.0
        bias_path = (*u.scale_path[:-1], "bias")
        gamma, beta = params[u.scale_path], params[bias_path]
        new[u.scale_path] = np.where(up, np.sign(gamma) * target, gamma)
        new[bias_path] = np.where(up, beta / f, beta).astype(beta.dtype)
    return {**host, "params": traverse_util.unflatten_dict(new)}
