"""The layers a Neural Rejuvenation model is built from.

A *unit* (`NRConv`) is a bias-free convolution followed by BatchNorm, an optional activation and a
per-channel mask, as the official `nr.Conv2d` + `nr.ReLU` (method.md 1.1). Its BN scale γ is the
liveness indicator of its output channels. The classifier (`NRClassifier`) is global average
pooling followed by a dense layer, which equals the official 1x1-conv-then-GAP head.

Beyond the official units (issue 16): a unit's `norm` may also be "group" or "layer" (GroupNorm /
LayerNorm over explicit channel groups, `nr_jax.norms`) or None (no normalisation: the unit has a
bias, conv -> activation), and `NRDense` is the same unit over a dense layer (MLP hidden neurons,
kernel [D_in, D_out]). All of them go through the same channel graph, liveness criteria
(`nr_jax.criteria`), allocation and surgery.

Widths are static module fields. After rejuvenation every channel axis is laid out
[survivors, new] and a unit carries its split points `in_split` (L_in) and `out_split` (L_out);
its `scheme` says how old and new channels mix (`nr_jax.schemes`: cross connections removed,
cross-attention in two or four convolutions, or one dense convolution).

Every helper that moves activations between units (`max_pool`, `avg_pool`, `relu`, `add`,
`concat`, `flatten`, `identity`, `passthrough`: `nr_jax.flow`, re-exported here) is a plain
function at run time; while `nr_jax.channel_graph` traces a model it also records which channels
flow where.

Models take a `widths: WidthSpec` field (hashable, `nr_jax.width_spec`) and build their units
through `conv_unit`, `dense_unit` and `classifier_unit`, so that `nr_jax.rejuvenate` can return
`model.clone(widths=new_spec)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import norms, ops, schemes, tracing

# re-exported: the helpers between units, the modes of `NRConv.conv_weight_grad` (and the removed
# switches' messages), the schemes and the widths
from nr_jax.flow import (  # noqa: F401
    add,
    avg_pool,
    concat,
    flatten,
    identity,
    max_pool,
    passthrough,
    relu,
)
from nr_jax.ops import CONV_WEIGHT_GRADS, batch_chunking, set_conv_weight_grad  # noqa: F401
from nr_jax.schemes import SCHEMES, SPLIT_MIN_GROUP, Linear  # noqa: F401
from nr_jax.width_spec import UnitWidth, WidthSpec  # noqa: F401

Array = jax.Array
MASKS = "nr_masks"
BN_MOMENTUM = 0.9  # of every unit's BatchNorm running statistics (PyTorch momentum 0.1)


def he_fan_out(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """N(0, 2 / (k*k*D_out)) for a kernel [k, k, D_in, D_out] (official init, method.md 4.1);
    N(0, 2 / D_out) for a dense kernel [D_in, D_out]."""
    fan_out = math.prod(shape[:-2]) * shape[-1]
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


class NRConv(nn.Module):
    """Conv -> normalisation -> activation -> channel mask: one prunable NR unit.

    Attributes:
      features: output channels D_out.
      kernel_size: square kernel size k.
      strides: convolution stride.
      fixed: all outputs always live and no L1 pressure on γ (method.md 2.3).
      activation: applied after the normalisation; None for none (e.g. before a residual sum).
      in_split: L_in, survivors among the input channels (after rejuvenation).
      out_split: L_out, survivors among the output channels (after rejuvenation).
      scheme: how old and new channels mix after rejuvenation (`SCHEMES`).
      gamma_init: initial normalisation scale (official: 0.5 for VGG, 1.0 for ResNet/DenseNet).
      dtype: computation dtype (None: float32).
      conv_weight_grad: how the kernel gradient is computed (`CONV_WEIGHT_GRADS`, `ops.conv`):
        "auto" shifted matmuls on CPU and XLA's convolution gradient elsewhere, "matmul"
        shifted matmuls everywhere, "xla" XLA's everywhere. Static: part of the trace key.
      batch_chunks: whether the shifted-matmul kernel gradient sums over batch chunks of about
        1 MB of input; must be False when the batch is sharded over several devices (the
        chunks would then live on different devices). Static: part of the trace key.
      norm: "batch" (BatchNorm, the official unit), "group" (GroupNorm), "layer" (LayerNorm over
        the channels at each position) or None (no normalisation: the convolution has a bias);
        `nr_jax.norms.NORMS`.
      num_groups: GroupNorm's default number of groups (fewer when there are fewer channels).
      norm_groups: explicit group sizes (GroupNorm / LayerNorm), set by rejuvenation so that
        survivors and new channels are normalised apart; None: the default groups.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    fixed: bool = False
    activation: Callable[[Array], Array] | None = nn.relu
    in_split: int | None = None
    out_split: int | None = None
    scheme: str = "removed"
    gamma_init: float = 1.0
    kernel_init: Callable[..., Array] = he_fan_out
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    norm: str | None = "batch"
    num_groups: int = 4
    norm_groups: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', D_out)."""
        tracker = tracing.active()
        source = tracker.source_of(x, _unit_name(self)) if tracker else None
        _check_fields(self, "NRConv")
        d_in, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, d_in, self.features))
        dtype = self.dtype or jnp.float32
        strides = (self.strides, self.strides)
        grad, chunks = self.conv_weight_grad, self.batch_chunks

        def linear(x: Array, kernel: Array) -> Array:
            return ops.conv(x, kernel, strides, weight_grad=grad, batch_chunks=chunks)

        y = schemes.mix(self, linear, x.astype(dtype), kernel.astype(dtype))
        y = _finish(self, y, train)
        if tracker is not None:
            _record(self, tracker, y, source, d_in, (k, k), strides, (y.shape[1], y.shape[2]))
        return y


class NRDense(nn.Module):
    """Dense -> normalisation -> activation -> channel mask: a prunable unit of an MLP.

    The dense counterpart of `NRConv` (same fields and schemes, kernel [D_in, D_out]): its output
    neurons are the unit's channels. In the channel graph it is a unit with a 1x1 kernel on a 1x1
    map (`Unit.dense`), so liveness, utilisation, allocation and surgery treat it as a conv unit.
    `conv_weight_grad` and `batch_chunks` are accepted for a uniform model interface and unused.
    """

    features: int
    fixed: bool = False
    activation: Callable[[Array], Array] | None = nn.relu
    in_split: int | None = None
    out_split: int | None = None
    scheme: str = "removed"
    gamma_init: float = 1.0
    kernel_init: Callable[..., Array] = he_fan_out
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    norm: str | None = None
    num_groups: int = 4
    norm_groups: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """x: (B, D_in) -> (B, D_out)."""
        tracker = tracing.active()
        source = tracker.source_of(x, _unit_name(self)) if tracker else None
        _check_fields(self, "NRDense")
        if x.ndim != 2:
            raise ValueError(
                f"NRDense {self.name}: expected inputs (B, D_in), got shape {x.shape}; "
                "flatten images with nr_jax.layers.flatten"
            )
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features))
        dtype = self.dtype or jnp.float32
        y = schemes.mix(self, jnp.matmul, x.astype(dtype), kernel.astype(dtype))
        y = _finish(self, y, train)
        if tracker is not None:
            _record(self, tracker, y, source, d_in, (1, 1), (1, 1), (1, 1))
        return y


def _unit_name(unit: nn.Module) -> str:
    return "/".join(unit.scope.path)


def _check_fields(unit: Any, what: str) -> None:
    if unit.scheme not in SCHEMES:
        raise ValueError(
            f"{what} {unit.name}: scheme must be one of {SCHEMES}, got {unit.scheme!r}"
        )
    norms.check_norm(unit.norm, f"{what} {unit.name}")


def _groups(unit: Any) -> tuple[int, ...] | None:
    """The unit's GroupNorm / LayerNorm group sizes (None for BatchNorm or no normalisation)."""
    if unit.norm_groups is not None:
        return tuple(unit.norm_groups)
    return norms.default_groups(unit.norm, unit.features, unit.num_groups)


def _finish(unit: Any, y: Array, train: bool) -> Array:
    """Normalisation (or bias), activation and the channel mask of a unit's linear output."""
    scale_init = nn.initializers.constant(unit.gamma_init)
    if unit.norm == "batch":
        y = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=1e-5,
            dtype=unit.dtype,
            scale_init=scale_init,
            name="bn",
        )(y)
    elif unit.norm is None:
        bias = unit.param("bias", nn.initializers.zeros, (unit.features,))
        y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    else:
        y = norms.GroupedNorm(
            _groups(unit),
            unit.norm == "group",
            scale_init=scale_init,
            dtype=unit.dtype,
            name="norm",
        )(y)
    if unit.activation is not None:
        y = unit.activation(y)
    mask = unit.variable(MASKS, "mask", lambda: jnp.ones((unit.features,), jnp.float32))
    return y * mask.value.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


def _record(
    unit: Any,
    tracker: tracing.Tracker,
    y: Array,
    source: tracing.Source,
    d_in: int,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    out_hw: tuple[int, int],
) -> None:
    """Tells the channel graph's tracker what this unit call read and produced."""
    name = _unit_name(unit)
    tracker.tag(y, ((frozenset([name]), 0, unit.features),))
    tracker.units.append(
        tracing.UnitRecord(
            name=name,
            kind="conv",
            source=source,
            in_channels=d_in,
            out_channels=unit.features,
            kernel=kernel,
            strides=strides,
            out_hw=out_hw,
            fixed=unit.fixed,
            in_split=unit.in_split,
            out_split=unit.out_split,
            scheme=unit.scheme,
            norm=unit.norm,
            norm_groups=_groups(unit),
            dense=isinstance(unit, NRDense),
        )
    )


class NRClassifier(nn.Module):
    """Global average pooling -> dense classifier, with the two-logit head after rejuvenation.

    Feature vectors (B, C), e.g. after an MLP's `NRDense` units, are classified as they are.

    Before rejuvenation (`in_split` None) the output is logits (B, K). After it, the output is
    (B, 2, K): z_old from the survivor channels, z_new from the new ones (method.md 4.3); the
    evaluation logits are their sum (`nr_jax.predict`). The official code adds the bias to both
    heads (bias counted twice at evaluation, method.md 7.6); `bias_in_both_heads=False` (default)
    adds it to z_old only.
    """

    num_classes: int
    in_split: int | None = None
    bias_in_both_heads: bool = False
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.01)
    bias_init: Callable[..., Array] = nn.initializers.zeros
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, C) or (B, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        tracker = tracing.active()
        name = "/".join(self.scope.path)
        source = tracker.source_of(x, name) if tracker else None
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.num_classes))
        bias = self.param("bias", self.bias_init, (self.num_classes,))
        dtype = self.dtype or jnp.float32
        h = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1))).astype(dtype)
        kernel = kernel.astype(dtype)
        bias = bias.astype(dtype)[None, :]
        if self.in_split is None:
            out = h @ kernel + bias
        else:
            split = self.in_split
            if not 0 <= split <= d_in:
                raise ValueError(f"NRClassifier: in_split must be in [0, {d_in}], got {split}")
            z_old = h[:, :split] @ kernel[:split] + bias
            z_new = h[:, split:] @ kernel[split:]
            if self.bias_in_both_heads:
                z_new = z_new + bias
            out = jnp.stack([z_old, z_new], axis=1)
        if tracker is not None:
            tracker.units.append(
                tracing.UnitRecord(
                    name=name,
                    kind="classifier",
                    source=source,
                    in_channels=d_in,
                    out_channels=self.num_classes,
                    kernel=(1, 1),
                    strides=(1, 1),
                    out_hw=(1, 1),
                    fixed=True,
                    in_split=self.in_split,
                    out_split=None,
                    scheme="dense",
                )
            )
        return out.astype(jnp.float32)


def conv_unit(widths: WidthSpec, name: str, features: int, **kwargs: Any) -> NRConv:
    """An `NRConv` named `name` whose width comes from `widths` (default `features`)."""
    w = widths.get(name, features)
    return NRConv(
        features=w.features,
        in_split=w.in_split,
        out_split=w.out_split,
        norm_groups=w.norm_groups,
        name=name,
        **kwargs,
    )


def dense_unit(widths: WidthSpec, name: str, features: int, **kwargs: Any) -> NRDense:
    """An `NRDense` named `name` whose width comes from `widths` (default `features`)."""
    w = widths.get(name, features)
    return NRDense(
        features=w.features,
        in_split=w.in_split,
        out_split=w.out_split,
        norm_groups=w.norm_groups,
        name=name,
        **kwargs,
    )


def classifier_unit(
    widths: WidthSpec, num_classes: int, name: str = "head", **kwargs: Any
) -> NRClassifier:
    """The `NRClassifier` named `name` with its split point from `widths`."""
    w = widths.get(name, num_classes)
    return NRClassifier(num_classes=num_classes, in_split=w.in_split, name=name, **kwargs)
