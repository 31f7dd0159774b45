"""`nr_jax.merge`: a rejuvenated network (cross connections removed) as an ordinary one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply, init, random_gammas

import nr_jax
from nr_jax.merging import merge

XV = jax.random.normal(jax.random.key(7), (4, 16, 16, 3))


def rejuvenated(name, seed=0, **kwargs):
    model = nr_jax.models.get(name, num_classes=10, **kwargs)
    variables = init(model, jax.random.key(seed), XV)
    graph = nr_jax.channel_graph(model, XV.shape)
    variables, _ = random_gammas(variables, graph, seed, dead_frac=0.5)
    _, upd = apply(model, variables, XV, train=True)
    tx = optax.sgd(0.1, momentum=0.9)
    params = variables["params"]
    opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    res = nr_jax.rejuvenate(jax.random.key(1), model, {**variables, **upd}, opt_state, tx, graph)
    return res, tx


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vgg_tiny", {}),
        pytest.param("vgg_tiny", {"bias_in_both_heads": True}, marks=pytest.mark.slow),
        pytest.param("resnet_tiny_basic", {"prune_residual": True}, marks=pytest.mark.slow),
        ("densenet_tiny", {}),
    ],
)
def test_merge_keeps_the_function(name, kwargs):
    res, tx = rejuvenated(name, **kwargs)
    reference = nr_jax.predict(apply(res.model, res.variables, XV))
    m = merge(res.model, res.variables, res.opt_state, tx, res.graph)
    out = apply(m.model, m.variables, XV)
    assert out.shape == reference.shape  # one classifier
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(out - reference))) <= 1e-5 * scale
    assert not m.graph.rejuvenated
    assert m.graph.widths == res.graph.widths
    if name == "densenet_tiny":  # [survivors of all, new of all] re-laid out producer by producer
        assert any(
            not np.array_equal(
                res.variables["params"][n]["kernel"], m.variables["params"][n]["kernel"]
            )
            for n in (u.name for u in res.graph.all_units)
        )
    # the optimiser state follows its (possibly re-ordered) parameters
    jax.tree.map(
        lambda t, p: np.testing.assert_equal(t.shape, p.shape),
        m.opt_state[0].trace,
        m.variables["params"],
    )


def test_merged_cross_blocks_train_again():
    res, tx = rejuvenated("vgg_tiny")
    m = merge(res.model, res.variables, res.opt_state, tx, res.graph)

    def loss(params):
        out, _ = m.model.apply(
            {**m.variables, "params": params}, XV, train=True, mutable=["batch_stats"]
        )
        return nr_jax.nr_loss(out, jnp.arange(XV.shape[0]) % 10)

    grads = jax.jit(jax.grad(loss))(m.variables["params"])
    u = next(u for u in res.graph.units if u.in_split < u.in_channels and u.out_split)
    g = np.asarray(grads[u.name]["kernel"])
    assert np.any(g[:, :, u.in_split :, : u.out_split])  # new inputs -> old outputs


def test_merge_refuses_attention_and_plain_networks():
    res, tx = rejuvenated("vgg_tiny", scheme="attention")
    with pytest.raises(ValueError, match="cross-attention"):
        merge(res.model, res.variables, None, tx, res.graph)
    model = nr_jax.models.get("vgg_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, XV.shape)
    with pytest.raises(ValueError, match="not rejuvenated"):
        merge(model, {}, None, tx, graph)
