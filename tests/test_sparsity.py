"""The L1 transform on paper: exactly λ·sign(γ) on the prunable γ gradients, nothing else.

A hand-built net of three NR units: `a` (prunable, 3 channels), `b` (fixed, 2 channels) and `c`
(prunable, 2 channels) inside a submodule `blk`, so its parameters sit one level deeper (path
"blk/c"), then the classifier. Every gradient and γ is written out; λ = 0.25 and the gradients are
dyadic, so `g + λ·sign(γ)` is exact in float32 and the expected values are literal numbers.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nr_jax
from nr_jax import layers

LAM = 0.25
SHAPE = (1, 4, 4, 1)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return layers.conv_unit(layers.WidthSpec(), "c", 2, kernel_size=1)(x, train)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        widths = layers.WidthSpec()
        x = layers.conv_unit(widths, "a", 3, kernel_size=1)(x, train)
        x = layers.conv_unit(widths, "b", 2, kernel_size=1, fixed=True)(x, train)
        x = Block(name="blk")(x, train)
        return layers.classifier_unit(widths, 2)(x)


@pytest.fixture(scope="module")
def graph():
    return nr_jax.channel_graph(Tiny(), SHAPE)


def tree(graph, fill):
    """A params-shaped tree of float32 arrays `fill(path, shape)`, paths as '/'-joined keys."""
    return jax.tree_util.tree_map_with_path(
        lambda p, s: np.asarray(fill(jax.tree_util.keystr(p, simple=True, separator="/"), s.shape)),
        graph.variable_shapes["params"],
    )


GAMMAS = {"a": [0.5, -0.75, 0.0], "b": [-1.0, 2.0], "blk/c": [-0.125, 3.0]}
GRADS = {"a": [0.5, 0.5, -1.0], "b": [0.125, -0.5], "blk/c": [1.0, 0.0]}
# g + λ·sign(γ): a [0.5 + 0.25, 0.5 - 0.25, -1.0 + 0] (sign(0) = 0); blk/c [1.0 - 0.25, 0 + 0.25]
EXPECTED = {"a": [0.75, 0.25, -1.0], "b": [0.125, -0.5], "blk/c": [0.75, 0.25]}


def params_and_grads(graph):
    """γ and the γ gradients as above; every other leaf a distinct non-zero pattern."""

    def fill(values):
        def leaf(path, shape):
            unit = path.removesuffix("/bn/scale")
            if path.endswith("/bn/scale"):
                return np.asarray(values[unit], np.float32)
            step = 0.5 if values is GRADS else -2.0
            return (step * np.arange(1, np.prod(shape) + 1, dtype=np.float32)).reshape(shape)

        return leaf

    return tree(graph, fill(GAMMAS)), tree(graph, fill(GRADS))


def flat(t):
    """{'/'-joined key path: leaf} of a tree."""
    leaves = jax.tree_util.tree_flatten_with_path(t)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in leaves}


def test_the_hand_built_graph(graph):
    assert [u.name for u in graph.units] == ["a", "b", "blk/c"]
    assert graph.l1_scale_paths() == {("a", "bn", "scale"), ("blk", "c", "bn", "scale")}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adds_exactly_lambda_sign_gamma_to_prunable_scales(graph, jit):
    params, grads = params_and_grads(graph)
    tx = nr_jax.l1_bn_scales(graph, LAM)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out, new_state = update(grads, state, params)
    flat_out, flat_in = flat(out), flat(grads)
    assert set(flat_out) == set(flat_in)
    changed = {"a/bn/scale", "blk/c/bn/scale"}
    for path, g in flat_in.items():
        new = np.asarray(flat_out[path])
        assert new.dtype == g.dtype and new.shape == g.shape, path
        unit = path.removesuffix("/bn/scale")
        if path in changed:
            np.testing.assert_array_equal(new, np.asarray(EXPECTED[unit], np.float32), path)
        else:  # fixed units' γ, BN biases, kernels, the classifier: bit for bit
            np.testing.assert_array_equal(new.view(np.uint32), g.view(np.uint32), path)
    np.testing.assert_array_equal(flat_out["b/bn/scale"], EXPECTED["b"])
    assert float(new_state.lam) == LAM  # update never changes λ


def test_lambda_zero_is_the_identity(graph):
    params, grads = params_and_grads(graph)
    tx = nr_jax.l1_bn_scales(graph, 0.0)
    out, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal(out, grads)


def test_first_in_a_chain_before_decay_and_momentum(graph):
    """In the official order the momentum buffer of a prunable γ starts at g + λ·sign(γ)."""
    params, grads = params_and_grads(graph)
    tx = optax.chain(nr_jax.l1_bn_scales(graph, LAM), optax.sgd(1.0, momentum=0.5))
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["a"]["bn"]["scale"], -np.asarray(EXPECTED["a"]))
    np.testing.assert_array_equal(
        updates["blk"]["c"]["bn"]["scale"], -np.asarray(EXPECTED["blk/c"])
    )
    np.testing.assert_array_equal(updates["b"]["bn"]["scale"], -np.asarray(GRADS["b"]))
    np.testing.assert_array_equal(state[1][0].trace["a"]["bn"]["scale"], EXPECTED["a"])


def test_set_and_get_lambda(graph):
    params, grads = params_and_grads(graph)
    tx = optax.chain(
        nr_jax.l1_bn_scales(graph, LAM), optax.add_decayed_weights(1e-4), optax.sgd(0.1, 0.9)
    )
    state = tx.init(params)
    assert nr_jax.get_lambda(state).dtype == jnp.float32
    assert float(nr_jax.get_lambda(state)) == LAM
    new = nr_jax.set_lambda(state, 0.5)
    assert float(nr_jax.get_lambda(new)) == 0.5
    assert float(nr_jax.get_lambda(state)) == LAM  # pure: the old state is untouched
    chex.assert_trees_all_equal_structs(new, state)
    chex.assert_trees_all_equal(new[1:], state[1:])  # nothing else changes
    # the new λ acts, through one trace: λ is state, not a constant of the compiled update
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    for lam in (LAM, 0.5, 0.0):
        out, _ = update(grads, nr_jax.set_lambda(state, lam), params)
        sign = np.sign(GAMMAS["a"])
        expected = -0.1 * (np.asarray(GRADS["a"]) + lam * sign + 1e-4 * np.asarray(GAMMAS["a"]))
        np.testing.assert_allclose(out["a"]["bn"]["scale"], expected, rtol=1e-6)


def test_set_lambda_sets_every_l1_state_and_get_lambda_reads_the_first(graph):
    params, _ = params_and_grads(graph)
    tx = optax.chain(nr_jax.l1_bn_scales(graph, 0.1), nr_jax.l1_bn_scales(graph, 0.2))
    state = tx.init(params)
    assert float(nr_jax.get_lambda(state)) == pytest.approx(0.1)
    new = nr_jax.set_lambda(state, 0.25)
    assert [float(s.lam) for s in new] == [0.25, 0.25]


def test_errors_say_what_was_expected(graph):
    params, grads = params_and_grads(graph)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        nr_jax.l1_bn_scales(graph, -1e-4)
    tx = nr_jax.l1_bn_scales(graph, LAM)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, tx.init(params))
    plain = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match="no l1_bn_scales state"):
        nr_jax.set_lambda(plain, 0.0)
    with pytest.raises(ValueError, match="no l1_bn_scales state"):
        nr_jax.get_lambda(plain)
