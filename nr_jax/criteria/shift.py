"""What dropping the dead channels does to the survivors' outputs: `survivor_shift`.

Under BatchNorm or without normalisation nothing (up to float rounding); under GroupNorm or
LayerNorm what the dead channels contributed to their groups' statistics.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util

from nr_jax.criteria.dormancy import unit_outputs
from nr_jax.graph import ChannelGraph
from nr_jax.layers import MASKS
from nr_jax.live import Liveness

__all__ = ["SurvivorShift", "survivor_shift"]

Array = jax.Array


class SurvivorShift(NamedTuple):
    """How much the survivors' outputs change when the dead channels are dropped.

    Attributes:
      units: unit name -> max |Δ| over the batch of its survivors' outputs (the change of the
        unit and of everything upstream of it).
      scale: unit name -> max |output| of its survivors before (to read `units` relatively).
      logits: max |Δ| of the evaluation logits. logits_scale: max |logits| before.
    """

    units: dict[str, float]
    scale: dict[str, float]
    logits: float
    logits_scale: float

    @property
    def relative(self) -> dict[str, float]:
        """units[n] / scale[n] per unit, and "logits"."""
        rel = {n: self.units[n] / max(self.scale[n], 1e-30) for n in self.units}
        rel["logits"] = self.logits / max(self.logits_scale, 1e-30)
        return rel


def survivor_shift(
    model: nn.Module, variables: Any, graph: ChannelGraph, x: Array, live: Liveness
) -> SurvivorShift:
    """Drops the dead channels (no widening) and measures the survivors' change on batch `x`.

    The reference is the network as it is with its dead channels' outputs masked to zero (what
    the survivors compute while the dead channels contribute nothing downstream); the pruned
    network keeps exactly the survivors, in their old GroupNorm / LayerNorm groups. Under
    BatchNorm or without normalisation the change is zero up to float rounding; under GroupNorm
    or LayerNorm it is what the dead channels contributed to their groups' statistics.

    Args:
      model, variables, graph: the network before rejuvenation.
      x: a batch of inputs.
      live: its liveness (any criterion).

    Returns:
      The `SurvivorShift` (python floats).
    """
    from nr_jax.slimming import keep_allocation  # here: slimming imports the surgery
    from nr_jax.surgery import rejuvenate

    host = jax.tree.map(np.asarray, jax.device_get(variables))
    live = jax.tree.map(np.asarray, live)
    kept = {}  # the outputs the surgery keeps: a residual stream keeps its tie's (planning.py)
    for u in graph.units:
        tie = sorted(graph.ties[u.tie]) if u.tie is not None else [u.name]
        kept[u.name] = np.any([live.out[n] for n in tie], axis=0)
    flat = traverse_util.flatten_dict(host)
    for u in graph.units:
        path = (MASKS, *u.path, "mask")
        flat[path] = flat[path] * kept[u.name].astype(flat[path].dtype)
    masked = traverse_util.unflatten_dict(flat)
    args = (jax.random.key(0), model, host, None, optax.identity(), graph)
    res = rejuvenate(*args, live=live, allocation=keep_allocation)
    before, outs_before = unit_outputs(model, masked, x)
    after, outs_after = unit_outputs(res.model, res.variables, x)
    units, scale = {}, {}
    for u in graph.units:
        keep = np.flatnonzero(kept[u.name])
        old = np.asarray(outs_before[u.name])[..., keep]
        new = np.asarray(outs_after[u.name])[..., : len(keep)]
        units[u.name] = float(np.max(np.abs(new - old), initial=0.0))
        scale[u.name] = float(np.max(np.abs(old), initial=0.0))
    before = np.asarray(before if before.ndim == 2 else before.sum(1))
    after = np.asarray(after if after.ndim == 2 else after.sum(1))
    return SurvivorShift(
        units, scale, float(np.max(np.abs(after - before))), float(np.max(np.abs(before)))
    )
