"""Custom kernels of the NR units: the convolution's kernel gradient and the block max-pool.

* `conv`: an NHWC x HWIO convolution with PyTorch's symmetric padding whose forward pass and
  input gradient are XLA's, and whose kernel gradient is chosen by a static `weight_grad` mode
  (`CONV_WEIGHT_GRADS`): ``"auto"`` shifted matmuls on CPU and XLA's own gradient elsewhere,
  ``"matmul"`` shifted matmuls everywhere, ``"xla"`` a plain `lax.conv_general_dilated`.
  XLA's CPU backend computes the kernel gradient of a 3x3 convolution 3-20x slower than its
  forward pass at large feature maps (the efficiency section of `experiments/benchmark` times
  both); the gradient is a sum over the k*k kernel taps of (input shifted by the tap)^T @ output
  gradient, i.e. k*k matmuls, which the CPU runs near its matmul speed.
* `block_max_pool`: non-overlapping max pooling as a reshape and a max, whose gradient goes to
  each window's first maximum (as `nn.max_pool`'s does) in one elementwise pass.

Every choice is an argument of the call, fixed at trace time; no module state is read. The
process-global switches that chose before (`set_conv_weight_grad`, `batch_chunking`) raise an
error naming their replacement, the static fields `NRConv.conv_weight_grad` / `batch_chunks`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
CONV_WEIGHT_GRADS = ("auto", "matmul", "xla")
# Batch chunk of the shifted-matmul kernel gradient, in bytes of input (see `kernel_grad_matmul`).
DW_CHUNK_BYTES = 1 << 20
DW_CHUNK_MIN_ROWS = 512


def set_conv_weight_grad(mode: str) -> None:
    """Removed (raises TypeError): the mode is the static field `NRConv.conv_weight_grad`."""
    raise TypeError(
        f"nr_jax.set_conv_weight_grad({mode!r}) was removed: a process-global switch is ignored "
        "by jit caches. Build the model with `nr_jax.models.get(name, conv_weight_grad=...)` "
        "(in runs: `config.conv_weight_grad`), or set the `NRConv.conv_weight_grad` field."
    )


def batch_chunking(enabled: bool) -> None:
    """Removed (raises TypeError): batch chunking is the static field `NRConv.batch_chunks`."""
    raise TypeError(
        f"nr_jax.batch_chunking({enabled!r}) was removed: a process-global switch is ignored "
        "by jit caches. Build the model with `nr_jax.models.get(name, batch_chunks=False)` when "
        "the batch is sharded over several devices, or set the `NRConv.batch_chunks` field."
    )


def padding(k_h: int, k_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric padding of a k_h x k_w kernel: ((k_h//2,) * 2, (k_w//2,) * 2)."""
    return ((k_h // 2, k_h // 2), (k_w // 2, k_w // 2))


def xla_conv(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """x (B, H, W, D_in) * kernel (k, k, D_in, D_out) -> (B, H', W', D_out), XLA's gradients."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        padding(*kernel.shape[:2]),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv(
    x: Array,
    kernel: Array,
    strides: Sequence[int],
    *,
    weight_grad: str = "auto",
    batch_chunks: bool = True,
) -> Array:
    """The convolution of an NR unit, its kernel gradient computed as `weight_grad` says.

    Args:
      x: input activations, shape (B, H, W, D_in).
      kernel: shape (k_h, k_w, D_in, D_out).
      strides: (s_h, s_w).
      weight_grad: one of `CONV_WEIGHT_GRADS`.
      batch_chunks: whether the shifted-matmul kernel gradient sums over batch chunks of about
        `DW_CHUNK_BYTES` of input (False when the batch is sharded over several devices).

    Returns:
      (B, H', W', D_out), equal to `xla_conv(x, kernel, strides)`.
    """
    if weight_grad not in CONV_WEIGHT_GRADS:
        raise ValueError(
            f"conv_weight_grad must be one of {CONV_WEIGHT_GRADS}, got {weight_grad!r}"
        )
    if weight_grad == "xla":
        return xla_conv(x, kernel, strides)
    return _conv_mm(x, kernel, tuple(strides), weight_grad == "matmul", bool(batch_chunks))


def batch_chunk(batch: int, image_bytes: int, out_positions: int) -> int:
    """Images per chunk: a divisor of the batch near `DW_CHUNK_BYTES` of input, but with at
    least `DW_CHUNK_MIN_ROWS` output positions (smaller matmuls lose more than the cache gains:
    8x8 maps, 538 -> 542 channels, batch 16, ran 1.3x slower in chunks of 256 rows)."""
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    n = max([d for d in divisors if d * image_bytes <= DW_CHUNK_BYTES], default=1)
    if n * out_positions < DW_CHUNK_MIN_ROWS:
        n = min(d for d in divisors if d * out_positions >= DW_CHUNK_MIN_ROWS or d == batch)
    return n


def kernel_grad_matmul(
    x: Array,
    dy: Array,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, int],
    batch_chunks: bool = True,
) -> Array:
    """dL/dW (float32) from k*k shifted matmuls, summed over batch chunks if `batch_chunks`.

    The k*k shifted copies of a whole batch's input outgrow the CPU's caches at large maps (9
    copies of 4 MB for 64 images of 32x32x16); chunked by a `lax.scan` (`batch_chunk` images
    each), the copies of one chunk are consumed while cached. Measured on the 2-core CPU, batch
    64, one 3x3 layer's kernel gradient: 32x32, 16 -> 16 channels 37 -> 9 ms; 32x32, 66 -> 76
    channels 189 -> 84 ms. Over a batch sharded on several devices the chunks would live on
    different devices (a 4-device `vgg_fmnist` step ran 0.70-0.75x as fast): pass False there.
    """
    b = x.shape[0]
    n = batch_chunk(b, x.size // b * x.dtype.itemsize, dy.shape[1] * dy.shape[2])
    if n == b or not batch_chunks:
        return _kernel_grad_taps(x, dy, kernel_shape, strides)

    def chunk(acc: Array, xy: tuple[Array, Array]) -> tuple[Array, None]:
        return acc + _kernel_grad_taps(xy[0], xy[1], kernel_shape, strides), None

    chunks = (x.reshape(b // n, n, *x.shape[1:]), dy.reshape(b // n, n, *dy.shape[1:]))
    return jax.lax.scan(chunk, jnp.zeros(kernel_shape, jnp.float32), chunks)[0]


def _kernel_grad_taps(
    x: Array, dy: Array, kernel_shape: tuple[int, ...], strides: tuple[int, int]
) -> Array:
    """dL/dW[i, j] = sum over batch and positions of x shifted by tap (i, j) times dy."""
    k_h, k_w, c_in, c_out = kernel_shape
    (p_h, _), (p_w, _) = padding(k_h, k_w)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_mm(
    x: Array, kernel: Array, strides: tuple[int, int], everywhere: bool, batch_chunks: bool
) -> Array:
    return xla_conv(x, kernel, strides)


def _conv_mm_fwd(
    x: Array, kernel: Array, strides: tuple[int, int], everywhere: bool, batch_chunks: bool
) -> tuple[Array, tuple[Array, Array]]:
    return xla_conv(x, kernel, strides), (x, kernel)


def _conv_mm_bwd(
    strides: tuple[int, int],
    everywhere: bool,
    batch_chunks: bool,
    res: tuple[Array, Array],
    dy: Array,
) -> tuple[Array, Array]:
    x, kernel = res
    _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, strides), x)
    (dx,) = input_vjp(dy)

    def matmul(x: Array, kernel: Array, dy: Array) -> Array:
        dw = kernel_grad_matmul(x, dy, kernel.shape, strides, batch_chunks)
        return dw.astype(kernel.dtype)

    def xla(x: Array, kernel: Array, dy: Array) -> Array:
        _, kernel_vjp = jax.vjp(lambda k: xla_conv(x, k, strides), kernel)
        return kernel_vjp(dy)[0]

    if everywhere:
        dw = matmul(x, kernel, dy)
    else:
        dw = jax.lax.platform_dependent(x, kernel, dy, cpu=matmul, default=xla)
    return dx, dw


_conv_mm.defvjp(_conv_mm_fwd, _conv_mm_bwd)


def _pool_windows(x: Array, window: int) -> Array:
    """(B, H, W, C) -> (B, H//k, W//k, C, k*k): the non-overlapping k x k windows."""
    b, h, w, c = x.shape
    h_out, w_out = h // window, w // window
    blocks = x[:, : h_out * window, : w_out * window]
    blocks = blocks.reshape(b, h_out, window, w_out, window, c).transpose(0, 1, 3, 5, 2, 4)
    return blocks.reshape(b, h_out, w_out, c, window * window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def block_max_pool(x: Array, window: int) -> Array:
    """Max over non-overlapping `window` x `window` blocks, "VALID": (B, H, W, C) ->
    (B, H//window, W//window, C); the gradient goes to each window's first maximum.

    `nn.max_pool`'s gradient (a variadic reduce-window over index iotas, then a scatter) is
    2.5-4.5x slower on CPU and was about 40 ms of kernel time in a 130 ms `vgg_fmnist` step.
    """
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


block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)
