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

The package: `protocol` (the `Criterion` protocol, the named criteria `CRITERIA`, `resolve`,
`suggest`), `scales` (the relative rule on BN / normalisation scales and on outgoing weights),
`dormancy` (ReDo's criterion and the unit activations it reads), `shift` (what dropping the dead
channels does to the survivors: `survivor_shift`).
"""

from nr_jax.criteria.dormancy import Dormancy, activity, activity_of, is_unit_call, unit_outputs
from nr_jax.criteria.protocol import CRITERIA, Criterion, resolve, suggest
from nr_jax.criteria.scales import BNScale, NormScale, Outgoing
from nr_jax.criteria.shift import SurvivorShift, survivor_shift

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
