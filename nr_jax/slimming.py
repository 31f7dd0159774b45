"""The Network Slimming control: the dead channels dropped, nothing regrown.

The control NR is measured against (issue 14; Liu et al., ICCV 2017): at the moment NR would
rejuvenate, the same channels are dropped, but no survivor is widened and no channel is added,
which leaves a plain, single-head network at the survivors' widths. It is the rejuvenation
pipeline with the width rule that keeps every unit's survivors (`keep_allocation`), and the
model rebuilt without split points (a split with no new channels is an ordinary layer, so the
variables carry over unchanged). The run then continues as after a rejuvenation: λ becomes
`nr.lam_after`, the LR schedule restarts (`config.nr.regrow = False` in a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import optax

from nr_jax.graph import ChannelGraph, channel_graph
from nr_jax.live import Liveness, count
from nr_jax.report import Rejuvenation
from nr_jax.surgery import rejuvenate

__all__ = ["keep_allocation", "prune"]


def keep_allocation(graph: ChannelGraph, survivors: Mapping[str, int], r: float) -> dict[str, int]:
    """The width rule of the slimming control: every unit keeps max(L, min_width) channels."""
    del graph, r
    return dict(survivors)


def prune(
    key: jax.Array,
    model: nn.Module,
    variables: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
    *,
    live: Liveness | None = None,
    resource: str = "params",
    min_width: int = 1,
    threshold: float = 1e-2,
    dead_threshold: float = 1e-3,
) -> Rejuvenation:
    """Drops the dead channels of `model` without widening: a plain network of the survivors.

    Args: as `nr_jax.rejuvenate`'s (no width rule, no `new_gamma`: nothing new is drawn except
    the `min_width` channels of an all-dead unit, whose mask stays zero).

    Returns:
      `Rejuvenation(model, variables, opt_state, graph, report)`: the model without split
      points (one classifier), its variables and remapped optimiser state, its traced graph
      (not marked rejuvenated), and the report (r is the expansion NR would have applied).
    """
    res = rejuvenate(
        key,
        model,
        variables,
        opt_state,
        tx,
        graph,
        live=live,
        resource=resource,
        allocation=keep_allocation,
        min_width=min_width,
        threshold=threshold,
        dead_threshold=dead_threshold,
    )
    new_model = res.model.clone(widths=res.model.widths.plain())
    new_graph = channel_graph(new_model, graph.input_shape)
    report = dataclasses.replace(
        res.report, widths_after=new_graph.widths, counts_after=count(new_graph)
    )
    return Rejuvenation(new_model, res.variables, res.opt_state, new_graph, report)
