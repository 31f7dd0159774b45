"""A model's static per-unit widths: `UnitWidth` and the hashable `WidthSpec` of a model.

Models take a `widths: WidthSpec` field and build their units from it (`nr_jax.layers.conv_unit`,
`dense_unit`, `classifier_unit`), so that `nr_jax.rejuvenate` can return
`model.clone(widths=new_spec)`; checkpoints store it as JSON (`WidthSpec.to_json`).
"""

from __future__ import annotations

import dataclasses
import json

__all__ = ["UnitWidth", "WidthSpec"]


@dataclasses.dataclass(frozen=True)
class UnitWidth:
    """Static width of one unit: output channels and, after rejuvenation, split points.

    `norm_groups`: the channel group sizes of a GroupNorm / LayerNorm unit after rejuvenation
    (survivors in their old groups, new channels apart: `nr_jax.norms.regroup`); None for the
    unit's default groups (and for BatchNorm or no normalisation).
    """

    features: int
    in_split: int | None = None
    out_split: int | None = None
    norm_groups: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class WidthSpec:
    """Per-unit widths that override a model's defaults; hashable, JSON round-trips.

    An empty spec means "the architecture's default widths". `nr_jax.rejuvenate` fills it with
    every unit's new width and split points.
    """

    entries: tuple[tuple[str, UnitWidth], ...] = ()

    def get(self, name: str, features: int) -> UnitWidth:
        for key, value in self.entries:
            if key == name:
                return value
        return UnitWidth(features)

    def as_dict(self) -> dict[str, UnitWidth]:
        return dict(self.entries)

    def plain(self) -> WidthSpec:
        """The same widths without split points: an ordinary network (one classifier, no
        old/new blocks), as the slimming control and `nr_jax.merge` build. GroupNorm / LayerNorm
        groups are kept (regrouping would change the function)."""
        plain = {k: dataclasses.replace(v, in_split=None, out_split=None) for k, v in self.entries}
        return WidthSpec(tuple(plain.items()))

    @classmethod
    def from_dict(cls, widths: dict[str, UnitWidth]) -> WidthSpec:
        return cls(tuple(sorted(widths.items())))

    def to_json(self) -> str:
        return json.dumps({k: dataclasses.asdict(v) for k, v in self.entries}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WidthSpec:
        widths = {}
        for k, v in json.loads(text).items():
            groups = v.get("norm_groups")
            widths[k] = UnitWidth(**{**v, "norm_groups": None if groups is None else tuple(groups)})
        return cls.from_dict(widths)
