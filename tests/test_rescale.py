"""Neural rescaling preserves the function exactly, on every model family (float32 tolerance)."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import apply, init, random_gammas

import nr_jax
from nr_jax.rescale import rescale

# each family once, the two schemes alternating (every new shape compiles on CPU)
CASES = [
    (n, s)
    for n, s in (
        ("vgg_tiny", "removed"),
        ("vgg_tiny", "attention"),
        ("resnet_tiny_cifar", "attention"),
        ("resnet_tiny_basic", "removed"),
        ("densenet_tiny", "removed"),
        ("densenet_tiny", "attention"),
    )
    if n in nr_jax.models.names()
]
X = jax.random.normal(jax.random.key(3), (4, 28, 28, 1))


def rejuvenated(name, scheme, seed=0):
    model = nr_jax.models.get(name, num_classes=10, scheme=scheme)
    variables = init(model, jax.random.key(seed), X)
    graph = nr_jax.channel_graph(model, X.shape)
    variables, _ = random_gammas(variables, graph, seed)
    _, upd = apply(model, variables, X, train=True)
    variables = {**variables, **upd}
    return nr_jax.rejuvenate(jax.random.key(1), model, variables, None, optax.identity(), graph)


@pytest.mark.parametrize(("name", "scheme"), CASES)
def test_rescaling_preserves_function(name, scheme):
    res = rejuvenated(name, scheme)
    new = rescale(res.variables, res.graph, target=0.5)
    new = jax.tree.map(np.asarray, new)
    # survivors were brought up to |γ| >= t (non-fixed, untied units)
    lifted = 0
    for u in res.graph.units:
        if u.fixed or u.tie is not None:
            chex.assert_trees_all_equal(
                new["params"][u.name]["bn"], res.variables["params"][u.name]["bn"]
            )
            continue
        g_old = np.abs(np.asarray(res.variables["params"][u.name]["bn"]["scale"]))
        g_new = np.abs(new["params"][u.name]["bn"]["scale"])
        assert np.all(g_new >= np.minimum(0.5, g_old) - 1e-7)
        assert np.all(g_new[g_old < 0.5] == np.float32(0.5))
        lifted += int(np.sum(g_old < 0.5))
    assert lifted > 0
    for train in (False, True):
        before = apply(res.model, res.variables, X, train=train)
        after = apply(res.model, new, X, train=train)
        chex.assert_trees_all_close(after, before, atol=2e-4, rtol=2e-4)


def test_rescale_rejects_bad_target():
    res = rejuvenated("vgg_tiny", "removed")
    with pytest.raises(ValueError, match="target"):
        rescale(res.variables, res.graph, target=0.0)
