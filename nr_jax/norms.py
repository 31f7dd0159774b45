"""Normalisation over channel groups (GroupNorm, LayerNorm) whose groups survive rejuvenation.

BatchNorm normalises every channel on its own, so dropping a dead channel leaves the survivors'
outputs untouched. GroupNorm (statistics over H, W and the channels of a group) and LayerNorm
(statistics over the channels at each position) do not: a survivor's mean and variance include
the channels that died with it, so dropping them changes the survivors (measured by
`nr_jax.criteria.survivor_shift`), and new channels placed in a survivor's group would change it
again. `GroupedNorm` therefore takes its groups as explicit static sizes over contiguous channels,
and `regroup` gives the groups after rejuvenation: each old group keeps its survivors (empty ones
vanish), and the new channels get groups of their own, so they never disturb the survivors.

The group sizes are the `norm_groups` of a unit (`nr_jax.layers.UnitWidth`, `NRConv`,
`NRDense`); None means the default grouping (`default_groups`). `normalize` is the statistics
step alone, shared with the compact export (`nr_jax.compact.GroupNormalize`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# "batch": BatchNorm (its submodule "bn"); "group", "layer": `GroupedNorm` (submodule "norm");
# None: no normalisation, the unit has a bias instead
NORMS = ("batch", "group", "layer", None)
EPSILON = 1e-5


def check_norm(norm: Any, where: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{where}: norm must be one of {NORMS}, got {norm!r}")


def near_equal(total: int, parts: int) -> tuple[int, ...]:
    """`total` channels in `parts` contiguous groups whose sizes differ by at most one."""
    parts = max(1, min(parts, total))
    q, r = divmod(total, parts)
    return tuple(q + 1 if i < r else q for i in range(parts))


def default_groups(norm: str | None, features: int, num_groups: int) -> tuple[int, ...] | None:
    """The groups of a fresh unit: LayerNorm one group; GroupNorm `num_groups` near-equal groups
    (fewer when there are fewer channels); None for BatchNorm and no normalisation."""
    if norm == "layer":
        return (features,)
    if norm == "group":
        return near_equal(features, num_groups)
    return None


def regroup(
    norm: str | None, groups: Sequence[int] | None, kept: Sequence[int], d_out: int
) -> tuple[int, ...] | None:
    """The groups after rejuvenation: survivors in their old groups, new channels apart.

    Args:
      norm: the unit's normalisation (`NORMS`).
      groups: the old group sizes (summing to the old width), None for "batch" / None.
      kept: old indices of the surviving channels, ascending (placed first, in this order).
      d_out: the new width; channels `len(kept):` are new.

    Returns:
      The new group sizes (summing to `d_out`): for every old group the number of its
      survivors (groups without one are dropped), then the new channels: one group for
      LayerNorm, near-equal groups of about the old mean group size for GroupNorm.
    """
    if norm not in ("group", "layer"):
        return None
    bounds = np.cumsum([0, *groups])
    counts = np.histogram(np.asarray(kept, np.int64), bins=bounds)[0] if len(kept) else []
    out = [int(c) for c in counts if c]
    new = d_out - len(kept)
    if new > 0:
        size = sum(groups) / len(groups)
        out += near_equal(new, 1 if norm == "layer" else max(1, round(new / size)))
    return tuple(out)


def _runs(groups: Sequence[int]) -> list[tuple[int, int]]:
    """(size, count) of every run of consecutive equal group sizes."""
    return [(size, len(list(run))) for size, run in itertools.groupby(groups)]


def normalize(x: Array, groups: Sequence[int], spatial: bool, epsilon: float = EPSILON) -> Array:
    """x normalised over each contiguous channel group, without the affine map (float32).

    Args:
      x: activations (B, ..., C).
      groups: group sizes in channel order (sum = C, each >= 1; checked by the caller).
      spatial: statistics also over the spatial axes (GroupNorm); False: at each position over
        the group's channels only (LayerNorm over channels).
      epsilon: added to the variance.

    Returns:
      float32 (B, ..., C): every group at zero mean and unit variance (biased variance).
    """
    xf = x.astype(jnp.float32)
    axes_spatial = tuple(range(1, x.ndim - 1)) if spatial else ()
    parts, start = [], 0
    for size, count in _runs(groups):  # equal sizes: one reshape for the whole run
        block = xf[..., start : start + size * count]
        g = block.reshape(*block.shape[:-1], count, size)
        axes = (*axes_spatial, g.ndim - 1)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        parts.append(((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(block.shape))
        start += size * count
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


class GroupedNorm(nn.Module):
    """Normalisation over contiguous channel groups of any sizes, then a per-channel affine.

    Attributes:
      groups: group sizes in channel order (sum = channels).
      spatial: statistics also over the spatial axes (GroupNorm); False: at each position over
        the group's channels only (LayerNorm over channels, as in ConvNeXt and Transformers).
      epsilon: added to the variance.
      scale_init: initial scale γ (the liveness indicator of `nr_jax.criteria.NormScale`).
      dtype: output dtype (None: float32); statistics are always float32.
    """

    groups: tuple[int, ...]
    spatial: bool = True
    epsilon: float = EPSILON
    scale_init: Callable[..., Array] = nn.initializers.ones
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, ..., C) -> (B, ..., C), every group normalised to zero mean, unit variance."""
        d = x.shape[-1]
        if sum(self.groups) != d or min(self.groups, default=1) < 1:
            raise ValueError(
                f"GroupedNorm {self.name}: group sizes {self.groups} must be >= 1 and sum to the "
                f"{d} channels"
            )
        scale = self.param("scale", self.scale_init, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        y = normalize(x, self.groups, self.spatial, self.epsilon)
        shape = (1,) * (y.ndim - 1) + (d,)
        return (y * scale.reshape(shape) + bias.reshape(shape)).astype(self.dtype or jnp.float32)
