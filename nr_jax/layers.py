"""The layers a Neural Rejuvenation model is built from.

A *unit* (`NRConv`) is a bias-free convolution followed by BatchNorm, an optional activation and a
per-channel mask, as the official `nr.Conv2d` + `nr.ReLU` (method.md 1.1). Its BN scale γ is the
liveness indicator of its output channels. The classifier (`NRClassifier`) is global average
pooling followed by a dense layer, which equals the official 1x1-conv-then-GAP head.

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
  block convolutions (kept to measure the choice; see `experiments/benchmark.py`).
* scheme ``"dense"``: one full convolution over the whole kernel.

Every helper that moves activations between units (`max_pool`, `avg_pool`, `relu`, `add`,
`concat`, `identity`, `passthrough`) is a plain function at run time; while
`nr_jax.channel_graph` traces a model it also records which channels flow where.

Models take a `widths: WidthSpec` field (hashable) and build their units through `conv_unit` and
`classifier_unit`, so that `nr_jax.rejuvenate` can return `model.clone(widths=new_spec)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import _tracking

Array = jax.Array
MASKS = "nr_masks"
SCHEMES = ("removed", "attention", "attention4", "dense")
# Narrowest channel block that the removed scheme runs as its own convolution (`NRConv._removed`).
SPLIT_MIN_GROUP = 2


def he_fan_out(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    """N(0, 2 / (k*k*D_out)) for a kernel [k, k, D_in, D_out] (official init, method.md 4.1)."""
    fan_out = shape[0] * shape[1] * shape[3]
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


@dataclasses.dataclass(frozen=True)
class UnitWidth:
    """Static width of one unit: output channels and, after rejuvenation, split points."""

    features: int
    in_split: int | None = None
    out_split: int | None = None


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

    @classmethod
    def from_dict(cls, widths: dict[str, UnitWidth]) -> WidthSpec:
        return cls(tuple(sorted(widths.items())))

    def to_json(self) -> str:
        return json.dumps({k: dataclasses.asdict(v) for k, v in self.entries}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WidthSpec:
        return cls.from_dict({k: UnitWidth(**v) for k, v in json.loads(text).items()})


CONV_WEIGHT_GRADS = ("auto", "matmul", "xla")
_conv_weight_grad = "auto"  # set through set_conv_weight_grad (validated), below


def set_conv_weight_grad(mode: str) -> None:
    """Chooses how every NR convolution computes its kernel gradient.

    * ``"auto"`` (default): shifted matmuls on CPU, XLA's own convolution gradient elsewhere.
    * ``"matmul"``: shifted matmuls on every platform.
    * ``"xla"``: XLA's convolution gradient everywhere (a plain `lax.conv_general_dilated`).

    XLA's CPU backend computes the kernel gradient of a 3x3 convolution 3-20x slower than its
    forward pass at large feature maps (the efficiency section of `experiments/benchmark.py`
    times both); the
    gradient is a sum over the k*k kernel taps of (input shifted by the tap)^T @ output
    gradient, i.e. k*k matmuls, which the CPU runs near its matmul speed. Forward pass and input
    gradient stay XLA's. Takes effect for steps traced after the call (jit caches keep their
    traces); the environment variable ``NR_JAX_CONV_WEIGHT_GRAD`` sets it at import.
    """
    global _conv_weight_grad
    if mode not in CONV_WEIGHT_GRADS:
        raise ValueError(f"conv weight gradient must be one of {CONV_WEIGHT_GRADS}, got {mode!r}")
    _conv_weight_grad = mode


set_conv_weight_grad(os.environ.get("NR_JAX_CONV_WEIGHT_GRAD", "auto"))


def _padding(k_h: int, k_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k_h // 2, k_h // 2), (k_w // 2, k_w // 2))  # PyTorch's symmetric padding


def _xla_conv(x: Array, kernel: Array, strides: tuple[int, int]) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, strides, _padding(*kernel.shape[:2]), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# Batch chunk of the shifted-matmul kernel gradient, in bytes of input (see _kernel_grad_matmul).
DW_CHUNK_BYTES = 1 << 20
DW_CHUNK_MIN_ROWS = 512
_dw_chunking = True  # set through batch_chunking, below


@contextlib.contextmanager
def batch_chunking(enabled: bool) -> Iterator[None]:
    """Whether kernel gradients traced in this context are summed over batch chunks (default on).

    Turn it off when the batch axis is sharded over several devices (the train steps of a
    data-parallel `Trainer` do): the chunks then live on different devices and the loop over
    them made a 4-device `vgg_fmnist` step 0.70-0.75x as fast; each device's share of the batch
    is small enough without chunks.
    """
    global _dw_chunking
    previous, _dw_chunking = _dw_chunking, enabled
    try:
        yield
    finally:
        _dw_chunking = previous


def _kernel_grad_matmul(
    x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: tuple[int, int]
) -> Array:
    """dL/dW, summed over chunks of the batch of about `DW_CHUNK_BYTES` of input each.

    The k*k shifted copies of a whole batch's input outgrow the CPU's caches at large maps (9
    copies of 4 MB for 64 images of 32x32x16); chunked by a `lax.scan`, the copies of one chunk
    are consumed while cached. Measured on the 2-core CPU, batch 64, one 3x3 layer's kernel
    gradient: 32x32, 16 -> 16 channels 37 -> 9 ms; 32x32, 66 -> 76 channels 189 -> 84 ms.
    """
    b = x.shape[0]
    n = _batch_chunk(b, x.size // b * x.dtype.itemsize, dy.shape[1] * dy.shape[2])
    if n == b or not _dw_chunking:
        return _kernel_grad_taps(x, dy, kernel_shape, strides)

    def chunk(acc: Array, xy: tuple[Array, Array]) -> tuple[Array, None]:
        return acc + _kernel_grad_taps(xy[0], xy[1], kernel_shape, strides), None

    chunks = (x.reshape(b // n, n, *x.shape[1:]), dy.reshape(b // n, n, *dy.shape[1:]))
    return jax.lax.scan(chunk, jnp.zeros(kernel_shape, jnp.float32), chunks)[0]


def _batch_chunk(batch: int, image_bytes: int, out_positions: int) -> int:
    """Images per chunk: a divisor of the batch near `DW_CHUNK_BYTES` of input, but with at
    least `DW_CHUNK_MIN_ROWS` output positions (smaller matmuls lose more than the cache gains:
    8x8 maps, 538 -> 542 channels, batch 16, ran 1.3x slower in chunks of 256 rows)."""
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    n = max([d for d in divisors if d * image_bytes <= DW_CHUNK_BYTES], default=1)
    if n * out_positions < DW_CHUNK_MIN_ROWS:
        n = min(d for d in divisors if d * out_positions >= DW_CHUNK_MIN_ROWS or d == batch)
    return n


def _kernel_grad_taps(
    x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: tuple[int, int]
) -> Array:
    """dL/dW[i, j] = sum over batch and positions of x shifted by tap (i, j) times dy."""
    k_h, k_w, c_in, c_out = kernel_shape
    (p_h, _), (p_w, _) = _padding(k_h, k_w)
    s_h, s_w = strides
    _, h_out, w_out, _ = dy.shape
    xp = jnp.pad(x, ((0, 0), (p_h, p_h), (p_w, p_w), (0, 0)))
    dy2 = dy.reshape(-1, c_out)
    taps = []
    for i in range(k_h):
        for j in range(k_w):
            tap = xp[:, i : i + s_h * (h_out - 1) + 1 : s_h, j : j + s_w * (w_out - 1) + 1 : s_w]
            taps.append(
                jax.lax.dot_general(
                    tap.reshape(-1, c_in),
                    dy2,
                    (((0,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32,
                )
            )
    return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_mm(x: Array, kernel: Array, strides: tuple[int, int], everywhere: bool) -> Array:
    return _xla_conv(x, kernel, strides)


def _conv_mm_fwd(
    x: Array, kernel: Array, strides: tuple[int, int], everywhere: bool
) -> tuple[Array, tuple[Array, Array]]:
    return _xla_conv(x, kernel, strides), (x, kernel)


def _conv_mm_bwd(
    strides: tuple[int, int], everywhere: bool, res: tuple[Array, Array], dy: Array
) -> tuple[Array, Array]:
    x, kernel = res
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides), x)
    (dx,) = input_vjp(dy)

    def matmul(x: Array, kernel: Array, dy: Array) -> Array:
        return _kernel_grad_matmul(x, dy, kernel.shape, strides).astype(kernel.dtype)

    def xla(x: Array, kernel: Array, dy: Array) -> Array:
        _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k, strides), kernel)
        return kernel_vjp(dy)[0]

    if everywhere:
        dw = matmul(x, kernel, dy)
    else:
        dw = jax.lax.platform_dependent(x, kernel, dy, cpu=matmul, default=xla)
    return dx, dw


_conv_mm.defvjp(_conv_mm_fwd, _conv_mm_bwd)


def _conv(x: Array, kernel: Array, strides: tuple[int, int]) -> Array:
    """Convolution of an NR unit; its kernel gradient as `set_conv_weight_grad` chose."""
    if _conv_weight_grad == "xla":
        return _xla_conv(x, kernel, strides)
    return _conv_mm(x, kernel, tuple(strides), _conv_weight_grad == "matmul")


class NRConv(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation -> channel mask: one prunable NR unit.

    Attributes:
      features: output channels D_out.
      kernel_size: square kernel size k.
      strides: convolution stride.
      fixed: all outputs always live and no L1 pressure on γ (method.md 2.3).
      activation: applied after BN; None for none (e.g. before a residual sum).
      in_split: L_in, survivors among the input channels (after rejuvenation).
      out_split: L_out, survivors among the output channels (after rejuvenation).
      scheme: how old and new channels mix after rejuvenation (`SCHEMES`).
      gamma_init: initial BN scale (official: 0.5 for VGG, 1.0 for ResNet/DenseNet).
      dtype: computation dtype (None: float32).
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

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', D_out)."""
        tracker = _tracking.active()
        source = tracker.source_of(x, self._unit_name()) if tracker else None
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"NRConv {self.name}: scheme must be one of {SCHEMES}, got {self.scheme!r}"
            )
        d_in, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, d_in, self.features))
        dtype = self.dtype or jnp.float32
        y = self._forward(x.astype(dtype), kernel.astype(dtype))
        y = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,  # PyTorch momentum 0.1
            epsilon=1e-5,
            dtype=self.dtype,
            scale_init=nn.initializers.constant(self.gamma_init),
            name="bn",
        )(y)
        if self.activation is not None:
            y = self.activation(y)
        mask = self.variable(MASKS, "mask", lambda: jnp.ones((self.features,), jnp.float32))
        y = y * mask.value.astype(y.dtype)[None, None, None, :]
        if tracker is not None:
            tracker.tag(y, (((frozenset([self._unit_name()])), 0, self.features),))
            tracker.units.append(
                _tracking.UnitRecord(
                    name=self._unit_name(),
                    kind="conv",
                    source=source,
                    in_channels=d_in,
                    out_channels=self.features,
                    kernel=(k, k),
                    strides=(self.strides, self.strides),
                    out_hw=(y.shape[1], y.shape[2]),
                    fixed=self.fixed,
                    in_split=self.in_split,
                    out_split=self.out_split,
                    scheme=self.scheme,
                )
            )
        return y

    def _unit_name(self) -> str:
        return "/".join(self.scope.path)

    def _forward(self, x: Array, kernel: Array) -> Array:
        strides = (self.strides, self.strides)
        l_in, l_out, d_in = self.in_split, self.out_split, x.shape[-1]
        if self.scheme == "dense" or l_out is None:
            return _conv(x, kernel, strides)
        if l_in is None or not 0 <= l_in <= d_in or not 0 <= l_out <= self.features:
            raise ValueError(
                f"NRConv {self.name}: split points must satisfy 0 <= in_split <= {d_in} and "
                f"0 <= out_split <= {self.features}; got in_split={l_in}, out_split={l_out}"
            )
        if self.scheme in ("attention", "attention4"):
            return self._attention(x, kernel, strides, l_in, l_out)
        return self._removed(x, kernel, strides, l_in, l_out)

    def _removed(
        self, x: Array, kernel: Array, strides: tuple[int, int], l_in: int, l_out: int
    ) -> Array:
        """Cross connections removed: old outputs read old inputs, new outputs new inputs.

        With no new input, new outputs read the survivors (one dense convolution); with no
        survivor input, old outputs get no signal (only their BN bias). A layer with a block
        narrower than `SPLIT_MIN_GROUP` channels (default 2: a single channel) runs as one
        convolution whose cross blocks are zeroed, with the same outputs and gradients; measured
        on the CPU, that took the rejuvenated `resnet_fmnist` step from 1.14 to 1.06 of the dense
        one, while wider thresholds slowed ResNet-20 (4 and 8) and the small VGG (8).
        """
        d_in, d_out = x.shape[-1], self.features
        if l_in == d_in:
            return _conv(x, kernel, strides)
        blocks = [(a, b) for a, b in ((l_in, l_out), (d_in - l_in, d_out - l_out)) if a and b]
        if l_in == 0 or min(min(b) for b in blocks) < SPLIT_MIN_GROUP:
            mask = (jnp.arange(d_in) < l_in)[:, None] == (jnp.arange(d_out) < l_out)[None, :]
            return _conv(x, kernel * mask.astype(kernel.dtype)[None, None], strides)
        parts = []
        if l_out > 0:
            parts.append(_conv(x[..., :l_in], kernel[:, :, :l_in, :l_out], strides))
        if l_out < d_out:
            parts.append(_conv(x[..., l_in:], kernel[:, :, l_in:, l_out:], strides))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def _attention(
        self, x: Array, kernel: Array, strides: tuple[int, int], l_in: int, l_out: int
    ) -> Array:
        if l_in in (0, x.shape[-1]) or l_out in (0, self.features):
            return _conv(x, kernel, strides)  # no second group to attend to
        x_o, x_n = x[..., :l_in], x[..., l_in:]
        if self.scheme == "attention4":
            ll = _conv(x_o, kernel[:, :, :l_in, :l_out], strides)
            rl = _conv(x_o, kernel[:, :, :l_in, l_out:], strides)
            lr = _conv(x_n, kernel[:, :, l_in:, :l_out], strides)
            rr = _conv(x_n, kernel[:, :, l_in:, l_out:], strides)
        else:
            from_old = _conv(x_o, kernel[:, :, :l_in], strides)  # [ll, rl]
            from_new = _conv(x_n, kernel[:, :, l_in:], strides)  # [lr, rr]
            ll, rl = from_old[..., :l_out], from_old[..., l_out:]
            lr, rr = from_new[..., :l_out], from_new[..., l_out:]
        old = ll + 2.0 * jax.nn.sigmoid(ll) * lr
        new = rr + 2.0 * jax.nn.sigmoid(rr) * rl
        return jnp.concatenate([old, new], axis=-1)


class NRClassifier(nn.Module):
    """Global average pooling -> dense classifier, with the two-logit head after rejuvenation.

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
        """x: (B, H, W, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        tracker = _tracking.active()
        name = "/".join(self.scope.path)
        source = tracker.source_of(x, name) if tracker else None
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.num_classes))
        bias = self.param("bias", self.bias_init, (self.num_classes,))
        dtype = self.dtype or jnp.float32
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
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
                _tracking.UnitRecord(
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
        features=w.features, in_split=w.in_split, out_split=w.out_split, name=name, **kwargs
    )


def classifier_unit(
    widths: WidthSpec, num_classes: int, name: str = "head", **kwargs: Any
) -> NRClassifier:
    """The `NRClassifier` named `name` with its split point from `widths`."""
    w = widths.get(name, num_classes)
    return NRClassifier(num_classes=num_classes, in_split=w.in_split, name=name, **kwargs)


def passthrough(fn: Callable[[Array], Array], x: Array) -> Array:
    """Applies a channel-preserving function `fn` and keeps the channel graph informed."""
    return _tracking.passthrough(x, fn(x))


def _pool_windows(x: Array, window: int) -> Array:
    """(B, H, W, C) -> (B, H//k, W//k, C, k*k): the non-overlapping k x k windows."""
    b, h, w, c = x.shape
    h_out, w_out = h // window, w // window
    blocks = x[:, : h_out * window, : w_out * window]
    blocks = blocks.reshape(b, h_out, window, w_out, window, c).transpose(0, 1, 3, 5, 2, 4)
    return blocks.reshape(b, h_out, w_out, c, window * window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max_pool(x: Array, window: int) -> Array:
    return _pool_windows(x, window).max(axis=-1)


def _block_max_pool_fwd(x: Array, window: int) -> tuple[Array, tuple[Array, tuple[int, ...]]]:
    windows = _pool_windows(x, window)
    first_max = jnp.argmax(windows, axis=-1).astype(jnp.int32)
    return windows.max(axis=-1), (first_max, x.shape)


def _block_max_pool_bwd(window: int, res: tuple[Array, tuple[int, ...]], dy: Array) -> tuple[Array]:
    first_max, (b, h, w, c) = res
    h_out, w_out = h // window, w // window
    taps = jnp.arange(window * window, dtype=jnp.int32).reshape(1, 1, 1, 1, -1)
    g = jnp.where(first_max[..., None] == taps, dy[..., None], jnp.zeros((), dy.dtype))
    g = g.reshape(b, h_out, w_out, c, window, window).transpose(0, 1, 4, 2, 5, 3)
    g = g.reshape(b, h_out * window, w_out * window, c)
    return (jnp.pad(g, ((0, 0), (0, h - h_out * window), (0, w - w_out * window), (0, 0))),)


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


def max_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Max pooling over H, W (channel-preserving).

    Non-overlapping windows without padding (window == strides, "VALID": every VGG pool) take a
    reshape and a max, and route the gradient to each window's first maximum, as `nn.max_pool`
    does, in one elementwise pass; `nn.max_pool`'s gradient (a variadic reduce-window over index
    iotas, then a scatter) is 2.5-4.5x slower on CPU and was about 40 ms of kernel time in a
    130 ms `vgg_fmnist` step. Other pools are `nn.max_pool`.
    """
    s = strides or window
    if s == window and isinstance(padding, str) and padding.upper() == "VALID":
        return _tracking.passthrough(x, _block_max_pool(x, window))
    return _tracking.passthrough(x, nn.max_pool(x, (window, window), (s, s), padding))


def avg_pool(
    x: Array, window: int = 2, strides: int | None = None, padding: Any = "VALID"
) -> Array:
    """Average pooling over H, W (channel-preserving)."""
    s = strides or window
    return _tracking.passthrough(x, nn.avg_pool(x, (window, window), (s, s), padding))


def relu(x: Array) -> Array:
    """ReLU (channel-preserving)."""
    return _tracking.passthrough(x, nn.relu(x))


def identity(x: Array) -> Array:
    """Identity (channel-preserving); useful to name a shortcut."""
    return x


def add(*xs: Array) -> Array:
    """Residual sum: the summed units become tied (they share one channel space)."""
    y = xs[0]
    for x in xs[1:]:
        y = y + x
    tracker = _tracking.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<add>") for x in xs]
        out = _tracking.add_sources(sources)
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
    tracker = _tracking.active()
    if tracker is not None:
        sources = [tracker.source_of(x, "<concat>") for x in xs]
        tracker.tag(y, _tracking.concat_sources(sources, splits))
    return y
