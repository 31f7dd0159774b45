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
[survivors, new] and a unit carries its split points `in_split` (L_in) and `out_split` (L_out):

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

Every helper that moves activations between units (`max_pool`, `avg_pool`, `relu`, `add`,
`concat`, `flatten`, `identity`, `passthrough`) is a plain function at run time; while
`nr_jax.channel_graph` traces a model it also records which channels flow where.

Models take a `widths: WidthSpec` field (hashable) and build their units through `conv_unit`,
`dense_unit` and `classifier_unit`, so that `nr_jax.rejuvenate` can return
`model.clone(widths=new_spec)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import norms, ops, tracing

# re-exported: the modes of `NRConv.conv_weight_grad`, and the removed switches' messages
from nr_jax.ops import CONV_WEIGHT_GRADS, batch_chunking, set_conv_weight_grad  # noqa: F401

Array = jax.Array
MASKS = "nr_masks"
BN_MOMENTUM = 0.9  # of every unit's BatchNorm running statistics (PyTorch momentum 0.1)
SCHEMES = ("removed", "attention", "attention4", "dense")
# Narrowest channel block that the removed scheme runs as its own convolution (`NRConv._removed`).
SPLIT_MIN_GROUP = 2


def he_fan_out(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """N(0, 2 / (k*k*D_out)) for a kernel [k, k, D_in, D_out] (official init, method.md 4.1);
    N(0, 2 / D_out) for a dense kernel [D_in, D_out]."""
    fan_out = math.prod(shape[:-2]) * shape[-1]
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


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

        y = _mix(self, linear, x.astype(dtype), kernel.astype(dtype))
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
        y = _mix(self, jnp.matmul, x.astype(dtype), kernel.astype(dtype))
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


Linear = Callable[[Array, Array], Array]  # (x (..., D_in), kernel (..., D_in, D_out)) -> y


def _mix(unit: Any, linear: Linear, x: Array, kernel: Array) -> Array:
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


def passthrough(fn: Callable[[Array], Array], x: Array) -> Array:
    """Applies a channel-preserving function `fn` and keeps the channel graph informed."""
    return tracing.passthrough(x, fn(x))


def max_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Max pooling over H, W (channel-preserving).

    Non-overlapping windows without padding (window == strides, "VALID": every VGG pool) are
    `ops.block_max_pool` (a reshape and a max; the gradient goes to each window's first maximum,
    as `nn.max_pool`'s does, 2.5-4.5x faster on CPU). Other pools are `nn.max_pool`.
    """
    s = strides or window
    if s == window and isinstance(padding, str) and padding.upper() == "VALID":
        return tracing.passthrough(x, ops.block_max_pool(x, window))
    return tracing.passthrough(x, nn.max_pool(x, (window, window), (s, s), padding))


def avg_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Average pooling over H, W (channel-preserving)."""
    s = strides or window
    return tracing.passthrough(x, nn.avg_pool(x, (window, window), (s, s), padding))


def relu(x: Array) -> Array:
    """ReLU (channel-preserving)."""
    return tracing.passthrough(x, nn.relu(x))


def flatten(x: Array) -> Array:
    """(B, H, W, C) -> (B, H*W*C) for the network input (an MLP's first `NRDense`).

    The channel graph can follow it on the input only: flattening a unit's output would spread
    each of its channels over many features.
    """
    y = x.reshape(x.shape[0], -1)
    tracker = tracing.active()
    if tracker is not None:
        source = tracker.source_of(x, "<flatten>")
        if any(tracing.INPUT not in producers for producers, _, _ in source):
            raise ValueError(
                "nr_jax.layers.flatten: only the network input can be flattened (a unit's "
                "channels would be spread over many features); pool unit outputs instead"
            )
        tracker.tag(y, ((frozenset([tracing.INPUT]), 0, y.shape[-1]),))
    return y


def identity(x: Array) -> Array:
    """Identity (channel-preserving); useful to name a shortcut."""
    return x


def add(*xs: Array) -> Array:
    """Residual sum: the summed units become tied (they share one channel space)."""
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    tracker = tracing.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<add>") for x in xs]
        out = tracing.add_sources(sources)
        tracker.ties.append(out[0][0])
        tracker.tag(y, out)
    return y


def concat(xs: Sequence[Array], splits: Sequence[int] | None = None) -> Array:
    """Channel concatenation (dense connections).

    Args:
      xs: activations (B, H, W, C_i).
      splits: survivor count of each input after rejuvenation; the result is then laid out
        [survivors of every input, new channels of every input] so that the consumer sees the
        [survivors, new] layout. None before rejuvenation.
    """
    if splits is None:
        y = jnp.concatenate(xs, axis=-1)
    else:
        old = [x[..., :k] for x, k in zip(xs, splits, strict=True)]
        new = [x[..., k:] for x, k in zip(xs, splits, strict=True)]
        y = jnp.concatenate(old + new, axis=-1)
    tracker = tracing.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<concat>") for x in xs]
        tracker.tag(y, tracing.concat_sources(sources, splits))
    return y
