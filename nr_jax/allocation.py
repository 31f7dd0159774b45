"""Width rules: how many channels each unit gets after rejuvenation (method.md 3.1-3.2).

A rule is the documented three-argument callable `(graph, survivors, r) -> widths` (the
`Allocation` protocol): `graph` is the pre-rejuvenation channel graph, `survivors` the number of
channels each unit keeps (already raised to the run's `min_width` by the planner, see
`nr_jax.plan`), `r` the global expansion factor sqrt(all / live). It returns the new total width
of every unit, at least its survivors. A rule that needs more (a granularity, the budget's
resource, the width floor) receives it when it is built (`rounded_allocation(8, min_width=2)`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from nr_jax.graph import INPUT, ChannelGraph
from nr_jax.live import RESOURCES

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "allocated_resource",
    "integer_allocation",
    "resolve",
    "rounded_allocation",
    "sqrt_allocation",
]


class Allocation(Protocol):
    """A width rule: survivors L per unit and the factor r -> new total width D per unit."""

    def __call__(
        self, graph: ChannelGraph, survivors: Mapping[str, int], r: float
    ) -> Mapping[str, int]: ...


def sqrt_allocation(graph: ChannelGraph, survivors: Mapping[str, int], r: float) -> dict[str, int]:
    """The official rule (method.md 3.2): D_out = floor(L_out * r) for every unit.

    Args:
      graph: the pre-rejuvenation graph (unused).
      survivors: L_out per unit (fixed units: all their channels), at least `min_width`.
      r: the global expansion factor sqrt(all / live), >= 1.

    Returns:
      The new total width D_out per unit (>= L_out, since r >= 1).
    """
    del graph
    return {name: int(math.floor(n * r)) for name, n in survivors.items()}


def integer_allocation(
    graph: ChannelGraph, survivors: Mapping[str, int], r: float
) -> dict[str, int]:
    """The official CIFAR DenseNet rule (method.md 3.1): D_out = L_out * int(r)."""
    return sqrt_allocation(graph, survivors, float(int(r)))


def allocated_resource(
    graph: ChannelGraph, widths: Mapping[str, Any], resource: str = "params"
) -> Any:
    """Conv weights (or MACs) of the network `graph` with output widths `widths`.

    Works on a rejuvenated graph too (a concatenation then lists a producer twice, survivors and
    new channels: it is counted once per use). Widths may be numpy arrays (broadcast together),
    which evaluates many candidate allocations at once.
    """
    total: Any = 0
    for u in graph.units:
        d_in: Any = 0
        uses: dict[str, int] = {}  # channels read from each producer, over all its segments
        for producers, start, stop in u.inputs:
            if INPUT in producers:
                d_in += stop - start
            else:
                p = sorted(producers)[0]
                uses[p] = uses.get(p, 0) + stop - start
        for p, n in uses.items():
            full = graph[p].out_channels
            d_in = d_in + (widths[p] * (n // full) if n % full == 0 else widths[p] * n / full)
        w = u.kernel[0] * u.kernel[1] * d_in * widths[u.name]
        total = total + w * (u.out_hw[0] * u.out_hw[1] if resource == "flops" else 1)
    return total


@dataclasses.dataclass(frozen=True)
class _Rounding:
    """One search of `rounded_allocation`: allowed widths are multiples of g, or exactly L."""

    graph: ChannelGraph
    resource: str
    g: int
    survivors: Mapping[str, int]
    floor: Mapping[str, int]  # max(L, min_width, 1)

    def cost(self, widths: Mapping[str, Any]) -> Any:
        return allocated_resource(self.graph, widths, self.resource)

    def at(self, r: float) -> dict[str, int]:
        """Uniform factor r: floor(L r), at least the floor, rounded to a multiple of g."""
        g, out = self.g, {}
        for name, n in self.survivors.items():
            w = max(int(math.floor(n * r)), self.floor[name])
            out[name] = max(n, g * max(math.ceil(self.floor[name] / g), round(w / g)))
        return out

    def up(self, best: Mapping[str, int], group: frozenset[str]) -> dict[str, int]:
        return {n: self.g * (best[n] // self.g + 1) for n in group}

    def down(self, best: Mapping[str, int], group: frozenset[str]) -> dict[str, int] | None:
        """The next smaller allowed width of `group`, or None at its floor."""
        w = {n: self.g * ((best[n] - 1) // self.g) for n in group}
        if all(w[n] >= self.floor[n] for n in group):
            return w
        if any(best[n] != self.floor[n] for n in group) and all(
            self.survivors[n] == self.floor[n] for n in group
        ):  # back to exactly L (the survivors alone)
            return {n: self.floor[n] for n in group}
        return None


def rounded_allocation(
    granularity: int,
    *,
    resource: str = "params",
    min_width: int = 1,
    tolerance: float = 0.01,
) -> Allocation:
    """Hardware-aware widths: every total width a multiple of `granularity`, budget kept.

    The survivor group keeps its L channels; only the new group is sized, so that the unit's
    total width is a multiple of `granularity`, or exactly L where no new channel fits (L itself
    need not be a multiple). The largest uniform expansion factor that fits the pre-rejuvenation
    budget (in `resource`) is found by bisection; then single units (a residual tie as one) move
    one allowed width at a time until the allocated resource is within `tolerance` of the budget.
    Where that greedy search stalls (small networks, where one granule is a large share of the
    budget) and the candidate grid is small, every combination is evaluated at once and the one
    within tolerance closest to the uniform start is taken. No width is below `min_width`.
    """
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be an integer >= 1, got {granularity!r}")
    if not isinstance(min_width, int) or min_width < 1:
        raise ValueError(f"min_width must be an integer >= 1, got {min_width!r}")
    if resource not in RESOURCES:
        raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")

    def allocate(graph: ChannelGraph, survivors: Mapping[str, int], r: float) -> dict[str, int]:
        floor = {n: max(k, min_width, 1) for n, k in survivors.items()}
        s = _Rounding(graph, resource, granularity, survivors, floor)
        budget = s.cost(graph.widths)
        lo_ok, hi_ok = (1 - tolerance) * budget, (1 + tolerance) * budget
        lo, hi, best = 0.0, 4.0 * r, s.at(0.0)
        for _ in range(40):  # the largest uniform factor that fits the budget
            mid = (lo + hi) / 2
            if s.cost(widths := s.at(mid)) <= budget:
                lo, best = mid, widths
            else:
                hi = mid
        tied = {n: tie for tie in graph.ties for n in tie}
        groups = sorted({tied.get(n, frozenset([n])) for n in best}, key=sorted)  # deterministic
        start, best = best, _greedy(s, best, groups, budget, lo_ok, hi_ok)
        if s.cost(best) < lo_ok:
            best = _exhaustive(s, groups, start, lo_ok, hi_ok) or best
        return best

    return allocate


def _greedy(
    s: _Rounding,
    best: dict[str, int],
    groups: list[frozenset[str]],
    budget: float,
    lo_ok: float,
    hi_ok: float,
) -> dict[str, int]:
    """Fills the gap to the budget one granule at a time (a residual tie moves together)."""
    while s.cost(best) < lo_ok:
        options = []
        for group in groups:
            trial = {**best, **s.up(best, group)}
            if (c := s.cost(trial)) <= hi_ok:
                options.append((abs(c - budget), sorted(group)[0], trial))
        if not options and len(groups) <= 48:  # grow one group, shrink another
            now = s.cost(best)
            for grow in groups:
                for shrink in (x for x in groups if x != grow):
                    if (smaller := s.down(best, shrink)) is None:
                        continue
                    trial = {**best, **s.up(best, grow), **smaller}
                    if now < (c := s.cost(trial)) <= hi_ok:
                        options.append((abs(c - budget), sorted(grow)[0], trial))
        if not options:
            return best
        best = min(options, key=lambda o: o[:2])[2]
    return best


def _exhaustive(
    s: _Rounding,
    groups: list[frozenset[str]],
    start: Mapping[str, int],
    lo_ok: float,
    hi_ok: float,
    max_grid: int = 1 << 18,
) -> dict[str, int] | None:
    """Every allowed combination of widths (multiples of g, or exactly L) evaluated at once.

    Returns the combination within [lo_ok, hi_ok] closest to `start` (in granules), or None when
    there is none or the grid would exceed `max_grid` points.
    """
    options, size, g, floor = [], 1, s.g, s.floor
    for group in groups:
        n = sorted(group)[0]
        cands = [floor[n]] if floor[n] % g and s.survivors[n] == floor[n] else []
        w = g * math.ceil(floor[n] / g)
        while s.cost({**floor, **dict.fromkeys(group, w)}) <= hi_ok:
            cands.append(w)
            w += g
        size *= len(cands)
        if not cands or size > max_grid:
            return None
        options.append(np.asarray(cands, np.int64))
    grids = np.meshgrid(*options, indexing="ij")
    pairs = list(zip(groups, grids, strict=True))
    c = np.asarray(s.cost({n: grid for group, grid in pairs for n in group}), np.float64)
    ok = (c >= lo_ok) & (c <= hi_ok)
    if not ok.any():
        return None
    distance = sum(np.abs(grid - start[sorted(group)[0]]) for group, grid in pairs)
    distance = np.where(ok, distance, np.iinfo(np.int64).max)
    idx = np.unravel_index(int(np.argmin(distance)), distance.shape)
    return {n: int(grid[idx]) for group, grid in pairs for n in group}


# the named rules of `config.nr.allocation` (any "round<g>" is built by `resolve`)
ALLOCATIONS: dict[str, Allocation] = {
    "sqrt": sqrt_allocation,
    "integer": integer_allocation,
    "round8": rounded_allocation(8),
    "round16": rounded_allocation(16),
}
_ROUND = re.compile(r"round([1-9][0-9]*)")


def resolve(name: str, *, resource: str = "params", min_width: int = 1) -> Allocation:
    """The width rule called `name` for a run ("auto" is the caller's to resolve first).

    Args:
      name: "sqrt", "integer", "round<g>" (g >= 1: `rounded_allocation(g)`) or another key of
        `ALLOCATIONS`.
      resource: the run's budget measure ("params" or "flops"), for the rounded rules.
      min_width: the run's width floor (`config.nr.min_width`), for the rounded rules.

    Raises:
      ConfigError: `name` is no known rule (the one-line message of `nr_jax.config`).
    """
    if isinstance(name, str) and (match := _ROUND.fullmatch(name)):
        return rounded_allocation(int(match.group(1)), resource=resource, min_width=min_width)
    if isinstance(name, str) and name in ALLOCATIONS:
        return ALLOCATIONS[name]
    from nr_jax.config import ConfigError  # here: `import nr_jax` does not load the config

    allowed = f"'auto', 'round<g>' (g >= 1) or one of {sorted(ALLOCATIONS)}"
    raise ConfigError(f"config.nr.allocation = {name!r} is not allowed: {allowed}")
