"""ReDo's dormancy criterion (Sokar et al., ICML 2023) and the unit activations it reads.

`Dormancy` needs `activity`: every unit's mean |activation| per output channel over a batch,
from `activity(model, variables, x)` or, inside a jitted step, `activity_of` on the
intermediates captured with `is_unit_call`. `unit_outputs` gives every unit's output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from nr_jax.graph import ChannelGraph
from nr_jax.layers import NRConv, NRDense
from nr_jax.live import Liveness, array_module, propagate

__all__ = ["Dormancy", "activity", "activity_of", "is_unit_call", "unit_outputs"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Dormancy:
    """ReDo's τ-dormancy: s_c = a_c / mean_c' a_c' with a = mean |activation| over a batch.

    A channel is live iff s_c > τ; a unit is all-dead when its mean activity is 0 or every
    channel is dormant. ReDo uses τ in {0, 0.025, 0.1} (τ = 0: only neurons that never fire).
    """

    tau: float = 0.1
    needs_activity: ClassVar[bool] = True

    def __call__(
        self, variables: Any, graph: ChannelGraph, activity: Mapping[str, Array] | None = None
    ) -> Liveness:
        if activity is None:
            raise ValueError(
                "the dormancy criterion needs `activity` (nr_jax.criteria.activity(model, "
                "variables, batch))"
            )
        xp = array_module(dict(activity))
        own, dead = {}, {}
        for u in graph.units:
            if u.name not in activity or activity[u.name].shape != (u.out_channels,):
                got = activity[u.name].shape if u.name in activity else "nothing"
                raise ValueError(
                    f"activity of unit {u.name}: expected shape ({u.out_channels},), got {got}"
                )
            a = xp.asarray(activity[u.name], xp.float32)
            mean = xp.mean(a)
            score = a / xp.where(mean > 0, mean, 1.0)
            own[u.name] = (score > self.tau) & (mean > 0)
            dead[u.name] = ~xp.any(own[u.name])
        return propagate(variables, graph, own, dead)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def is_unit_call(module: nn.Module, method: str) -> bool:
    """`capture_intermediates` filter: the outputs of every `NRConv` / `NRDense` call."""
    return isinstance(module, (NRConv, NRDense)) and method == "__call__"


def activity_of(intermediates: Any) -> dict[str, Array]:
    """Mean |activation| per output channel of every unit, from captured intermediates.

    Args:
      intermediates: the "intermediates" collection of `model.apply(...,
        capture_intermediates=is_unit_call, mutable=["intermediates"])`.

    Returns:
      unit name -> (D_out,), the mean over the batch and every position of |unit output|.
    """
    flat = traverse_util.flatten_dict(dict(intermediates))
    return {"/".join(path[:-1]): _mean_abs(value[0]) for path, value in flat.items()}


@functools.partial(jax.jit, static_argnums=0)
def unit_outputs(model: nn.Module, variables: Any, x: Array) -> tuple[Array, dict[str, Array]]:
    """The model's output and every unit's output (eval mode), e.g. to compare survivors.

    Jitted, the model static (one compile per width configuration and input shape).
    """
    out, state = model.apply(
        variables, x, train=False, capture_intermediates=is_unit_call, mutable=["intermediates"]
    )
    flat = traverse_util.flatten_dict(dict(state["intermediates"]))
    return out, {"/".join(path[:-1]): value[0] for path, value in flat.items()}


def activity(model: nn.Module, variables: Any, x: Array) -> dict[str, Array]:
    """Every unit's mean |activation| per output channel over the batch `x` (eval mode)."""
    _, outs = unit_outputs(model, variables, x)
    return {n: _mean_abs(y) for n, y in outs.items()}


def _mean_abs(y: Array) -> Array:
    return jnp.mean(jnp.abs(y.astype(jnp.float32)), axis=tuple(range(y.ndim - 1)))
