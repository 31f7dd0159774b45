"""The liveness `Criterion` protocol and the named criteria: `CRITERIA`, `resolve`, `suggest`.

A criterion maps the variables (and, for one with `needs_activity`, a batch's activity) to the
live channels of every unit (`nr_jax.Liveness`); `resolve` builds one by name from the run's
config fields, `suggest` names the criterion and the pressure that fit a model's units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax

from nr_jax.criteria.dormancy import Dormancy
from nr_jax.criteria.scales import BNScale, NormScale, Outgoing
from nr_jax.graph import ChannelGraph
from nr_jax.live import Liveness

__all__ = ["CRITERIA", "Criterion", "resolve", "suggest"]

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
