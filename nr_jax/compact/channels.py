"""Which channels an exported network keeps: the live ones, read from the masks and the graph.

A unit keeps its unmasked output channels (a residual stream: the channels any of its units
leaves unmasked); a consumer keeps the input rows that read kept channels. A GroupNorm /
LayerNorm unit also computes the masked channels that share a group with a kept one
(`statistics_channels`): the training form masks a channel after its normalisation, so its
pre-normalisation response still counts in its group's mean and variance.
"""

from __future__ import annotations

import numpy as np

from nr_jax.graph import INPUT, ChannelGraph, Unit
from nr_jax.layers import MASKS, UnitWidth, WidthSpec

__all__ = [
    "compact_widths",
    "group_layout",
    "kept_inputs",
    "kept_outputs",
    "statistics_channels",
    "unit_mask",
]


def unit_mask(flat: dict, u: Unit) -> np.ndarray:
    """The unit's channel mask, shape (D_out,) (ones without masks), checked to be 0/1.

    Args: flat: the variables as numpy arrays keyed by path. u: the unit.
    """
    mask = flat.get((MASKS, *u.path, "mask"))
    if mask is None:
        return np.ones((u.out_channels,), np.float32)
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"export: the mask of unit {u.name} holds values other than 0 and 1")
    return mask


def kept_outputs(graph: ChannelGraph, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output channels the exported network keeps (bool (D_out,) per unit): unmasked, or live in
    the unit's stream.

    A residual stream keeps a channel that any of its units leaves unmasked (the sum is not zero
    there); one summed with the network input keeps every channel.
    """
    with_input = {p for u in graph.all_units for ps, _, _ in u.inputs if INPUT in ps for p in ps}
    keep = {}
    for u in graph.units:
        group = sorted(graph.ties[u.tie]) if u.tie is not None else [u.name]
        if with_input & set(group):
            keep[u.name] = np.ones((u.out_channels,), bool)
        else:
            keep[u.name] = np.any([masks[n] != 0 for n in group], axis=0)
        masked = masks[u.name] == 0
        if not masked.all() and np.any(masked & keep[u.name]):
            raise ValueError(
                f"export: unit {u.name} masks some channels that its residual stream keeps; "
                "only a whole unit can be masked there"
            )
    return keep


def kept_inputs(u: Unit, keep_out: dict[str, np.ndarray]) -> np.ndarray:
    """The unit's input channels that the exported network keeps (bool (D_in,)), in the unit's
    input order."""
    parts = []
    for producers, start, stop in u.inputs:
        if INPUT in producers:
            parts.append(np.ones((stop - start,), bool))
        else:
            parts.append(np.any([keep_out[p][start:stop] for p in sorted(producers)], axis=0))
    return np.concatenate(parts) if parts else np.ones((u.in_channels,), bool)


def statistics_channels(u: Unit, keep: np.ndarray) -> np.ndarray:
    """The channels a unit's linear part computes (bool (D_out,)): the kept ones, and for a
    GroupNorm / LayerNorm unit every channel of a group that holds a kept one."""
    if u.norm_groups is None:
        return keep
    bounds = np.cumsum([0, *u.norm_groups])
    computed = keep.copy()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if keep[lo:hi].any():
            computed[lo:hi] = True
    return computed


def group_layout(u: Unit, computed: np.ndarray, keep: np.ndarray):
    """The unit's groups over its computed channels (empty ones dropped), and the positions of
    the kept channels among them (None when every computed channel is kept).

    Returns: (group sizes, keep positions or None).
    """
    bounds = np.cumsum([0, *u.norm_groups])
    sizes = [int(computed[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    positions = np.flatnonzero(keep[computed])
    whole = len(positions) == int(computed.sum())
    return tuple(s for s in sizes if s), None if whole else tuple(int(i) for i in positions)


def compact_widths(graph: ChannelGraph, keep_in: dict, keep_out: dict) -> WidthSpec:
    """Every unit at its live width; split points counted among the live channels."""
    below = lambda keep, split: None if split is None else int(keep[:split].sum())  # noqa: E731
    entries = {}
    for u in graph.all_units:
        features = int(keep_out[u.name].sum()) if u.kind == "conv" else u.out_channels
        out_split = below(keep_out[u.name], u.out_split) if u.kind == "conv" else None
        entries[u.name] = UnitWidth(features, below(keep_in[u.name], u.in_split), out_split)
    return WidthSpec.from_dict(entries)
