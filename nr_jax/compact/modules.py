"""The plain Flax modules an exported network is made of, beside `nn.Conv` and `nn.Dense`.

Each computes one NR unit's live channels (or a part of it) with ordinary layers: `Bias` (a unit
without live inputs), `BlockConv` (a split unit of the "removed" scheme: one convolution per block
it uses), `CrossAttention` (a split unit of the "attention" scheme, with its gate),
`GroupNormalize` (a GroupNorm / LayerNorm over explicit channel groups, which cannot be folded)
and `Normalized` (a linear part followed by its `GroupNormalize`). Every parameter starts at zero:
its values come from `nr_jax.export`, and zeros also fit empty shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nr_jax import norms

__all__ = [
    "Bias",
    "BlockConv",
    "CrossAttention",
    "GroupNormalize",
    "Normalized",
    "linear",
    "output_shape",
]

Array = jax.Array
_zeros = nn.initializers.zeros_init()


def output_shape(x: Array, features: int, kernel: tuple[int, int], strides: tuple[int, int]):
    """Output shape of an NR unit on x: (B, H', W', features) for a convolution (symmetric
    padding k // 2, `nr_jax.ops.padding`), (B, features) for a dense unit (x of rank 2)."""
    if x.ndim == 2:
        return (x.shape[0], features)
    hw = zip(x.shape[1:3], kernel, strides, strict=True)
    return (x.shape[0], *((n + 2 * (k // 2) - k) // s + 1 for n, k, s in hw), features)


def linear(dense: bool, features: int, kernel, strides, **kw: Any) -> nn.Module:
    """`nn.Dense` (a dense unit) or `nn.Conv` with the NR unit's padding; `kw` as theirs
    (`use_bias`, `name`, `parent`)."""
    if dense:
        return nn.Dense(features, kernel_init=_zeros, bias_init=_zeros, **kw)
    pad = tuple((k // 2, k // 2) for k in kernel)
    return nn.Conv(
        features, kernel, strides, padding=pad, kernel_init=_zeros, bias_init=_zeros, **kw
    )


def _channel_vector(module: nn.Module, name: str, y: Array) -> Array:
    """A per-channel parameter of `module` shaped to broadcast against y (B, ..., C)."""
    v = module.param(name, _zeros, (y.shape[-1],))
    return v.reshape((1,) * (y.ndim - 1) + (-1,))


class Bias(nn.Module):
    """A unit without input channels: its bias at every output position.

    Attributes: features: output channels. kernel, strides: of the convolution it stands for.
    """

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, any) -> (B, H', W', features); (B, any) -> (B, features)."""
        bias = self.param("bias", _zeros, (self.features,))
        return jnp.broadcast_to(bias, output_shape(x, self.features, self.kernel, self.strides))


class BlockConv(nn.Module):
    """A split unit without cross connections (method.md 4.2, scheme "removed"): two convolutions.

    Old outputs (the first `out_split`) read the old inputs (the first `in_split`) through the
    child "old"; new outputs read the new inputs through "new". A block without output channels
    is absent; one without input channels is its `Bias` (zeros, without parameters, when the
    unit has no bias: its GroupNorm / LayerNorm follows).

    Attributes: features: output channels. in_split, out_split: live survivors among the inputs
    and outputs. kernel, strides: of the unit. use_bias: whether each block adds a bias.
    """

    features: int
    in_split: int
    out_split: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', features), [old, new] outputs."""
        blocks = (
            ("old", x[..., : self.in_split], self.out_split),
            ("new", x[..., self.in_split :], self.features - self.out_split),
        )
        parts = [self._block(xs, n, name) for name, xs, n in blocks if n > 0]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def _block(self, xs: Array, features: int, name: str) -> Array:
        if xs.shape[-1]:
            dense = xs.ndim == 2
            conv = linear(
                dense, features, self.kernel, self.strides, use_bias=self.use_bias, name=name
            )
            return conv(xs)
        if self.use_bias:
            return Bias(features, self.kernel, self.strides, name=name)(xs)
        return jnp.zeros(output_shape(xs, features, self.kernel, self.strides), xs.dtype)


class CrossAttention(nn.Module):
    """A split unit with cross-attention (method.md 4.2), then its per-channel affine map.

    "from_old" convolves the old inputs into [ll, rl], "from_new" the new inputs into [lr, rr]
    (no bias; a child is absent when its inputs are, its output then zero);
    old = ll + 2σ(ll)·lr, new = rr + 2σ(rr)·rl, and y = [old, new] · scale + bias. The gate
    reads the pre-normalisation response, so a BatchNorm stays a scale and a bias here; a unit
    without normalisation has its bias only, one with GroupNorm / LayerNorm neither (its
    `GroupNormalize` follows).

    Attributes: features: output channels. in_split, out_split: live survivors among the inputs
    and outputs. kernel, strides: of the unit. use_scale, use_bias: the affine map's parts.
    """

    features: int
    in_split: int
    out_split: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', features)."""
        zero = jnp.zeros(output_shape(x, self.features, self.kernel, self.strides), x.dtype)

        def conv(xs: Array, name: str) -> Array:
            if not xs.shape[-1]:
                return zero
            dense = xs.ndim == 2
            return linear(
                dense, self.features, self.kernel, self.strides, use_bias=False, name=name
            )(xs)

        from_old = conv(x[..., : self.in_split], "from_old")
        from_new = conv(x[..., self.in_split :], "from_new")
        k = self.out_split
        ll, rl, lr, rr = from_old[..., :k], from_old[..., k:], from_new[..., :k], from_new[..., k:]
        y = jnp.concatenate(
            [ll + 2.0 * jax.nn.sigmoid(ll) * lr, rr + 2.0 * jax.nn.sigmoid(rr) * rl], axis=-1
        )
        if self.use_scale:
            y = y * _channel_vector(self, "scale", y)
        if self.use_bias:
            y = y + _channel_vector(self, "bias", y)
        return y


class GroupNormalize(nn.Module):
    """GroupNorm / LayerNorm over explicit channel groups (`nr_jax.norms.GroupedNorm`'s
    statistics), then a scale and a bias per kept channel.

    The statistics span every input channel, in `groups`; `keep` then selects the channels that
    go on (the others only take part in their group's statistics: channels masked in the
    training form, whose pre-normalisation response still counts there).

    Attributes:
      groups: group sizes over the input channels, in channel order.
      spatial: statistics also over the spatial axes (GroupNorm); False: at each position
        (LayerNorm over channels).
      keep: indices of the output channels among the input channels, ascending; None: all.
    """

    groups: tuple[int, ...]
    spatial: bool = True
    keep: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, ..., C) -> (B, ..., len(keep)) (C without `keep`), float32."""
        if sum(self.groups) != x.shape[-1]:
            raise ValueError(
                f"GroupNormalize {self.name}: group sizes {self.groups} must sum to the "
                f"{x.shape[-1]} input channels"
            )
        y = norms.normalize(x, self.groups, self.spatial)
        if self.keep is not None:
            y = y[..., np.asarray(self.keep, np.int32)]
        return y * _channel_vector(self, "scale", y) + _channel_vector(self, "bias", y)


class Normalized(nn.Module):
    """A unit's linear part ("linear": `nn.Conv`, `nn.Dense`, `BlockConv` or `CrossAttention`,
    without bias), then its `GroupNormalize` ("norm").

    Attributes: linear, norm: the two modules, unbound (`parent=None`): they become children.
    """

    linear: nn.Module
    norm: GroupNormalize

    def __call__(self, x: Array) -> Array:
        """x: (B, ..., D_in) -> (B, ..., kept output channels)."""
        return self.norm(self.linear(x))
