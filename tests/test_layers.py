"""The NR units and their kernels: kernel gradients from shifted matmuls equal XLA's, the
kernel-gradient mode and batch chunking are static unit fields (part of the trace key), the block
max-pool equals `nn.max_pool`, and the removed scheme computes the removed-cross-connections layer.
"""

import functools

import chex
import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import optax
import pytest

import nr_jax
from nr_jax import layers, ops, schemes
from nr_jax.config import ConfigError

SMALL_MODELS = (  # one tiny variant per family, with its input size
    ("vgg_tiny", 16),
    ("resnet_tiny_cifar", 16),
    ("resnet_tiny_basic", 16),
    ("densenet_tiny", 16),
    ("vgg_imagenet_tiny", 28),
)


def _grads(conv, x, w, strides):
    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, strides)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _chunk_every_image(monkeypatch):
    """Makes the shifted-matmul kernel gradient scan over one-image batch chunks."""
    monkeypatch.setattr(ops, "DW_CHUNK_BYTES", 1)
    monkeypatch.setattr(ops, "DW_CHUNK_MIN_ROWS", 1)


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
@pytest.mark.parametrize("mode", ["matmul", "auto"])
def test_kernel_gradient_equals_xla(shape, k, s, mode):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 5))
    conv = functools.partial(ops.conv, weight_grad=mode)
    ref = _grads(ops.xla_conv, x, w, (s, s))
    got = _grads(conv, x, w, (s, s))
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)
    # the forward pass is XLA's own convolution
    chex.assert_trees_all_equal(conv(x, w, (s, s)), ops.xla_conv(x, w, (s, s)))


@pytest.mark.parametrize(
    "batch, chunk_images, k, s",
    [(6, 4, 3, 1), (5, 2, 3, 2), (8, 2, 1, 1), (4, 1, 5, 1)],  # uneven, prime, 1x1, 1 image
)
def test_kernel_gradient_in_batch_chunks(monkeypatch, batch, chunk_images, k, s):
    """Chunked over the batch (a scan) or in one pass, the kernel gradient equals XLA's."""
    x = jax.random.normal(jax.random.key(0), (batch, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    monkeypatch.setattr(ops, "DW_CHUNK_BYTES", chunk_images * 9 * 9 * 3 * 4)
    monkeypatch.setattr(ops, "DW_CHUNK_MIN_ROWS", 1)
    dy = jnp.ones((batch, -(-9 // s), -(-9 // s), 5))

    def jaxpr(chunks):
        f = lambda x, dy: ops.kernel_grad_matmul(x, dy, w.shape, (s, s), chunks)  # noqa: E731
        return str(jax.make_jaxpr(f)(x, dy))

    assert "scan" in jaxpr(True)  # chunked, not one pass over the batch
    assert "scan" not in jaxpr(False)
    assert ops.batch_chunk(batch, 9 * 9 * 3 * 4, 81) == max(
        d for d in range(1, chunk_images + 1) if batch % d == 0
    )
    ref = _grads(ops.xla_conv, x, w, (s, s))
    for chunks in (True, False):
        conv = functools.partial(ops.conv, weight_grad="matmul", batch_chunks=chunks)
        chex.assert_trees_all_close(_grads(conv, x, w, (s, s)), ref, rtol=1e-5, atol=1e-5)


def test_kernel_gradient_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) * 0.1
    ref = jax.grad(lambda w: jnp.sum(ops.xla_conv(x, w, (1, 1)) ** 2))(w)

    def loss(w):
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        y = ops.conv(xb, wb, (1, 1), weight_grad="matmul")
        return jnp.sum(y.astype(jnp.float32) ** 2)

    got = jax.jit(jax.grad(loss))(w)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel


@pytest.mark.parametrize(
    "model, hw, scheme",
    [("resnet_tiny_basic", 16, None), ("vgg_tiny", 16, "removed"), ("vgg_tiny", 16, "attention")],
)
def test_model_gradients_equal_in_every_mode(monkeypatch, model, hw, scheme):
    """Every kernel-gradient mode, chunked or not, gives the gradients of XLA's convolution."""
    _chunk_every_image(monkeypatch)
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

    def grads(net):
        def loss(params):
            out, _ = net.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.grad(loss))(variables["params"])

    ref = grads(net.clone(conv_weight_grad="xla"))
    for mode, chunks in (("auto", True), ("matmul", True), ("matmul", False), ("auto", False)):
        got = grads(net.clone(conv_weight_grad=mode, batch_chunks=chunks))
        chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-5)


def test_kernel_fields_are_part_of_the_trace_key(monkeypatch):
    """Models differing only in `conv_weight_grad` or `batch_chunks` trace separately under one
    jit (and lower to different kernels); an equal model reuses its trace."""
    _chunk_every_image(monkeypatch)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    base = nr_jax.models.get("vgg_tiny", num_classes=10)
    variables = helpers.init(base, jax.random.key(1), x)
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def grads(net, params):
        traces.append((net.conv_weight_grad, net.batch_chunks))

        def loss(params):
            out, _ = net.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(out)

        return jax.grad(loss)(params)

    nets = [
        base,
        base.clone(conv_weight_grad="xla"),
        base.clone(conv_weight_grad="matmul"),
        base.clone(batch_chunks=False),
    ]
    for net in nets + [nr_jax.models.get("vgg_tiny", num_classes=10)]:  # the last equals base
        grads(net, variables["params"])
    assert traces == [("auto", True), ("xla", True), ("matmul", True), ("auto", False)]
    hlo = [grads.lower(net, variables["params"]).as_text() for net in nets]
    assert "stablehlo.while" in hlo[2] and "stablehlo.while" not in hlo[3]  # batch chunks
    assert hlo[1].count("stablehlo.dot_general") < hlo[3].count("stablehlo.dot_general")


def test_unknown_conv_weight_grad_is_refused():
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"conv_weight_grad must be one of .*got 'fast'"):
        layers.NRConv(3, conv_weight_grad="fast").init(jax.random.key(0), x)
    # the model registry refuses it when the model is built, naming the config field
    with pytest.raises(ConfigError, match=r"config\.conv_weight_grad = 'cudnn' is not allowed"):
        nr_jax.models.get("vgg_tiny", conv_weight_grad="cudnn")
    assert layers.CONV_WEIGHT_GRADS == ops.CONV_WEIGHT_GRADS == ("auto", "matmul", "xla")


def test_removed_switches_name_their_replacement():
    with pytest.raises(TypeError, match=r"models\.get\(name, conv_weight_grad=.*config\.conv_w"):
        nr_jax.set_conv_weight_grad("xla")
    with (
        pytest.raises(TypeError, match=r"models\.get\(name, batch_chunks=False\)"),
        nr_jax.batch_chunking(False),
    ):
        pass
    assert layers.set_conv_weight_grad is nr_jax.set_conv_weight_grad


def _unit_fields(net, hw):
    """(conv_weight_grad, batch_chunks) of every NRConv the model builds, traced abstractly."""
    seen = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.NRConv) and context.method_name == "__call__":
            seen.add((context.module.conv_weight_grad, context.module.batch_chunks))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, hw, hw, 3)))
    return seen


def test_every_model_takes_the_kernel_fields():
    """`models.get(name, conv_weight_grad=..., batch_chunks=...)` works for every name; every unit
    of each family receives the fields, and rejuvenation (`model.clone(widths=...)`) keeps them."""
    for name in nr_jax.models.names():
        net = nr_jax.models.get(name, conv_weight_grad="xla", batch_chunks=False)
        assert (net.conv_weight_grad, net.batch_chunks) == ("xla", False), name
    for name, hw in SMALL_MODELS:
        net = nr_jax.models.get(name, conv_weight_grad="matmul", batch_chunks=False)
        assert _unit_fields(net, hw) == {("matmul", False)}, name
        assert _unit_fields(nr_jax.models.get(name), hw) == {("auto", True)}, name
    net = nr_jax.models.get("vgg_tiny", conv_weight_grad="xla", batch_chunks=False)
    x = jnp.ones((2, 16, 16, 3))
    variables = helpers.init(net, jax.random.key(1), x)
    graph = nr_jax.channel_graph(net, (1, 16, 16, 3))
    variables, _ = helpers.random_gammas(variables, graph, seed=0)
    res = nr_jax.rejuvenate(jax.random.key(2), net, variables, None, optax.identity(), graph)
    assert res.model.widths != net.widths
    assert _unit_fields(res.model, 16) == {("xla", False)}


def test_auto_mode_lowers_to_xla_convolutions_off_cpu():
    """On GPU the kernel gradient stays XLA's convolution (cuDNN); on CPU it is dot_generals."""
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 6))
    f = jax.jit(jax.grad(lambda w: jnp.sum(ops.conv(x, w, (1, 1), weight_grad="auto"))))
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
    monkeypatch.setattr(ops, "DW_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(ops, "DW_CHUNK_MIN_ROWS", 512)
    assert ops.batch_chunk(64, 50_176, 784) == 16  # 28x28x16 maps: 16 images = 0.8 MB
    assert ops.batch_chunk(16, 581_632, 1024) == 1  # one 32x32x142 image already fills it
    assert ops.batch_chunk(16, 137_728, 64) == 8  # 8x8 maps: 4 images are only 256 rows
    assert ops.batch_chunk(13, 2 << 20, 1024) == 1  # prime batch, image over the chunk
    assert ops.batch_chunk(4, 1_000, 16) == 4  # small batch: one pass, no scan


def _removed_reference(params, x, l_in, l_out):
    """The removed-cross-connections unit written out: one `lax.conv` whose kernel keeps
    old->old and new->new (all inputs -> new outputs when there is no new input), then BN with
    batch statistics and ReLU."""
    kernel, d_in, d_out = params["kernel"], x.shape[-1], params["kernel"].shape[-1]
    old_in, old_out = jnp.arange(d_in) < l_in, jnp.arange(d_out) < l_out
    keep = old_in[:, None] == old_out[None, :]
    if l_in == d_in:
        keep = jnp.ones_like(keep)
    y = jax.lax.conv_general_dilated(
        x,
        kernel * keep[None, None],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    mean, var = jnp.mean(y, axis=(0, 1, 2)), jnp.var(y, axis=(0, 1, 2))
    y = (y - mean[None, None, None]) / jnp.sqrt(var[None, None, None] + 1e-5)
    y = y * params["bn"]["scale"][None, None, None] + params["bn"]["bias"][None, None, None]
    return jax.nn.relu(y)


@pytest.mark.parametrize(
    "d_in, l_in, d_out, l_out",
    [(6, 4, 7, 3), (6, 1, 7, 6), (6, 0, 7, 3), (6, 6, 7, 3), (6, 2, 7, 0), (6, 2, 7, 7)],
)
def test_removed_scheme_as_one_masked_convolution(monkeypatch, d_in, l_in, d_out, l_out):
    """Split convolutions and one convolution with zeroed cross blocks both compute the layer
    written out independently (`_removed_reference`), values and gradients."""
    unit = layers.NRConv(d_out, in_split=l_in, out_split=l_out, scheme="removed")
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, d_in))
    variables = unit.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, variables["params"])  # BN bias away from zero

    def run(min_group):
        monkeypatch.setattr(schemes, "SPLIT_MIN_GROUP", min_group)

        def loss(params, x):
            y, _ = unit.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(y)), y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def reference(params, x):
        y = _removed_reference(params, x, l_in, l_out)
        return jnp.sum(jnp.sin(y)), y

    ref = jax.grad(reference, argnums=(0, 1), has_aux=True)(params, x)
    split, masked = run(0), run(10**6)
    chex.assert_trees_all_close(split, ref, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(masked, ref, rtol=1e-4, atol=1e-5)
    kernel_grad = split[0][0]["kernel"]
    cross = (jnp.arange(d_in) < l_in)[:, None] != (jnp.arange(d_out) < l_out)[None, :]
    if 0 < l_in < d_in:  # cross connections get no gradient
        assert float(jnp.abs(jnp.where(cross, kernel_grad, 0.0)).max()) == 0.0
