"""The convolution of NR units: its kernel gradient from shifted matmuls equals XLA's."""

import chex
import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import optax
import pytest

import nr_jax
from nr_jax import layers


def _grads(conv, x, w, strides):
    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize(
    "shape, k, s",
    [
        ((2, 7, 9, 3), 3, 1),
        ((2, 8, 8, 4), 3, 2),
        ((2, 9, 9, 4), 1, 2),
        ((1, 5, 6, 2), 5, 1),
        ((2, 6, 6, 3), 3, 3),
        ((3, 7, 7, 5), 7, 2),
        ((2, 4, 4, 6), 1, 1),
    ],
)
@pytest.mark.parametrize("everywhere", [True, False])
def test_kernel_gradient_equals_xla(shape, k, s, everywhere):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 5))
    ref = _grads(layers._xla_conv, x, w, (s, s))
    got = _grads(lambda x, w, st: layers._conv_mm(x, w, st, everywhere), x, w, (s, s))
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)
    # the forward pass is XLA's own convolution
    chex.assert_trees_all_equal(
        layers._conv_mm(x, w, (s, s), everywhere), layers._xla_conv(x, w, (s, s))
    )


@pytest.mark.parametrize(
    "batch, chunk_images, k, s",
    [(6, 4, 3, 1), (5, 2, 3, 2), (8, 2, 1, 1), (4, 1, 5, 1)],  # uneven, prime, 1x1, 1 image
)
def test_kernel_gradient_in_batch_chunks(monkeypatch, batch, chunk_images, k, s):
    """Chunked over the batch (a scan), the kernel gradient still equals XLA's."""
    x = jax.random.normal(jax.random.key(0), (batch, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    monkeypatch.setattr(layers, "DW_CHUNK_BYTES", chunk_images * 9 * 9 * 3 * 4)
    monkeypatch.setattr(layers, "DW_CHUNK_MIN_ROWS", 1)
    dy = jnp.ones((batch, -(-9 // s), -(-9 // s), 5))

    def jaxpr():  # a new function each time: make_jaxpr caches traces
        return str(
            jax.make_jaxpr(lambda x, dy: layers._kernel_grad_matmul(x, dy, w.shape, (s, s)))(x, dy)
        )

    assert "scan" in jaxpr()  # chunked, not one pass over the batch
    with nr_jax.batch_chunking(False):
        assert "scan" not in jaxpr()
    assert "scan" in jaxpr()  # the context restores the setting
    assert layers._batch_chunk(batch, 9 * 9 * 3 * 4, 81) == max(
        d for d in range(1, chunk_images + 1) if batch % d == 0
    )
    ref = _grads(layers._xla_conv, x, w, (s, s))
    got = _grads(lambda x, w, st: layers._conv_mm(x, w, st, True), x, w, (s, s))
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)


def test_kernel_gradient_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) * 0.1
    ref = jax.grad(lambda w: jnp.sum(layers._xla_conv(x, w, (1, 1)) ** 2))(w)

    def loss(w):
        y = layers._conv_mm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), True)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    got = jax.jit(jax.grad(loss))(w)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel


@pytest.mark.parametrize(
    "model, hw, scheme",
    [("resnet_tiny_basic", 16, None), ("vgg_tiny", 16, "removed"), ("vgg_tiny", 16, "attention")],
)
def test_model_gradients_equal_in_every_mode(model, hw, scheme):
    kwargs = {} if scheme is None else {"scheme": scheme}
    net = nr_jax.models.get(model, num_classes=10, **kwargs)
    x = jax.random.normal(jax.random.key(0), (4, hw, hw, 3))
    variables = helpers.init(net, jax.random.key(1), x)
    if scheme is not None:  # a rejuvenated network: every unit split [survivors, new]
        graph = nr_jax.channel_graph(net, (1, hw, hw, 3))
        variables, _ = helpers.random_gammas(variables, graph, seed=0)
        res = nr_jax.rejuvenate(jax.random.key(2), net, variables, None, optax.identity(), graph)
        net, variables = res.model, res.variables
        assert any(w.out_split for w in net.widths.as_dict().values())

    def loss(params):
        out, _ = net.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out))

    grads = {}
    try:
        for mode in ("xla", "auto", "matmul"):
            layers.set_conv_weight_grad(mode)
            grads[mode] = jax.jit(jax.grad(loss))(variables["params"])
    finally:
        layers.set_conv_weight_grad("auto")
    chex.assert_trees_all_close(grads["auto"], grads["xla"], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(grads["matmul"], grads["xla"], rtol=1e-4, atol=1e-5)


def test_set_conv_weight_grad_rejects_unknown_mode():
    with pytest.raises(ValueError, match="conv weight gradient must be one of"):
        layers.set_conv_weight_grad("fast")
    assert layers._conv_weight_grad == "auto"


def test_auto_mode_lowers_to_xla_convolutions_off_cpu():
    """On GPU the kernel gradient stays XLA's convolution (cuDNN); on CPU it is dot_generals."""
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 6))
    f = jax.jit(jax.grad(lambda w: jnp.sum(layers._conv_mm(x, w, (1, 1), False)), argnums=0))
    text = {p: jax.export.export(f, platforms=(p,))(w).mlir_module() for p in ("cpu", "cuda")}
    assert text["cpu"].count("stablehlo.dot_general") == 9  # one per kernel tap
    assert "stablehlo.dot_general" not in text["cuda"]
    assert text["cuda"].count("stablehlo.convolution") == 1  # the kernel-gradient convolution


@pytest.mark.parametrize("shape, window", [((2, 8, 8, 3), 2), ((2, 9, 7, 4), 2), ((1, 9, 9, 2), 3)])
def test_max_pool_matches_flax(shape, window):
    """Values and gradients equal nn.max_pool's, ties (ReLU zeros) included."""
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    ref = lambda x: nn.max_pool(x, (window, window), (window, window), "VALID")  # noqa: E731
    chex.assert_trees_all_equal(layers.max_pool(x, window), ref(x))

    def grad(pool):
        return jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)

    chex.assert_trees_all_equal(grad(lambda x: layers.max_pool(x, window)), grad(ref))
    # a window of equal values sends its whole gradient to the first one
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2)))(jnp.zeros((1, 2, 2, 1)))
    chex.assert_trees_all_equal(g[0, :, :, 0], jnp.array([[1.0, 0.0], [0.0, 0.0]]))


def test_overlapping_max_pool_is_flax():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    pads = ((1, 1), (1, 1))
    chex.assert_trees_all_equal(
        layers.max_pool(x, 3, 2, pads), nn.max_pool(x, (3, 3), (2, 2), pads)
    )


def test_batch_chunk_sizes(monkeypatch):
    monkeypatch.setattr(layers, "DW_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(layers, "DW_CHUNK_MIN_ROWS", 512)
    assert layers._batch_chunk(64, 50_176, 784) == 16  # 28x28x16 maps: 16 images = 0.8 MB
    assert layers._batch_chunk(16, 581_632, 1024) == 1  # one 32x32x142 image already fills it
    assert layers._batch_chunk(16, 137_728, 64) == 8  # 8x8 maps: 4 images are only 256 rows
    assert layers._batch_chunk(13, 2 << 20, 1024) == 1  # prime batch, image over the chunk
    assert layers._batch_chunk(4, 1_000, 16) == 4  # small batch: one pass, no scan


@pytest.mark.parametrize(
    "d_in, l_in, d_out, l_out",
    [(6, 4, 7, 3), (6, 1, 7, 6), (6, 0, 7, 3), (6, 6, 7, 3), (6, 2, 7, 0), (6, 2, 7, 7)],
)
def test_removed_scheme_as_one_masked_convolution(monkeypatch, d_in, l_in, d_out, l_out):
    """Split convolutions and one convolution with zeroed cross blocks give the same layer."""
    unit = layers.NRConv(d_out, in_split=l_in, out_split=l_out, scheme="removed")
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, d_in))
    variables = unit.init(jax.random.key(1), x)

    def run(min_group):
        monkeypatch.setattr(layers, "SPLIT_MIN_GROUP", min_group)

        def loss(params, x):
            y, _ = unit.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y)), y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)

    split, masked = run(0), run(10**6)
    chex.assert_trees_all_close(masked, split, rtol=1e-5, atol=1e-5)
    kernel_grad = split[0][0]["kernel"]
    cross = (jnp.arange(d_in) < l_in)[:, None] != (jnp.arange(d_out) < l_out)[None, :]
    if 0 < l_in < d_in:  # cross connections get no gradient
        assert float(jnp.abs(jnp.where(cross, kernel_grad, 0.0)).max()) == 0.0
