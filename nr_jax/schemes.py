"""How a unit's old and new channels mix after rejuvenation: its `scheme` (method.md 4.2).

After rejuvenation every channel axis is laid out [survivors, new] and a unit
(`nr_jax.layers.NRConv`, `NRDense`) carries its split points `in_split` (L_in) and `out_split`
(L_out). `mix` computes the unit's linear map (a convolution, or a matmul) under its scheme:

* scheme ``"removed"`` (cross connections removed, method.md 4.2, CIFAR): the forward pass slices
  the kernel statically into the two blocks it uses, old->old `W[:, :, :L_in, :L_out]` and
  new->new `W[:, :, L_in:, L_out:]`, and runs two convolutions. The cross blocks are stored as
  zeros and receive no gradient. Where a unit has no new input channels (the stem, or a unit fed
  only by units that did not grow), its new outputs read all inputs through `W[:, :, :, L_out:]`.
* scheme ``"attention"`` (cross-attention, method.md 4.2, ImageNet): old = ll + 2σ(ll)·lr and
  new = rr + 2σ(rr)·rl, with ll, rl from one convolution of the old inputs over `W[:, :, :L_in]`
  and lr, rr from one convolution of the new inputs over `W[:, :, L_in:]` (two convolutions at
  the dense FLOPs instead of the official four). The cross blocks start at zero, so old outputs
  are unchanged at rejuvenation time. A unit without new (or without old) inputs is a plain conv.
* scheme ``"attention4"``: the same cross-attention computed as the official code does, with four
  block convolutions (kept to measure the choice; see `experiments/benchmark`).
* scheme ``"dense"``: one full convolution over the whole kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SCHEMES", "SPLIT_MIN_GROUP", "Linear", "mix"]

Array = jax.Array
SCHEMES = ("removed", "attention", "attention4", "dense")
# Narrowest channel block that the removed scheme runs as its own convolution (`_removed`).
SPLIT_MIN_GROUP = 2

Linear = Callable[[Array, Array], Array]  # (x (..., D_in), kernel (..., D_in, D_out)) -> y


def mix(unit: Any, linear: Linear, x: Array, kernel: Array) -> Array:
    """The unit's linear map under its scheme and split points (method.md 4.2)."""
    l_in, l_out, d_in = unit.in_split, unit.out_split, x.shape[-1]
    if unit.scheme == "dense" or l_out is None:
        return linear(x, kernel)
    if l_in is None or not 0 <= l_in <= d_in or not 0 <= l_out <= unit.features:
        raise ValueError(
            f"{type(unit).__name__} {unit.name}: split points must satisfy 0 <= in_split <= "
            f"{d_in} and 0 <= out_split <= {unit.features}; got in_split={l_in}, out_split={l_out}"
        )
    if unit.scheme in ("attention", "attention4"):
        return _attention(unit, linear, x, kernel, l_in, l_out)
    return _removed(unit, linear, x, kernel, l_in, l_out)


def _removed(unit: Any, linear: Linear, x: Array, kernel: Array, l_in: int, l_out: int) -> Array:
    """Cross connections removed: old outputs read old inputs, new outputs new inputs.

    With no new input, new outputs read the survivors (one dense convolution); with no
    survivor input, old outputs get no signal (only their BN bias). A layer with a block
    narrower than `SPLIT_MIN_GROUP` channels (default 2: a single channel) runs as one
    convolution whose cross blocks are zeroed, with the same outputs and gradients; measured
    on the CPU, that took the rejuvenated `resnet_fmnist` step from 1.14 to 1.06 of the dense
    one, while wider thresholds slowed ResNet-20 (4 and 8) and the small VGG (8).
    """
    d_in, d_out = x.shape[-1], unit.features
    if l_in == d_in:
        return linear(x, kernel)
    blocks = [(a, b) for a, b in ((l_in, l_out), (d_in - l_in, d_out - l_out)) if a and b]
    if l_in == 0 or min(min(b) for b in blocks) < SPLIT_MIN_GROUP:
        mask = (jnp.arange(d_in) < l_in)[:, None] == (jnp.arange(d_out) < l_out)[None, :]
        mask = mask.astype(kernel.dtype).reshape((1,) * (kernel.ndim - 2) + mask.shape)
        return linear(x, kernel * mask)
    parts = []
    if l_out > 0:
        parts.append(linear(x[..., :l_in], kernel[..., :l_in, :l_out]))
    if l_out < d_out:
        parts.append(linear(x[..., l_in:], kernel[..., l_in:, l_out:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _attention(unit: Any, linear: Linear, x: Array, kernel: Array, l_in: int, l_out: int) -> Array:
    if l_in in (0, x.shape[-1]) or l_out in (0, unit.features):
        return linear(x, kernel)  # no second group to attend to
    x_o, x_n = x[..., :l_in], x[..., l_in:]
    if unit.scheme == "attention4":
        ll = linear(x_o, kernel[..., :l_in, :l_out])
        rl = linear(x_o, kernel[..., :l_in, l_out:])
        lr = linear(x_n, kernel[..., l_in:, :l_out])
        rr = linear(x_n, kernel[..., l_in:, l_out:])
    else:
        from_old = linear(x_o, kernel[..., :l_in, :])  # [ll, rl]
        from_new = linear(x_n, kernel[..., l_in:, :])  # [lr, rr]
        ll, rl = from_old[..., :l_out], from_old[..., l_out:]
        lr, rr = from_new[..., :l_out], from_new[..., l_out:]
    old = ll + 2.0 * jax.nn.sigmoid(ll) * lr
    new = rr + 2.0 * jax.nn.sigmoid(rr) * rl
    return jnp.concatenate([old, new], axis=-1)
