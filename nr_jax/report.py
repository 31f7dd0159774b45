"""What a rejuvenation returns: the new trees and a report for logs and checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn

from nr_jax.graph import ChannelGraph
from nr_jax.live import Counts

__all__ = ["Rejuvenation", "RejuvenationReport"]


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
    """Result of `rejuvenate` and `apply_plan`."""

    model: nn.Module
    variables: dict[str, Any]
    opt_state: Any
    graph: ChannelGraph
    report: RejuvenationReport
