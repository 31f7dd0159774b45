"""ImageNet VGG-16 in the official NR form (`vgg16_nr`): structure, counts, NR, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply, init, random_gammas, zero_dead

import nr_jax
from nr_jax import train
from nr_jax.config import base_config

X = jnp.asarray(np.random.default_rng(3).normal(size=(4, 28, 28, 1)), jnp.float32)


def key(seed):
    """An RBG key: XLA compiles its samplers in ~1 s on CPU, threefry's in ~10 s."""
    return jax.random.key(seed, impl="rbg")


def test_tiny_graph_and_counts_on_paper():
    model = nr_jax.models.get("vgg_imagenet_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, X.shape)
    assert [u.name for u in graph.units] == ["conv0", "conv1", "conv2", "fc6", "fc7"]
    assert not any(u.fixed for u in graph.units)  # FC6/FC7 are prunable NR units (7.13)
    assert [u.out_hw for u in graph.units] == [(28, 28), (14, 14), (7, 7), (1, 1), (1, 1)]
    assert graph["fc6"].kernel == (1, 1) and graph["fc6"].inputs == ((frozenset(["conv2"]), 0, 16),)
    # conv weights 9*1*8 + 9*8*16 + 9*16*16 + 16*32 + 32*32; MACs x 784, 196, 49, 1, 1
    c = nr_jax.count(graph)
    assert c.conv == 72 + 1152 + 2304 + 512 + 1024
    assert c.macs == 72 * 784 + 1152 * 196 + 2304 * 49 + 512 + 1024
    assert c.classifier == 32 * 10 + 10
    shapes = graph.variable_shapes["params"]
    assert shapes["fc7"]["kernel"].shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="average pool"):
        nr_jax.channel_graph(model, (1, 16, 16, 1))  # 4x4 maps < the 7x7 pool


def test_rejuvenation_invariants_and_survivor_path():
    model = nr_jax.models.get("vgg_imagenet_tiny", num_classes=10)
    variables = init(model, key(0), X)
    np.testing.assert_array_equal(variables["params"]["fc6"]["bn"]["scale"], 0.5)  # γ init 0.5
    graph = nr_jax.channel_graph(model, X.shape)
    variables, _ = random_gammas(variables, graph, seed=0)
    _, upd = apply(model, variables, X, train=True)
    variables = jax.device_get({**variables, **upd})
    live = nr_jax.liveness(variables, graph)
    tx = optax.chain(
        nr_jax.l1_bn_scales(graph, 1e-4),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.1, momentum=0.9),
    )
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: rng.standard_normal(np.shape(s)).astype(s.dtype) if np.ndim(s) else s,
        tx.init(variables["params"]),
    )
    res = nr_jax.rejuvenate(key(1), model, variables, state, tx, graph)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.variables, jax.eval_shape(lambda: init(res.model, key(0), X))
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(res.opt_state, tx.init(res.variables["params"]))
    chex.assert_tree_all_finite(res.variables)
    chex.assert_tree_all_finite(res.opt_state)
    for u in graph.units:
        keep_out, keep_in = np.flatnonzero(live.out[u.name]), np.flatnonzero(live.inp[u.name])
        old_k = variables["params"][u.name]["kernel"]
        new_k = np.asarray(res.variables["params"][u.name]["kernel"])
        lo, li = len(keep_out), len(keep_in)
        np.testing.assert_array_equal(new_k[:, :, :li, :lo], old_k[:, :, keep_in][..., keep_out])
        assert not np.any(new_k[:, :, li:, :lo])
        assert res.graph[u.name].out_channels >= lo
    # the survivors' head reproduces the old network with its dead channels zeroed
    reference = apply(model, zero_dead(variables, live), X)
    out = apply(res.model, res.variables, X)
    assert out.shape == (X.shape[0], 2, 10)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)


def test_train_steps_with_one_rejuvenation():
    config = base_config()
    config.model = "vgg_imagenet_tiny"  # 28x28 Fashion-MNIST fits its 7x7 average pool
    config.nr.lam = 1e-3
    config.progress = False
    config.data_parallel = False  # trace counts on one device (sharding: tests/test_train.py)
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), key(0))
    rng = np.random.default_rng(0)

    def batch():
        return {
            "image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
            "mask": jnp.ones((8,), jnp.float32),
        }

    for _ in range(2):
        state, metrics = trainer.steps.train(state, batch())
    assert 0 < float(metrics["utilization"]) <= 1
    variables, _ = random_gammas(jax.device_get(state.variables), trainer.graph, 1)
    state = state.replace(params=variables["params"])
    res = nr_jax.rejuvenate(
        key(1), trainer.model, state.variables, state.opt_state, trainer.tx, trainer.graph
    )
    trainer.set_widths(res.model.widths)
    state = state.replace(
        params=res.variables["params"],
        batch_stats=res.variables["batch_stats"],
        masks=res.variables[nr_jax.MASKS],
        opt_state=nr_jax.set_lambda(res.opt_state, 0.0),
    )
    for _ in range(2):
        state, metrics = trainer.steps.train(state, batch())
    assert trainer.counter == {"train": 2}
    assert "accuracy_new" in metrics and np.isfinite(float(metrics["loss"]))
    chex.assert_tree_all_finite(state.params)


@pytest.mark.slow
def test_full_size_vgg16_imagenet():
    model = nr_jax.models.get("vgg16_imagenet", num_classes=1000)
    shape = (2, 224, 224, 3)
    c = nr_jax.count(nr_jax.channel_graph(model, shape))
    print(f"vgg16_imagenet: {c.total:,} params, {c.macs / 1e9:.3f} GMACs")
    assert c.total == pytest.approx(37.707e6, rel=1e-3)  # method.md 5.3
    assert c.macs / 1e9 == pytest.approx(15.366, rel=1e-3)
    x = jnp.ones(shape, jnp.float32)
    variables = init(model, key(0), x)
    labels = jnp.zeros((2,), jnp.int32)

    @jax.jit
    def step(variables):
        def loss_fn(params):
            out, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return nr_jax.nr_loss(out, labels), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {**variables, **upd, "params": params}, loss

    variables, loss = step(variables)
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(variables["params"])
