"""Rejuvenation: a pure host-side function from old trees to new trees (method.md sections 3-4).

`rejuvenate(key, model, variables, opt_state, tx, graph)` drops dead channels, widens every unit
by one global factor r = sqrt(all / live) so the resource budget is restored, reinitialises the
new channels and returns a new model (same class, new static widths), new variables, a new
optimiser state (survivors' moments carried over, new slots zero, counters kept), the new graph
and a report. Nothing is mutated. New weights are drawn on the host with numpy, seeded from `key`,
so the function is deterministic and costs no compilation. The new arrays are built in a few
host buffers that jax then uses without copying them (on CPU).

Layout after rejuvenation: every channel axis is [survivors (original order), new]; for a unit
whose input is a concatenation, [survivors of every input, new channels of every input].
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nr_jax._tracking import merge_segments
from nr_jax.graph import INPUT, ChannelGraph, Unit, channel_graph
from nr_jax.layers import MASKS, UnitWidth, WidthSpec
from nr_jax.liveness import Counts, Liveness, count, liveness, utilization

# (graph, survivors L per unit, r) -> new width per unit; a rule that also takes a keyword
# `min_width` gets `rejuvenate`'s (see `rounded_allocation`)
Allocation = Callable[..., Mapping[str, int]]


def sqrt_allocation(graph: ChannelGraph, survivors: Mapping[str, int], r: float) -> dict[str, int]:
    """The official rule (method.md 3.2): D_out = floor(L_out * r) for every unit.

    Args:
      graph: the pre-rejuvenation graph.
      survivors: L_out per unit (fixed units: all their channels; all-dead units: 0).
      r: the global expansion factor sqrt(all / live).

    Returns:
      The new total width D_out per unit. `rejuvenate` then enforces D_out >= L_out, the
      minimum width and equal widths across a residual tie.
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


def rounded_allocation(
    granularity: int = 8, resource: str = "params", tolerance: float = 0.01
) -> Allocation:
    """Hardware-aware widths: every total width a multiple of `granularity`, budget kept.

    The survivor group keeps its L channels; only the new group is sized, so that the unit's
    total width is a multiple of `granularity`, or exactly L where no new channel fits (L itself
    need not be a multiple). The largest uniform expansion factor that fits the pre-rejuvenation
    budget is found by bisection; then single units (a residual tie as one) move one allowed
    width at a time until the allocated resource is within `tolerance` of the budget. Where that
    greedy search stalls (small networks, where one granule is a large share of the budget) and
    the candidate grid is small, every combination is evaluated at once and the one within
    tolerance closest to the uniform start is taken. The returned rule takes `min_width`
    (`rejuvenate` passes its own), so the widths it plans already respect it.
    """
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    g = granularity

    def allocate(
        graph: ChannelGraph, survivors: Mapping[str, int], r: float, min_width: int = 1
    ) -> dict[str, int]:
        floor = {n: max(k, min_width, 1) for n, k in survivors.items()}

        def widths_at(r: float) -> dict[str, int]:
            out = {}
            for name, n in survivors.items():
                w = max(int(math.floor(n * r)), floor[name])
                out[name] = max(n, g * max(math.ceil(floor[name] / g), round(w / g)))
            return out

        budget = allocated_resource(graph, graph.widths, resource)
        lo_ok, hi_ok = (1 - tolerance) * budget, (1 + tolerance) * budget
        cost = lambda w: allocated_resource(graph, w, resource)  # noqa: E731
        lo, hi = 0.0, 4.0 * r
        best = widths_at(0.0)
        for _ in range(40):  # the largest uniform factor that fits the budget
            mid = (lo + hi) / 2
            widths = widths_at(mid)
            if cost(widths) <= budget:
                lo, best = mid, widths
            else:
                hi = mid
        start = dict(best)
        tied = {n: tie for tie in graph.ties for n in tie}
        groups = sorted({tied.get(n, frozenset([n])) for n in best}, key=sorted)  # deterministic

        def up(group: frozenset[str]) -> dict[str, int]:  # the next allowed width: a multiple
            return {n: g * (best[n] // g + 1) for n in group}

        def down(group: frozenset[str]) -> dict[str, int] | None:
            w = {n: g * ((best[n] - 1) // g) for n in group}
            if all(w[n] >= floor[n] for n in group):
                return w
            if any(best[n] != floor[n] for n in group) and all(
                survivors[n] == floor[n] for n in group
            ):  # back to exactly L (the survivors alone)
                return {n: floor[n] for n in group}
            return None

        while cost(best) < lo_ok:  # fill the gap greedily (a residual tie moves together)
            options = []
            for group in groups:
                trial = {**best, **up(group)}
                if (c := cost(trial)) <= hi_ok:
                    options.append((abs(c - budget), sorted(group)[0], trial))
            if not options and len(groups) <= 48:  # grow one group, shrink another
                now = cost(best)
                for grow in groups:
                    for shrink in (x for x in groups if x != grow):
                        smaller = down(shrink)
                        if smaller is None:
                            continue
                        trial = {**best, **up(grow), **smaller}
                        if now < (c := cost(trial)) <= hi_ok:
                            options.append((abs(c - budget), sorted(grow)[0], trial))
            if not options:
                break
            best = min(options, key=lambda o: o[:2])[2]
        if cost(best) < lo_ok:
            best = _exhaustive(groups, survivors, floor, start, g, cost, lo_ok, hi_ok) or best
        return best

    return allocate


def _exhaustive(
    groups: list[frozenset[str]],
    survivors: Mapping[str, int],
    floor: Mapping[str, int],
    start: Mapping[str, int],
    g: int,
    cost: Callable[[Mapping[str, Any]], Any],
    lo_ok: float,
    hi_ok: float,
    max_grid: int = 1 << 18,
) -> dict[str, int] | None:
    """Every allowed combination of widths (multiples of g, or exactly L) evaluated at once.

    Returns the combination within [lo_ok, hi_ok] closest to `start` (in granules), or None when
    there is none or the grid would exceed `max_grid` points.
    """
    options = []
    size = 1
    for group in groups:
        n = sorted(group)[0]
        cands = [floor[n]] if floor[n] % g and survivors[n] == floor[n] else []
        w = g * math.ceil(floor[n] / g)
        while cost({**floor, **dict.fromkeys(group, w)}) <= hi_ok:
            cands.append(w)
            w += g
        if not cands:
            return None
        size *= len(cands)
        if size > max_grid:
            return None
        options.append(np.asarray(cands, np.int64))
    grids = np.meshgrid(*options, indexing="ij")
    widths = {n: grid for group, grid in zip(groups, grids, strict=True) for n in group}
    c = np.asarray(cost(widths), np.float64)
    ok = (c >= lo_ok) & (c <= hi_ok)
    if not ok.any():
        return None
    distance = sum(
        np.abs(grid - start[sorted(group)[0]]) for group, grid in zip(groups, grids, strict=True)
    )
    distance = np.where(ok, distance, np.iinfo(np.int64).max)
    idx = np.unravel_index(int(np.argmin(distance)), distance.shape)
    return {n: int(grid[idx]) for group, grid in zip(groups, grids, strict=True) for n in group}


ALLOCATIONS: dict[str, Allocation] = {
    "sqrt": sqrt_allocation,
    "integer": integer_allocation,
    "round8": rounded_allocation(8),
    "round16": rounded_allocation(16),
}


_ALIGN = 64  # bytes: on CPU, jax.device_put aliases (does not copy) a host array aligned so


def _allocate(specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Zero arrays, `_ALIGN`-aligned views of one new buffer.

    One large buffer is much faster to fill than many fresh ones: numpy asks the kernel for huge
    pages from 4 MiB on, so there are far fewer page faults. A large buffer comes zeroed from the
    kernel, so writing the zeros again is skipped.
    """
    nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    offsets = np.cumsum([0] + [-(-n // _ALIGN) * _ALIGN for n in nbytes]).tolist()
    buf = np.zeros(offsets[-1] + _ALIGN, np.uint8)
    buf = buf[-buf.__array_interface__["data"][0] % _ALIGN :]
    return [
        buf[start : start + n].view(dtype).reshape(shape)
        for (shape, dtype), n, start in zip(specs, nbytes, offsets[:-1], strict=True)
    ]


class AxisPlan:
    """New size of one axis and the old indices of its survivors (placed at [0, len(src)))."""

    __slots__ = ("size", "src", "prefix")

    def __init__(self, size: int, src: np.ndarray) -> None:
        self.size, self.src = size, src
        n = len(src)  # a prefix 0..n-1 is a slice, no gather (the cheap test first)
        self.prefix = n == 0 or (int(src[-1]) == n - 1 and np.array_equal(src, np.arange(n)))


class LeafPlan:
    """How one parameter-shaped leaf changes: one AxisPlan (or None: unchanged) per axis."""

    __slots__ = ("axes",)

    def __init__(self, axes: tuple[AxisPlan | None, ...]) -> None:
        self.axes = axes

    def shape(self, old_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(old_shape[i] if a is None else a.size for i, a in enumerate(self.axes))

    def gather(self, old: np.ndarray, fill: float, out: np.ndarray) -> None:
        """Writes `old`'s survivors at their new place in `out`, `fill` elsewhere.

        `out` has the new shape and holds zeros (`_allocate`), so a zero fill is not written.
        """
        if len(self.axes) == 1 and self.axes[0] is not None:  # a vector: the common, small case
            a = self.axes[0]
            n = len(a.src)
            if a.prefix:
                out[:n] = old[:n]
            else:
                np.take(old, a.src, out=out[:n], mode="clip")  # "clip": no bounds-check buffer
            if fill != 0:
                out[n:] = fill
            return
        block, head = old, ()
        for i, a in enumerate(self.axes):
            if a is None:
                head += (slice(None),)
                continue
            n = len(a.src)
            if not a.prefix:  # one np.take per axis: several times faster than np.ix_ indexing
                block = block.take(a.src, axis=i)
            elif n < old.shape[i]:
                block = block[head + (slice(0, n),)]
            if n < a.size and fill != 0:  # the complement of the survivors, disjoint boxes
                out[head + (slice(n, None),)] = fill
            head += (slice(0, n),)
        out[head] = block


class _Gather:
    """A new leaf to be made: `old`'s survivors by `plan`, `fill` elsewhere, `values` at `at`.

    `run` writes it into a zero array of its shape and dtype (`_make`).
    """

    __slots__ = ("old", "plan", "fill", "at", "values", "shape", "dtype")

    def __init__(self, old: np.ndarray, plan: LeafPlan, fill: float) -> None:
        self.old, self.plan, self.fill = old, plan, fill
        self.at: tuple[slice, ...] = ()
        self.values: np.ndarray | None = None
        self.shape, self.dtype = plan.shape(old.shape), old.dtype

    def run(self, out: np.ndarray) -> None:
        self.plan.gather(self.old, self.fill, out)
        if self.values is not None:
            out[self.at] = self.values


class _Full:
    """A new leaf to be made: `shape` filled with `value`."""

    __slots__ = ("shape", "dtype", "value")

    def __init__(self, shape: tuple[int, ...], dtype: Any, value: float) -> None:
        self.shape, self.dtype, self.value = shape, np.dtype(dtype), value

    def run(self, out: np.ndarray) -> None:
        if self.value != 0:
            out[...] = self.value


def _is_job(x: Any) -> bool:
    return isinstance(x, (_Gather, _Full))


def _make(jobs: Sequence[_Gather | _Full], groups: Sequence[Any]) -> list[jax.Array]:
    """Runs the jobs into new host arrays and hands those to jax without copying them.

    The jobs of one group (one collection of the variables, or the optimiser state) share one
    buffer, released when all of its arrays are.
    """
    outs: list[Any] = [None] * len(jobs)
    for group in dict.fromkeys(groups):
        index = [i for i, g in enumerate(groups) if g == group]
        specs = [(jobs[i].shape, jobs[i].dtype) for i in index]
        for i, x in zip(index, _allocate(specs), strict=True):
            outs[i] = x
    for job, out in zip(jobs, outs, strict=True):
        job.run(out)
    return list(jax.device_put(outs))


@dataclasses.dataclass(frozen=True)
class RejuvenationReport:
    """What a rejuvenation did, for logs and checkpoints."""

    resource: str
    utilization: float
    r: float
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    survivors: dict[str, int]
    dead_units: tuple[str, ...]
    counts_before: Counts
    counts_after: Counts

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["counts_before"] = self.counts_before._asdict()
        d["counts_after"] = self.counts_after._asdict()
        d["dead_units"] = list(self.dead_units)
        return d

    def summary(self) -> str:
        b, a = self.counts_before, self.counts_after
        lines = [
            f"rejuvenation: U={self.utilization:.4f} ({self.resource}), r={self.r:.4f}",
            f"{'unit':<24}{'before':>8}{'live':>8}{'after':>8}",
        ]
        for name, w in self.widths_before.items():
            dead = "  all-dead" if name in self.dead_units else ""
            lines.append(
                f"{name:<24}{w:>8}{self.survivors[name]:>8}{self.widths_after[name]:>8}{dead}"
            )
        lines.append(
            f"conv weights {b.conv:,} -> {a.conv:,}; total params {b.total:,} -> {a.total:,}; "
            f"effective params {b.effective:,} -> {a.effective:,}; "
            f"MACs {b.macs:,} -> {a.macs:,} (effective {a.effective_macs:,})"
        )
        return "\n".join(lines)


class Rejuvenation(NamedTuple):
    """Result of `rejuvenate`."""

    model: nn.Module
    variables: dict[str, Any]
    opt_state: Any
    graph: ChannelGraph
    report: RejuvenationReport


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded from a JAX PRNG key (typed or raw uint32)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())


def _to_host(tree: Any) -> Any:
    tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
    return jax.tree.map(np.asarray, tree)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


@dataclasses.dataclass
class _UnitPlan:
    out_src: np.ndarray  # old indices of surviving outputs, in order
    d_out: int
    in_src: np.ndarray  # old input indices of surviving inputs, in the new order
    d_in: int
    dead: bool


def plan_widths(
    graph: ChannelGraph,
    live: Liveness,
    r: float,
    *,
    allocation: Allocation = sqrt_allocation,
    min_width: int = 1,
) -> dict[str, _UnitPlan]:
    """Survivor indices and new widths of every unit (host side, numpy)."""
    if min_width < 1:
        raise ValueError(f"min_width must be >= 1, got {min_width}")
    out = {u.name: np.asarray(live.out[u.name], bool) for u in graph.units}
    dead = {u.name: bool(live.dead[u.name]) for u in graph.units}
    for tie in graph.ties:  # a tied unit keeps the stream's layout, even when it is dead itself
        stream = np.any([out[n] for n in tie], axis=0)
        for n in tie:
            out[n] = stream
    keep = {n: np.flatnonzero(m) for n, m in out.items()}
    survivors = {n: len(k) for n, k in keep.items()}
    takes_min_width = "min_width" in inspect.signature(allocation).parameters
    widths = dict(
        allocation(graph, survivors, r, min_width=min_width)
        if takes_min_width
        else allocation(graph, survivors, r)
    )
    if set(widths) != set(survivors):
        raise ValueError("the allocation rule must return a width for every unit")
    widths = {n: max(int(widths[n]), survivors[n], min_width) for n in survivors}
    for tie in graph.ties:
        w = max(widths[n] for n in tie)
        for n in tie:
            widths[n] = w
    plans: dict[str, _UnitPlan] = {}
    for u in graph.all_units:
        in_src, d_in = _input_plan(u, graph, keep, widths)
        if u.kind == "conv":
            plans[u.name] = _UnitPlan(keep[u.name], widths[u.name], in_src, d_in, dead[u.name])
        else:
            plans[u.name] = _UnitPlan(
                np.arange(u.out_channels), u.out_channels, in_src, d_in, False
            )
    return plans


def _input_plan(
    u: Unit, graph: ChannelGraph, keep: Mapping[str, np.ndarray], widths: Mapping[str, int]
) -> tuple[np.ndarray, int]:
    offset, srcs, d_in = 0, [], 0
    for producers, start, stop in u.inputs:
        p = sorted(producers)[0]
        if INPUT in producers:
            k, w = np.arange(stop - start), stop - start
        else:
            if start != 0 or stop != graph[p].out_channels:
                raise ValueError(f"unit {u.name}: the network was already rejuvenated")
            k, w = keep[p], widths[p]
        srcs.append(offset + k)
        offset += stop - start
        d_in += w
    return (np.concatenate(srcs) if srcs else np.zeros(0, int)), d_in


def rejuvenate(
    key: jax.Array,
    model: nn.Module,
    variables: Any,
    opt_state: Any,
    tx: optax.GradientTransformation,
    graph: ChannelGraph,
    *,
    live: Liveness | None = None,
    resource: str = "params",
    allocation: Allocation = sqrt_allocation,
    min_width: int = 1,
    new_gamma: float = 0.5,
    threshold: float = 1e-2,
    dead_threshold: float = 1e-3,
    check: bool = False,
) -> Rejuvenation:
    """Drops dead channels, widens survivors by r = sqrt(all/live), reinitialises new channels.

    Args:
      key: PRNG key for the new weights (host-side draw, deterministic).
      model: the model; must have a `widths: WidthSpec` field.
      variables: {"params", "batch_stats", "nr_masks"} of `model`.
      opt_state: state of `tx` for `variables["params"]` (None: return None).
      tx: the optimiser; reused unchanged after rejuvenation.
      graph: `channel_graph(model, ...)`.
      live: precomputed liveness (default: `liveness(variables, graph)`).
      resource: "params" or "flops", the budget measure (method.md 2.1, 3.1).
      allocation: the width rule (default `sqrt_allocation`).
      min_width: floor on every unit's width; an all-dead unit keeps this many channels with a
        sticky zero mask (method.md 7.3).
      new_gamma: BN scale of new channels (official 0.5).
      threshold, dead_threshold: liveness thresholds when `live` is None.
      check: also trace the new model and verify that it builds exactly the new graph and the
        new variables' shapes (slower; the tests do it for every model family).

    Returns:
      `Rejuvenation(model, variables, opt_state, graph, report)`.
    """
    if not isinstance(graph, ChannelGraph):
        raise TypeError(f"graph must be a ChannelGraph, got {type(graph).__name__}")
    if graph.rejuvenated:
        raise ValueError("this network was already rejuvenated (one rejuvenation per network)")
    if not isinstance(getattr(model, "widths", None), WidthSpec):
        raise TypeError(
            f"{type(model).__name__} needs a `widths: WidthSpec` field to be rejuvenated"
        )
    host = _to_host(variables)
    for name in ("params", "batch_stats"):
        if name not in host:
            raise ValueError(f"variables lack the {name!r} collection")
    if live is None:
        live = liveness(host, graph, threshold=threshold, dead_threshold=dead_threshold)
    util = utilization(live, graph, resource)
    if float(util.live) <= 0:
        raise ValueError(
            f"utilisation is 0 ({resource}): every channel is dead, nothing can be rejuvenated. "
            "Lower the sparsity coefficient λ or rejuvenate earlier (higher target)."
        )
    r = math.sqrt(float(util.total) / float(util.live))
    plans = plan_widths(graph, live, r, allocation=allocation, min_width=min_width)
    rng = host_rng(key)
    new_vars, leaf_plans = _new_variables(host, graph, plans, rng, new_gamma)
    new_model = model.clone(widths=_width_spec(graph, plans))
    new_graph = _derived_graph(graph, plans)
    if check:
        traced = channel_graph(new_model, graph.input_shape)
        if traced != new_graph:
            raise ValueError(
                f"rejuvenate: {type(model).__name__} does not build the widths it was given "
                "(its units must take their widths from `self.widths` via nr_jax.layers)"
            )
        _check_shapes(new_vars, traced.variable_shapes)
    state = None
    if opt_state is not None:
        state = _new_opt_state(tx, opt_state, host["params"], new_vars["params"], leaf_plans)
    report = RejuvenationReport(
        resource=resource,
        utilization=float(util.ratio),
        r=r,
        widths_before=graph.widths,
        widths_after=new_graph.widths,
        survivors={u.name: len(plans[u.name].out_src) for u in graph.units},
        dead_units=tuple(u.name for u in graph.units if plans[u.name].dead),
        counts_before=count(graph),
        counts_after=count(new_graph),
    )
    # every new array is made here at once, the variables' (one buffer per collection) and
    # the optimiser state's (one buffer)
    var_paths, var_def = jax.tree_util.tree_flatten_with_path(new_vars)
    var_leaves = [x for _, x in var_paths]
    state_leaves, state_def, fresh = state if state is not None else ([], None, [])
    jobs = [x for x in var_leaves + state_leaves if _is_job(x)]
    groups = [path[0].key for path, x in var_paths if _is_job(x)]
    groups += [None] * (len(jobs) - len(groups))
    made = iter(_make(jobs, groups))
    # leaves taken over unchanged are copied, as the caller may still own them
    new_vars = jax.tree.unflatten(
        var_def, [next(made) if _is_job(x) else jnp.asarray(x) for x in var_leaves]
    )
    new_state = None
    if state is not None:
        state_leaves = [next(made) if _is_job(x) else x for x in state_leaves]
        if fresh:  # only then pay for a real initialisation
            real = jax.tree.leaves(tx.init(new_vars["params"]))
            for i in fresh:
                state_leaves[i] = real[i]
        new_state = jax.tree.unflatten(state_def, state_leaves)
    return Rejuvenation(new_model, new_vars, new_state, new_graph, report)


def _derived_graph(graph: ChannelGraph, plans: Mapping[str, _UnitPlan]) -> ChannelGraph:
    """The graph of the rejuvenated model, without tracing it: same structure, new widths.

    Input segments follow the layout the layers build: a single producer keeps one segment over
    its whole new width; a concatenation lists every producer's survivors, then every
    producer's new channels (`nr_jax.layers.concat(..., splits=...)`).
    """
    width = {u.name: plans[u.name].d_out for u in graph.units}
    survivors = {u.name: len(plans[u.name].out_src) for u in graph.units}
    units = []
    for u in graph.all_units:
        p = plans[u.name]
        segs = []
        for producers, start, stop in u.inputs:
            name = sorted(producers)[0]
            if INPUT in producers:
                segs.append(((producers, start, stop), None))
            else:
                segs.append(((producers, 0, width[name]), survivors[name]))
        if len(segs) > 1 and all(k is not None for _, k in segs):  # a concatenation
            old = [(pr, 0, k) for (pr, _, _), k in segs]
            new = [(pr, k, d) for (pr, _, d), k in segs]
            inputs = merge_segments(old + new)
        else:
            inputs = merge_segments([seg for seg, _ in segs])
        conv = u.kind == "conv"
        units.append(
            dataclasses.replace(
                u,
                inputs=inputs,
                in_channels=p.d_in,
                out_channels=p.d_out if conv else u.out_channels,
                in_split=len(p.in_src),
                out_split=len(p.out_src) if conv else None,
            )
        )
    convs = tuple(x for x in units if x.kind == "conv")
    head = next((x for x in units if x.kind == "classifier"), None)
    return ChannelGraph(convs, head, graph.ties, graph.input_shape)


def _width_spec(graph: ChannelGraph, plans: Mapping[str, _UnitPlan]) -> WidthSpec:
    entries = {}
    for u in graph.all_units:
        p = plans[u.name]
        if u.kind == "conv":
            entries[u.name] = UnitWidth(p.d_out, len(p.in_src), len(p.out_src))
        else:
            entries[u.name] = UnitWidth(u.out_channels, len(p.in_src), None)
    return WidthSpec.from_dict(entries)


def _new_variables(
    host: dict,
    graph: ChannelGraph,
    plans: Mapping[str, _UnitPlan],
    rng: np.random.Generator,
    new_gamma: float,
) -> tuple[dict, dict]:
    """The new variables as jobs (`_make` runs them) and the LeafPlan of every parameter leaf.

    Only the weights that stay random are drawn, unit by unit in graph order (one key, one
    result): a conv's new inputs -> new outputs (all inputs -> new outputs when it has no new
    inputs), He normal with the new fan-out; the classifier's new inputs, N(0, 0.01).
    """
    new = jax.tree.map(lambda x: x, host)  # a fresh container tree; leaves replaced below
    leaf_plans: dict[tuple[str, ...], LeafPlan] = {}
    for u in graph.all_units:
        p = plans[u.name]
        ax_in = AxisPlan(p.d_in, p.in_src)
        l_in = len(p.in_src)
        path = u.path + ("kernel",)
        kernel = np.asarray(_get(host["params"], path))
        if u.kind == "classifier":
            leaf_plans[path] = plan = LeafPlan((ax_in, None))
            job = _Gather(kernel, plan, 0.0)
            if l_in < p.d_in:
                job.at = (slice(l_in, None),)
                job.values = rng.standard_normal((p.d_in - l_in, job.shape[1]), dtype=np.float32)
                job.values *= np.float32(0.01)
            _set(new["params"], path, job)
            continue
        ax_out = AxisPlan(p.d_out, p.out_src)
        leaf_plans[path] = plan = LeafPlan((None, None, ax_in, ax_out))
        # survivors copied; new inputs -> old outputs zero (survivors stay exact); old inputs ->
        # new outputs zero when the unit has new inputs (the removed cross connection)
        job = _Gather(kernel, plan, 0.0)
        kh, kw, d_in, d_out = job.shape
        l_out = len(p.out_src)
        if l_out < d_out:
            first = l_in if l_in < d_in else 0
            job.at = (slice(None), slice(None), slice(first, None), slice(l_out, None))
            std = math.sqrt(2.0 / (kh * kw * d_out))  # He, fan-out of the new width
            job.values = rng.standard_normal((kh, kw, d_in - first, d_out - l_out), np.float32)
            job.values *= np.float32(std)
        _set(new["params"], path, job)
        vec = LeafPlan((ax_out,))
        for coll, leaf, value in (
            ("params", "scale", new_gamma),
            ("params", "bias", 0.0),
            ("batch_stats", "mean", 0.0),
            ("batch_stats", "var", 1.0),
        ):
            path = u.path + ("bn", leaf)
            _set(new[coll], path, _Gather(np.asarray(_get(host[coll], path)), vec, value))
            if coll == "params":
                leaf_plans[path] = vec
        if MASKS in host:
            _set(
                new[MASKS],
                u.path + ("mask",),
                _Full((p.d_out,), np.float32, 0.0 if p.dead else 1.0),
            )
    return new, leaf_plans


def _check_shapes(new_vars: Any, expected: Any) -> None:
    got = jax.tree_util.tree_flatten_with_path(new_vars)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, leaf in got:
        if path in want and tuple(leaf.shape) != tuple(want[path].shape):
            raise ValueError(
                f"rejuvenate: {jax.tree_util.keystr(path)} has shape {leaf.shape}, the new model "
                f"expects {want[path].shape}; this model's units are not all nr_jax.layers units"
            )
    if len(got) != len(want):
        raise ValueError("rejuvenate: the new model's variables differ from the rejuvenated ones")


class _Slot:
    """Marks a parameter-shaped slot of the optimiser state (a leaf for tree utilities)."""

    __slots__ = ("plan", "old_shape")

    def __init__(self, plan: LeafPlan | None, old_shape: tuple[int, ...]) -> None:
        self.plan, self.old_shape = plan, old_shape


_NON_PARAM = object()


def _new_opt_state(
    tx: optax.GradientTransformation,
    opt_state: Any,
    old_params: dict,
    new_params: dict,
    leaf_plans: Mapping[tuple[str, ...], LeafPlan],
) -> tuple[list[Any], Any, list[int]]:
    """Optimiser state for the new params: survivors' slots carried, new slots zero.

    `new_params` may hold jobs (anything with `shape` and `dtype`). Returns the new state's
    leaves (jobs for the slots that follow their parameter's plan), its treedef, and the
    indices of the leaves that must take `tx.init(new_params)`'s value.
    """

    def is_masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    paths = jax.tree_util.tree_flatten_with_path(old_params)[0]
    plan_leaves = [
        _Slot(leaf_plans.get(tuple(str(k.key) for k in path)), tuple(np.shape(leaf)))
        for path, leaf in paths
    ]
    slots = jax.tree.unflatten(jax.tree.structure(old_params), plan_leaves)
    shapes = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype)
            if _is_job(x)
            else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
        ),
        new_params,
    )
    template = jax.eval_shape(tx.init, shapes)  # no arrays allocated, nothing compiled
    labels = optax.tree_map_params(
        tx,
        lambda leaf, slot: leaf if is_masked(leaf) else slot,
        opt_state,
        slots,
        transform_non_params=lambda _: _NON_PARAM,
        is_leaf=lambda x: is_masked(x) or isinstance(x, _Slot),
    )
    is_label = lambda x: isinstance(x, _Slot) or x is _NON_PARAM  # noqa: E731
    label_leaves = jax.tree.leaves(labels, is_leaf=is_label)
    old_leaves = jax.tree.leaves(opt_state)
    new_leaves, treedef = jax.tree.flatten(template)
    if not len(label_leaves) == len(old_leaves) == len(new_leaves):
        raise ValueError(
            "rejuvenate: opt_state does not have the structure of tx.init(params); "
            "was it made by another optimiser or model?"
        )
    out: list[Any] = []
    fresh: list[int] = []  # leaves that take tx.init(new_params)'s value
    for label, old, init in zip(label_leaves, old_leaves, new_leaves, strict=True):
        old_shape = tuple(np.shape(old))
        if label is _NON_PARAM:
            keep = old_shape == tuple(init.shape)  # counters and λ are kept
        elif (
            label.plan is None
            or old_shape != label.old_shape
            or label.plan.shape(old_shape) != tuple(init.shape)
        ):
            keep = old_shape == tuple(init.shape) and label.plan is None  # else factored stats
        else:
            out.append(_Gather(np.asarray(old), label.plan, 0))
            continue
        if not keep:
            fresh.append(len(out))
        out.append(old)
    return out, treedef, fresh
