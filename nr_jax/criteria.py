"""Pluggable liveness: criteria that say which channels of every unit are live (issue 16).

A criterion is a callable `criterion(variables, graph, activity=None) -> nr_jax.Liveness`; one
with `needs_activity` True also needs `activity`, every unit's mean |activation| over a batch
(`activity`). All of them end in the same propagation through the channel graph
(`nr_jax.live.propagate`: fixed units, sticky all-dead masks, residual ties, live inputs), so the
plan, the allocation and the surgery never depend on which one was used. All are pure jnp
functions of their inputs (jit-able, no retrace when values change), numpy on numpy inputs.

Built in (`resolve(name)`):

* "bn", `BNScale`: |γ| of BatchNorm with the official relative rule, `nr_jax.liveness`
  (method.md 2.1). The default; every unit must have BatchNorm.
* "norm", `NormScale`: the same rule on the scale of any normalisation (BatchNorm, GroupNorm,
  LayerNorm). GroupNorm and LayerNorm statistics span several channels, so dropping the dead
  channels changes the survivors' outputs: `survivor_shift` measures by how much. After
  rejuvenation the new channels are normalised in groups of their own (`nr_jax.norms.regroup`)
  and do not change the survivors again.
* "outgoing", `Outgoing`: the relative rule on the L2 norm of each channel's outgoing weights
  (`nr_jax.outgoing`), for units without a scale; the matching pressure is the group lasso on
  those weights (`nr_jax.group_lasso`).
* "dormancy", `Dormancy`: ReDo's score (Sokar et al., ICML 2023): a neuron's mean |activation|
  over a batch divided by the mean of its layer; dormant (dead) at or below τ. Needs no pressure:
  it sees the dormancy that arises in ordinary training.

Which goes with which model (`suggest`): BatchNorm networks "bn" (L1 on γ, the official method);
GroupNorm / LayerNorm networks "norm" (L1 on their scales, `nr_jax.l1_bn_scales`); networks
without a scale (`cnn_nobn_fmnist`) "outgoing" under the group lasso; the MLP (`mlp_fmnist`)
"dormancy" without pressure, or "outgoing" under the group lasso.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from nr_jax import outgoing
from nr_jax.graph import ChannelGraph
from nr_jax.layers import MASKS, NRConv, NRDense
from nr_jax.live import Liveness, array_module, collection, from_scores, liveness, propagate

__all__ = [
    "CRITERIA",
    "BNScale",
    "Criterion",
    "Dormancy",
    "NormScale",
    "Outgoing",
    "SurvivorShift",
    "activity",
    "activity_of",
    "is_unit_call",
    "resolve",
    "suggest",
    "survivor_shift",
    "unit_outputs",
]

Array = jax.Array


class Criterion(Protocol):
    """Maps the variables (and, when `needs_activity`, a batch's activity) to live channels.

    `activity` is unit name -> mean |activation| per output channel, shape (D_out,) (`activity`).
    """

    needs_activity: bool

    def __call__(
        self,
        variables: Any,
        graph: ChannelGraph,
        activity: Mapping[str, Array] | None = None,
    ) -> Liveness: ...


@dataclasses.dataclass(frozen=True)
class BNScale:
    """The official rule: live iff |γ_c| >= threshold * max |γ| (BatchNorm), `nr_jax.liveness`."""

    threshold: float = 1e-2
    dead_threshold: float = 1e-3
    needs_activity: ClassVar[bool] = False

    def __call__(self, variables: Any, graph: ChannelGraph, activity: Any = None) -> Liveness:
        del activity
        return liveness(
            variables, graph, threshold=self.threshold, dead_threshold=self.dead_threshold
        )


@dataclasses.dataclass(frozen=True)
class NormScale:
    """The official rule on the scale of any normalisation: BatchNorm, GroupNorm or LayerNorm.

    Unlike BatchNorm's, a GroupNorm / LayerNorm survivor's statistics include its dead group
    members: dropping them changes its output (`survivor_shift`).
    """

    threshold: float = 1e-2
    dead_threshold: float = 1e-3
    needs_activity: ClassVar[bool] = False

    def __call__(self, variables: Any, graph: ChannelGraph, activity: Any = None) -> Liveness:
        del activity
        params = collection(variables, "params")
        xp = array_module(params)
        scores = {}
        for u in graph.units:
            if u.scale_path is None or u.scale_path not in params:
                raise ValueError(
                    f"unit {u.name} has no normalisation scale (norm={u.norm!r}) in the "
                    "variables; use the 'outgoing' or 'dormancy' criterion"
                )
            g = params[u.scale_path]
            if g.shape != (u.out_channels,):
                raise ValueError(
                    f"scale of unit {u.name} has shape {g.shape}, the graph expects "
                    f"({u.out_channels},): variables and graph come from different widths"
                )
            scores[u.name] = xp.abs(g.astype(xp.float32))
        return from_scores(
            variables, graph, scores, threshold=self.threshold, dead_threshold=self.dead_threshold
        )


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """The official relative rule on ‖outgoing weights‖₂ of each channel (`nr_jax.outgoing`).

    Live iff the norm >= threshold * the unit's max; all-dead when the max < dead_threshold. A
    channel with zero outgoing weights reaches nothing downstream, whatever its activation.
    """

    threshold: float = 1e-2
    dead_threshold: float = 1e-3
    needs_activity: ClassVar[bool] = False

    def __call__(self, variables: Any, graph: ChannelGraph, activity: Any = None) -> Liveness:
        del activity
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables have no 'params' collection")
        scores = outgoing.unit_norms(variables["params"], graph)
        return from_scores(
            variables, graph, scores, threshold=self.threshold, dead_threshold=self.dead_threshold
        )


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


CRITERIA = {"bn": BNScale, "norm": NormScale, "outgoing": Outgoing, "dormancy": Dormancy}


def resolve(
    name: str, *, threshold: float = 1e-2, dead_threshold: float = 1e-3, tau: float = 0.1
) -> Criterion:
    """The criterion called `name` ("bn", "norm", "outgoing" or "dormancy"; `CRITERIA`).

    The scale and weight criteria take `threshold` and `dead_threshold` (`config.nr.threshold`,
    `config.nr.dead_threshold`), dormancy takes `tau`.

    Raises:
      ConfigError: `name` is no known criterion (the one-line message of `nr_jax.config`).
    """
    if name in ("bn", "norm", "outgoing"):
        return CRITERIA[name](threshold=threshold, dead_threshold=dead_threshold)
    if name == "dormancy":
        return Dormancy(tau=tau)
    from nr_jax.config import refuse  # here: `import nr_jax` does not load the config

    refuse("nr.criterion", name, f"one of {sorted(CRITERIA)}")
    raise AssertionError  # refuse raises


def suggest(graph: ChannelGraph) -> tuple[str, str]:
    """(criterion, pressure) names that fit the graph's units (`nr_jax.sparsity.resolve`).

    Every unit with BatchNorm: ("bn", "l1"); every unit with a normalisation scale: ("norm",
    "l1"); otherwise ("outgoing", "group_lasso").
    """
    norms = {u.norm for u in graph.units}
    if norms == {"batch"}:
        return "bn", "l1"
    if None not in norms:
        return "norm", "l1"
    return "outgoing", "group_lasso"


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


# ---------------------------------------------------------------------------------------------
# What dropping dead channels does to the survivors
# ---------------------------------------------------------------------------------------------


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
