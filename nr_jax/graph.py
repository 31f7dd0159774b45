"""The channel graph: which channels each unit reads, which units are fixed or tied.

`channel_graph(model, input_shape)` traces the model once (abstractly, under `jax.eval_shape`)
and records, for every NR unit in forward order, where its input channels come from
(concatenations and residual sums included), its kernel, stride and output size, and whether it is
fixed (method.md 2.3). It is the one declarative description of the network that liveness,
utilisation, the L1 transform and rejuvenation read; no layer re-implements any of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import tracing
from nr_jax.tracing import INPUT, Segment

__all__ = ["INPUT", "ChannelGraph", "Segment", "Unit", "channel_graph"]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One NR unit (or the classifier) as seen by the channel graph.

    Attributes:
      name: "/"-joined module path; also the key of its parameters.
      kind: "conv" or "classifier".
      inputs: input channel segments `(producers, start, stop)` in channel order.
      in_channels: D_in. out_channels: D_out (classes for the classifier).
      kernel: (k_h, k_w). strides: (s_h, s_w). out_hw: output spatial size (H_out, W_out).
      fixed: outputs always live, no L1 on γ (always True for the classifier).
      in_split, out_split: split points after rejuvenation (None before).
      tie: index into `ChannelGraph.ties` of the residual stream the unit writes to, or None.
      scheme: how old and new channels mix ("removed", "attention" or "dense").
      norm: the unit's normalisation, "batch", "group", "layer" or None (`nr_jax.norms.NORMS`;
        "batch" for the classifier, which has none).
      norm_groups: channel group sizes of a GroupNorm / LayerNorm unit, else None.
      dense: an `NRDense` unit (kernel [D_in, D_out], kernel and out_hw (1, 1)); a conv unit
        otherwise. Both are of kind "conv": the graph, liveness and surgery treat them alike.
    """

    name: str
    kind: str
    inputs: tuple[Segment, ...]
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    out_hw: tuple[int, int]
    fixed: bool
    in_split: int | None
    out_split: int | None
    tie: int | None
    scheme: str = "removed"
    norm: str | None = "batch"
    norm_groups: tuple[int, ...] | None = None
    dense: bool = False

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("/"))

    @property
    def scale_path(self) -> tuple[str, ...] | None:
        """Parameter path of the unit's normalisation scale γ, or None (no normalisation)."""
        if self.kind != "conv" or self.norm is None:
            return None
        return (*self.path, "bn" if self.norm == "batch" else "norm", "scale")

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Shape of the unit's kernel: [k_h, k_w, D_in, D_out], or [D_in, D_out] when dense."""
        lead = () if self.dense or self.kind == "classifier" else self.kernel
        return (*lead, self.in_channels, self.out_channels)

    @property
    def weights(self) -> int:
        """Allocated weights, k*k*D_in*D_out (method.md 2.1)."""
        return self.kernel[0] * self.kernel[1] * self.in_channels * self.out_channels

    @property
    def macs(self) -> int:
        """Allocated multiply-accumulates: weights x output positions (method.md 2.1)."""
        return self.weights * self.out_hw[0] * self.out_hw[1]

    @property
    def effective_weights(self) -> int:
        """Weights that take part in the forward pass (without zero cross blocks, method.md 5.3)."""
        if self.scheme != "removed" or self.out_split is None or self.in_split is None:
            return self.weights
        k2 = self.kernel[0] * self.kernel[1]
        l_in, l_out = self.in_split, self.out_split
        d_in, d_out = self.in_channels, self.out_channels
        new_in = d_in - l_in if l_in < d_in else d_in
        return k2 * (l_in * l_out + new_in * (d_out - l_out))


@dataclasses.dataclass(frozen=True)
class ChannelGraph:
    """Units in forward order, the classifier, residual ties and the traced input shape."""

    units: tuple[Unit, ...]
    classifier: Unit | None
    ties: tuple[frozenset[str], ...]
    input_shape: tuple[int, ...]
    variable_shapes: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {u.name: u for u in self.all_units})

    @property
    def all_units(self) -> tuple[Unit, ...]:
        return self.units + ((self.classifier,) if self.classifier is not None else ())

    def __getitem__(self, name: str) -> Unit:
        try:
            return self._index[name]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(
                f"no unit named {name!r}; units: {[u.name for u in self.units]}"
            ) from None

    @property
    def widths(self) -> dict[str, int]:
        """Output width of every conv unit, in forward order."""
        return {u.name: u.out_channels for u in self.units}

    @property
    def prunable(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if not u.fixed)

    def l1_scale_paths(self) -> frozenset[tuple[str, ...]]:
        """Parameter paths of the normalisation scales that get the L1 pressure (non-fixed
        units with a scale: BatchNorm, and GroupNorm / LayerNorm, `Unit.scale_path`)."""
        return frozenset(u.scale_path for u in self.prunable if u.scale_path is not None)

    @property
    def rejuvenated(self) -> bool:
        return any(u.out_split is not None for u in self.all_units)

    def summary(self) -> str:
        lines = [f"{'unit':<24}{'in':>6}{'out':>6}{'k':>3}{'HxW':>9}  flags"]
        for u in self.all_units:
            flags = []
            if u.fixed and u.kind == "conv":
                flags.append("fixed")
            if u.tie is not None:
                flags.append(f"tie{u.tie}")
            if u.out_split is not None or u.in_split is not None:
                flags.append(f"split(in={u.in_split}, out={u.out_split})")
            if u.kind == "conv" and u.norm != "batch":
                flags.append(f"norm={u.norm}")
            if u.dense:
                flags.append("dense")
            hw = f"{u.out_hw[0]}x{u.out_hw[1]}"
            lines.append(
                f"{u.name:<24}{u.in_channels:>6}{u.out_channels:>6}{u.kernel[0]:>3}{hw:>9}  "
                + " ".join(flags)
            )
        return "\n".join(lines)


def _merge_ties(ties: list[frozenset[str]]) -> tuple[frozenset[str], ...]:
    groups: list[set[str]] = []
    for tie in ties:
        members = set(tie) - {INPUT}
        overlapping = [g for g in groups if g & members]
        for g in overlapping:
            members |= g
            groups.remove(g)
        groups.append(members)
    return tuple(frozenset(g) for g in groups if len(g) > 1 or g)


def channel_graph(
    model: nn.Module, input_shape: tuple[int, ...], *, dtype: Any = jnp.float32
) -> ChannelGraph:
    """Traces `model` once, abstractly, and returns its channel graph.

    Args:
      model: a Linen module built from `nr_jax.layers` units, called as `model(x, train=...)`.
      input_shape: input shape with the batch axis, e.g. (1, 32, 32, 3).
      dtype: input dtype.

    Returns:
      The `ChannelGraph`; `variable_shapes` holds the shapes of `model.init`'s variables.
    """
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (B, H, W, C) with the batch axis, got {input_shape}")
    with tracing.tracking() as tracker:

        def init(x: jax.Array) -> Any:
            tracker.tag(x, ((frozenset([INPUT]), 0, x.shape[-1]),))
            return model.init(jax.random.key(0), x, train=False)

        shapes = jax.eval_shape(init, jax.ShapeDtypeStruct(tuple(input_shape), dtype))
    return _build(tracker, tuple(input_shape), shapes)


def _build(tracker: tracing.Tracker, input_shape: tuple[int, ...], shapes: Any) -> ChannelGraph:
    records = tracker.units
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"a unit was called twice (shared weights are not supported): {names}")
    if not any(r.kind == "conv" for r in records):
        raise ValueError("the model has no nr_jax.layers.NRConv (or NRDense) unit")
    classifiers = [r for r in records if r.kind == "classifier"]
    if len(classifiers) > 1:
        raise ValueError(
            f"at most one NRClassifier is supported, got {[r.name for r in classifiers]}"
        )
    ties = _merge_ties(tracker.ties)
    tie_of: Mapping[str, int] = {n: i for i, g in enumerate(ties) for n in g}
    units = [
        Unit(
            name=r.name,
            kind=r.kind,
            inputs=r.source,
            in_channels=r.in_channels,
            out_channels=r.out_channels,
            kernel=r.kernel,
            strides=r.strides,
            out_hw=r.out_hw,
            fixed=r.fixed,
            in_split=r.in_split,
            out_split=r.out_split,
            tie=tie_of.get(r.name),
            scheme=r.scheme,
            norm=r.norm,
            norm_groups=r.norm_groups,
            dense=r.dense,
        )
        for r in records
    ]
    convs = tuple(u for u in units if u.kind == "conv")
    head = next((u for u in units if u.kind == "classifier"), None)
    return ChannelGraph(convs, head, ties, input_shape, shapes)
