"""Criteria with the official relative rule on a per-channel score (method.md 2.1).

Live iff score_c >= threshold * the unit's max score; all-dead when the max < dead_threshold.
`BNScale`: |γ| of BatchNorm (`nr_jax.liveness`, the default); `NormScale`: the scale of any
normalisation (BatchNorm, GroupNorm, LayerNorm); `Outgoing`: ‖outgoing weights‖₂
(`nr_jax.outgoing`), for units without a scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from nr_jax import outgoing
from nr_jax.graph import ChannelGraph
from nr_jax.live import Liveness, array_module, collection, from_scores, liveness

__all__ = ["BNScale", "NormScale", "Outgoing"]


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
