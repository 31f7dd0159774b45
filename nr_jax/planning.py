"""Planning a rejuvenation (method.md 3): r, survivors, new widths and the budget, as data.

`plan(graph, live)` decides everything `nr_jax.apply_plan` then does: the global expansion
factor r = sqrt(all / live) of the budget's resource, the old indices of the channels every unit
keeps (inputs and outputs), every unit's new width, and the allocated budget before and after.
A `Plan` is a frozen, JSON-serialisable value (`to_json` / `from_json` round-trip exactly), so a
rejuvenation can be inspected, logged or stored before it is applied.

The width floor (method.md 7.3, README "Budget"): the rule is given the survivors with the floor
already applied, max(L, min_width) per unit, and must return at least that for every unit (the
planner raises a `ValueError` otherwise, instead of raising widths silently, which would break
the budget). A unit with no survivor (all-dead) keeps exactly `min_width` channels, all behind a
zero mask, whatever the rule planned for it: growing it would spend the budget on zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nr_jax.allocation import Allocation, allocated_resource, sqrt_allocation
from nr_jax.graph import INPUT, ChannelGraph, Unit
from nr_jax.live import Liveness, utilization

__all__ = ["Plan", "UnitPlan", "plan"]


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """How one unit (or the classifier) changes.

    Attributes:
      name: the unit's name. kind: "conv" or "classifier".
      out_src: old indices of the output channels kept, ascending (classifier: every class).
      d_out: the new output width D_out (survivors first, then new channels).
      in_src: old indices of the input channels kept, in their new order.
      d_in: the new input width D_in.
      dead: the unit is all-dead (its new channel mask is zero).
    """

    name: str
    kind: str
    out_src: tuple[int, ...]
    d_out: int
    in_src: tuple[int, ...]
    d_in: int
    dead: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """A planned rejuvenation.

    Attributes:
      r: the expansion factor sqrt(all / live) of `resource`.
      resource: "params" (conv weights) or "flops" (conv MACs), the budget measure.
      utilization: U = live / all of `resource` before rejuvenation.
      min_width: the width floor the plan was made with.
      budget_before, budget_after: allocated `resource` of the network before and after.
      units: one `UnitPlan` per unit, in the graph's order (the classifier last).
    """

    r: float
    resource: str
    utilization: float
    min_width: int
    budget_before: int
    budget_after: int
    units: tuple[UnitPlan, ...]

    @functools.cached_property
    def _by_name(self) -> dict[str, UnitPlan]:  # not a field: eq, hash and JSON ignore it
        return {u.name: u for u in self.units}

    def __getitem__(self, name: str) -> UnitPlan:
        try:
            return self._by_name[name]
        except KeyError:
            names = [u.name for u in self.units]
            raise KeyError(f"no unit named {name!r} in the plan; units: {names}") from None

    @property
    def widths(self) -> dict[str, int]:
        """New output width of every conv unit."""
        return {u.name: u.d_out for u in self.units if u.kind == "conv"}

    @property
    def survivors(self) -> dict[str, int]:
        """Output channels every conv unit keeps."""
        return {u.name: len(u.out_src) for u in self.units if u.kind == "conv"}

    @property
    def dead_units(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.dead)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings (what `to_json` writes)."""
        d = dataclasses.asdict(self)
        d["units"] = [
            {**u, "out_src": list(u["out_src"]), "in_src": list(u["in_src"])} for u in d["units"]
        ]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """The inverse of `as_dict`; raises ValueError on missing or unknown keys."""
        _check_keys("Plan", d, cls)
        units = []
        for u in d["units"]:
            _check_keys("UnitPlan", u, UnitPlan)
            src = {k: tuple(int(i) for i in u[k]) for k in ("out_src", "in_src")}
            units.append(UnitPlan(**{**u, **src}))
        return cls(**{**d, "units": tuple(units)})

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def check(self, graph: ChannelGraph) -> None:
        """Raises ValueError unless the plan names `graph`'s units and its indices fit them."""
        names = [u.name for u in graph.all_units]
        if [p.name for p in self.units] != names:
            raise ValueError(f"the plan is for units {[p.name for p in self.units]}, not {names}")
        for u, p in zip(graph.all_units, self.units, strict=True):
            for src, old, new in (
                (p.out_src, u.out_channels, p.d_out),
                (p.in_src, u.in_channels, p.d_in),
            ):
                s = np.asarray(src, np.int64)
                if len(s) > new or np.any(s < 0) or np.any(s >= old) or np.any(np.diff(s) <= 0):
                    raise ValueError(
                        f"plan of unit {u.name}: kept indices must ascend within [0, {old}) and "
                        f"number at most {new}, got {len(s)} from {s.min(initial=0)} to "
                        f"{s.max(initial=0)}"
                    )


def _check_keys(what: str, d: Any, cls: type) -> None:
    want = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d, Mapping) or set(d) != want:
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise ValueError(f"{what}: expected the keys {sorted(want)}, got {got}")


def plan(
    graph: ChannelGraph,
    live: Liveness,
    *,
    resource: str = "params",
    allocation: Allocation | None = None,
    min_width: int = 1,
) -> Plan:
    """Plans the rejuvenation of `graph` given its liveness (method.md 3.1-3.2).

    Args:
      graph: the pre-rejuvenation channel graph.
      live: `nr_jax.liveness(variables, graph)` (numpy or jnp arrays).
      resource: "params" or "flops", the budget measure (method.md 2.1, 3.1).
      allocation: the width rule (default `sqrt_allocation`), given max(L, min_width) per unit.
      min_width: floor on every unit's width; an all-dead unit keeps exactly this many channels.

    Returns:
      The `Plan`.

    Raises:
      ValueError: nothing is live, the graph was already rejuvenated, or the rule returned a
        width below a unit's floor, widths for other units, or unequal widths across a tie.
    """
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph, got {type(graph).__name__}")
    if graph.rejuvenated:
        raise ValueError("this network was already rejuvenated (one rejuvenation per network)")
    if not isinstance(min_width, int) or min_width < 1:
        raise ValueError(f"min_width must be an integer >= 1, got {min_width!r}")
    live = jax.tree.map(np.asarray, live)
    util = utilization(live, graph, resource)
    if float(util.live) <= 0:
        raise ValueError(
            f"utilisation is 0 ({resource}): every channel is dead, nothing can be rejuvenated. "
            "Lower the sparsity coefficient λ or rejuvenate earlier (higher target)."
        )
    r = math.sqrt(float(util.total) / float(util.live))
    keep = _kept_outputs(graph, live)
    widths = _widths(graph, keep, r, allocation or sqrt_allocation, min_width)
    units = []
    for u in graph.all_units:
        in_src, d_in = _input_plan(u, graph, keep, widths)
        if u.kind == "conv":
            out_src, d_out, dead = keep[u.name], widths[u.name], bool(live.dead[u.name])
        else:
            out_src, d_out, dead = np.arange(u.out_channels), u.out_channels, False
        units.append(
            UnitPlan(
                u.name, u.kind, tuple(out_src.tolist()), d_out, tuple(in_src.tolist()), d_in, dead
            )
        )
    return Plan(
        r=r,
        resource=resource,
        utilization=float(util.ratio),
        min_width=min_width,
        budget_before=int(allocated_resource(graph, graph.widths, resource)),
        budget_after=int(allocated_resource(graph, widths, resource)),
        units=tuple(units),
    )


def _kept_outputs(graph: ChannelGraph, live: Liveness) -> dict[str, np.ndarray]:
    """Old indices of the outputs every unit keeps; a tie keeps its stream's, even if dead."""
    out = {u.name: np.asarray(live.out[u.name], bool) for u in graph.units}
    for tie in graph.ties:
        stream = np.any([out[n] for n in tie], axis=0)
        out.update(dict.fromkeys(tie, stream))
    return {n: np.flatnonzero(m) for n, m in out.items()}


def _widths(
    graph: ChannelGraph,
    keep: Mapping[str, np.ndarray],
    r: float,
    allocation: Allocation,
    min_width: int,
) -> dict[str, int]:
    """The rule's widths, checked: at least max(L, min_width); all-dead units at min_width."""
    floor = {n: max(len(k), min_width) for n, k in keep.items()}
    raw = allocation(graph, dict(floor), r)
    if not isinstance(raw, Mapping) or set(raw) != set(floor):
        got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(
            f"the allocation rule must return a width per unit {sorted(floor)}, got {got}"
        )
    widths = {}
    for n, f in floor.items():
        w = raw[n]
        if isinstance(w, bool) or not isinstance(w, (int, np.integer, float)) or int(w) != w:
            raise TypeError(f"the allocation rule must return integer widths, got {w!r} for {n!r}")
        if w < f:
            raise ValueError(
                f"the allocation rule planned {int(w)} channels for unit {n!r}, below its floor "
                f"{f} = max(survivors {len(keep[n])}, min_width {min_width}); a rule must return "
                "at least the survivors it is given"
            )
        widths[n] = int(w) if len(keep[n]) else min_width  # all-dead: zero mask, min_width
    for tie in graph.ties:
        if len({widths[n] for n in tie}) > 1:
            planned = {n: widths[n] for n in sorted(tie)}
            raise ValueError(
                f"units tied by a residual sum need one width, the rule planned {planned}"
            )
    return widths


def _input_plan(
    u: Unit, graph: ChannelGraph, keep: Mapping[str, np.ndarray], widths: Mapping[str, int]
) -> tuple[np.ndarray, int]:
    """Old indices of the inputs `u` keeps (in the new order) and its new input width."""
    offset, srcs, d_in = 0, [], 0
    for producers, start, stop in u.inputs:
        if INPUT in producers:
            k, w = np.arange(stop - start), stop - start
        else:
            p = sorted(producers)[0]
            if start != 0 or stop != graph[p].out_channels:
                raise ValueError(f"unit {u.name}: the network was already rejuvenated")
            k, w = keep[p], widths[p]
        srcs.append(offset + k)
        offset += stop - start
        d_in += w
    return (np.concatenate(srcs) if srcs else np.zeros(0, int)), d_in
