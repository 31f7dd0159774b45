"""Channel provenance tracking used while a model is traced by `nr_jax.channel_graph`.

While `channel_graph` traces a model (under `jax.eval_shape`, so nothing is computed), every
NR layer and helper in `nr_jax.layers` tells the active tracker which channels its output is made
of. Outside that trace the tracker is inactive and every hook is a no-op, so a jitted train step
pays nothing for it.

A *source* describes the channel axis of one activation as a tuple of segments, in channel order.
Each segment is `(producers, start, stop)`: channels `[start, stop)` of the output of
`producers`, a frozenset of unit names whose outputs are summed into these channels (one name for
a plain unit output, several for a residual sum; `"input"` for the network input). After
rejuvenation a concatenation lists every producer twice: its survivors first, its new channels
after the survivors of all producers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

INPUT = "input"

Segment = tuple[frozenset[str], int, int]
Source = tuple[Segment, ...]


@dataclasses.dataclass
class UnitRecord:
    """What one unit call told the tracker."""

    name: str
    kind: str  # "conv" or "classifier"
    source: Source
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    out_hw: tuple[int, int]
    fixed: bool
    in_split: int | None
    out_split: int | None
    scheme: str = "removed"
    norm: str | None = "batch"  # "batch", "group", "layer" or None (`nr_jax.norms.NORMS`)
    norm_groups: tuple[int, ...] | None = None  # GroupNorm / LayerNorm group sizes
    dense: bool = False  # an `NRDense` unit (kernel [D_in, D_out])


class Tracker:
    """Maps traced activations (by identity) to their channel source."""

    def __init__(self) -> None:
        self._sources: dict[int, tuple[Any, Source]] = {}
        self.units: list[UnitRecord] = []
        self.ties: list[frozenset[str]] = []

    def tag(self, x: Any, source: Source) -> None:
        # The array itself is kept alive so that its id() is never reused during the trace.
        self._sources[id(x)] = (x, source)

    def source_of(self, x: Any, consumer: str) -> Source:
        entry = self._sources.get(id(x))
        if entry is None:
            raise ValueError(
                f"channel_graph: the input of unit {consumer!r} was produced by an operation the "
                "channel graph cannot follow. Route activations between NR units only through "
                "nr_jax.layers (NRConv, NRClassifier, max_pool, avg_pool, relu, add, concat, "
                "identity), or apply elementwise functions through `nr_jax.layers.passthrough`."
            )
        return entry[1]


_ACTIVE: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("nr_tracker", default=None)


def active() -> Tracker | None:
    """The tracker of the `channel_graph` trace in progress, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def tracking() -> Iterator[Tracker]:
    tracker = Tracker()
    token = _ACTIVE.set(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.reset(token)


def passthrough(x: Any, y: Any) -> Any:
    """Declares that `y` has the same channels as `x` (pooling, activations, dropout...)."""
    tracker = active()
    if tracker is not None:
        tracker.tag(y, tracker.source_of(x, "<passthrough>"))
    return y


def add_sources(sources: Sequence[Source]) -> Source:
    """Source of an elementwise sum: each channel is the sum of the same channel of every input."""
    widths = {width(s) for s in sources}
    if len(widths) != 1:
        raise ValueError(f"nr_jax.layers.add: inputs have different channel counts {widths}")
    if any(len(s) != 1 or s[0][1] != 0 for s in sources):
        raise ValueError(
            "nr_jax.layers.add: summing concatenated activations is not supported by the channel "
            "graph; sum unit outputs (or sums of them) instead."
        )
    producers = frozenset().union(*(s[0][0] for s in sources))
    return ((producers, 0, widths.pop()),)


def width(source: Source) -> int:
    return sum(stop - start for _, start, stop in source)


def concat_sources(sources: Sequence[Source], splits: Sequence[int] | None = None) -> Source:
    """Source of a channel concatenation, in the given order.

    With `splits` (survivor count per input) the layout is [survivors of every input, new
    channels of every input], the channel layout after rejuvenation.
    """
    if splits is None:
        return merge_segments([seg for s in sources for seg in s])
    if any(len(s) != 1 for s in sources):
        raise ValueError("nr_jax.layers.concat with splits needs unit outputs as inputs")
    old = [(s[0][0], s[0][1], s[0][1] + k) for s, k in zip(sources, splits, strict=True)]
    new = [(s[0][0], s[0][1] + k, s[0][2]) for s, k in zip(sources, splits, strict=True)]
    return merge_segments(old + new)


def merge_segments(segments: Sequence[Segment]) -> Source:
    """Drops empty segments and merges contiguous neighbours of the same producers."""
    out: list[Segment] = []
    for seg in segments:
        if seg[2] <= seg[1]:
            continue
        if out and out[-1][0] == seg[0] and out[-1][2] == seg[1]:
            out[-1] = (seg[0], out[-1][1], seg[2])
        else:
            out.append(seg)
    return tuple(out)
