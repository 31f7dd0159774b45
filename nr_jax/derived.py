"""The rejuvenated network's structure, derived from a plan without tracing the new model.

`derived_graph(graph, plan)` is the channel graph and `derived_widths(graph, plan)` the static
widths (`nr_jax.WidthSpec`) of the model `nr_jax.apply_plan` returns: the same structure, every
unit at its planned width, its channel axes laid out [survivors, new] (method.md sections 3-4).
`apply_plan(..., check=True)` and the tests compare them with a trace of the new model.
"""

from __future__ import annotations

import dataclasses

from nr_jax import norms
from nr_jax.graph import INPUT, ChannelGraph
from nr_jax.layers import UnitWidth, WidthSpec
from nr_jax.planning import Plan
from nr_jax.tracing import merge_segments

__all__ = ["derived_graph", "derived_widths"]


def derived_graph(graph: ChannelGraph, plan: Plan) -> ChannelGraph:
    """The graph of the rejuvenated model, without tracing it: same structure, new widths.

    Input segments follow the layout the layers build: a single producer keeps one segment over
    its whole new width; a concatenation lists every producer's survivors, then every
    producer's new channels (`nr_jax.layers.concat(..., splits=...)`).
    """
    units = []
    for u in graph.all_units:
        p = plan[u.name]
        segs = []
        for producers, start, stop in u.inputs:
            if INPUT in producers:
                segs.append(((producers, start, stop), None))
            else:
                q = plan[sorted(producers)[0]]
                segs.append(((producers, 0, q.d_out), len(q.out_src)))
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
                norm_groups=norms.regroup(u.norm, u.norm_groups, p.out_src, p.d_out)
                if conv
                else u.norm_groups,
            )
        )
    convs = tuple(x for x in units if x.kind == "conv")
    head = next((x for x in units if x.kind == "classifier"), None)
    return ChannelGraph(convs, head, graph.ties, graph.input_shape)


def derived_widths(graph: ChannelGraph, plan: Plan) -> WidthSpec:
    """The static widths of the rejuvenated model (`model.clone(widths=...)`): every unit's new
    width and split points, a GroupNorm / LayerNorm unit's new groups (`nr_jax.norms.regroup`)."""
    entries = {}
    for u in graph.all_units:
        p = plan[u.name]
        if u.kind == "conv":
            groups = norms.regroup(u.norm, u.norm_groups, p.out_src, p.d_out)
            entries[u.name] = UnitWidth(p.d_out, len(p.in_src), len(p.out_src), groups)
        else:
            entries[u.name] = UnitWidth(u.out_channels, len(p.in_src), None)
    return WidthSpec.from_dict(entries)
