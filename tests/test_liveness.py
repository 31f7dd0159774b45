"""Channel graph, liveness and utilisation on a hand-built 3-unit net, checked on paper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ThreeUnitNet, init, set_gammas

import nr_jax

X = jnp.ones((2, 8, 8, 2))
# a: live [1, 0, 1, 0] (0.005 < 1e-2 * 1); b: live [1, 1, 0, 1]; c: max|γ| < 1e-3 -> all-dead
GAMMAS = {"a": [1.0, 0.005, -0.5, 0.0], "b": [0.2, -0.2, 0.001, 0.2], "c": [5e-4, -2e-4]}


@pytest.fixture(scope="module")
def net():
    model = ThreeUnitNet()
    variables = init(model, jax.random.key(0), X)
    graph = nr_jax.channel_graph(model, X.shape)
    return model, set_gammas(variables, GAMMAS), graph


def test_graph_structure(net):
    _, _, graph = net
    assert [u.name for u in graph.units] == ["a", "b", "c"]
    a, b, c = graph.units
    assert (a.in_channels, a.out_channels, a.kernel, a.out_hw) == (2, 4, (3, 3), (8, 8))
    assert (b.in_channels, b.out_hw) == (4, (4, 4))
    assert c.kernel == (1, 1) and c.out_hw == (4, 4)
    assert graph.classifier.name == "head" and graph.classifier.in_channels == 2
    assert b.inputs == ((frozenset(["a"]), 0, 4),)
    assert a.inputs == ((frozenset([nr_jax.graph.INPUT]), 0, 2),)
    assert graph.l1_scale_paths() == {
        ("a", "bn", "scale"),
        ("b", "bn", "scale"),
        ("c", "bn", "scale"),
    }


@pytest.mark.parametrize("jit", [False, True])
def test_liveness_on_paper(net, jit):
    _, variables, graph = net
    f = lambda v: nr_jax.liveness(v, graph)  # noqa: E731
    live = jax.device_get((jax.jit(f) if jit else f)(variables))
    np.testing.assert_array_equal(live.out["a"], [1, 0, 1, 0])
    np.testing.assert_array_equal(live.out["b"], [1, 1, 0, 1])
    np.testing.assert_array_equal(live.out["c"], [0, 0])
    np.testing.assert_array_equal(live.inp["b"], [1, 0, 1, 0])
    assert bool(live.dead["c"]) and not bool(live.dead["a"])


class TestUtilizationOnPaper(chex.TestCase):
    """params: a 2*2*9=36 of 72, b 2*3*9=54 of 144, c 0 of 8 -> 90/224.
    flops: a x 64 positions, b and c x 16 -> (2304 + 864) / (4608 + 2304 + 128) = 3168/7040."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_counts(self):
        model = ThreeUnitNet()
        variables = set_gammas(init(model, jax.random.key(0), X), GAMMAS)
        graph = nr_jax.channel_graph(model, X.shape)

        @self.variant
        def f(v):
            live = nr_jax.liveness(v, graph)
            return nr_jax.utilization(live, graph), nr_jax.utilization(live, graph, "flops")

        up, uf = f(variables)
        assert float(up.live) == 90 and float(up.total) == 224
        assert float(up.ratio) == pytest.approx(90 / 224)
        assert float(uf.live) == 3168 and float(uf.total) == 7040
        assert float(uf.ratio) == pytest.approx(3168 / 7040)
        assert float(up.flops_live) == 3168 and float(uf.params_live) == 90


def test_liveness_jit_and_eager_agree_on_random_gammas():
    model = nr_jax.models.get("vgg_tiny", num_classes=10)
    x = jnp.ones((1, 16, 16, 1))
    variables = init(model, jax.random.key(1), x)
    graph = nr_jax.channel_graph(model, x.shape)
    rng = np.random.default_rng(0)
    gammas = {u.name: rng.choice([0.0, 1e-3, 0.3, 1.0], u.out_channels) for u in graph.units}
    variables = set_gammas(variables, gammas)
    eager = nr_jax.liveness(variables, graph)
    jitted = jax.jit(lambda v: nr_jax.liveness(v, graph))(variables)
    chex.assert_trees_all_equal(eager, jitted)


def test_sticky_mask_marks_unit_dead(net):
    _, variables, graph = net
    masks = jax.tree.map(lambda x: x, variables[nr_jax.MASKS])
    masks["a"]["mask"] = jnp.zeros(4)
    live = nr_jax.liveness({**variables, nr_jax.MASKS: masks}, graph)
    assert bool(live.dead["a"]) and bool(live.dead["b"])  # b has no live input left
    assert float(nr_jax.utilization(live, graph).live) == 0


def test_counts_vgg19_cifar():
    model = nr_jax.models.get("vgg19_cifar", num_classes=10)
    c = nr_jax.count(nr_jax.channel_graph(model, (1, 32, 32, 3)))
    assert c.total == 20_035_018  # method.md 5.3: 20.035M
    assert c.macs == 2_606_432_256  # 2.606 GMACs
    c100 = nr_jax.count(
        nr_jax.channel_graph(nr_jax.models.get("vgg19_cifar", num_classes=100), (1, 32, 32, 3))
    )
    assert round(c100.total / 1e6, 3) == 20.081


def test_mask_value_change_does_not_retrace(net):
    model, variables, _ = net
    traces = []

    @jax.jit
    def f(v):
        traces.append(1)
        return model.apply(v, X, train=False)

    f(variables)
    masks = jax.tree.map(jnp.zeros_like, variables[nr_jax.MASKS])
    out = f({**variables, nr_jax.MASKS: masks})
    assert len(traces) == 1
    chex.assert_trees_all_close(
        out, jnp.broadcast_to(variables["params"]["head"]["bias"], out.shape)
    )


def test_untracked_op_gives_clear_error():
    import flax.linen as nn

    class Bad(nn.Module):
        widths: nr_jax.WidthSpec = nr_jax.WidthSpec()

        @nn.compact
        def __call__(self, x, train=False):
            x = nr_jax.conv_unit(self.widths, "a", 4)(x, train)
            x = jnp.tanh(x)  # not routed through nr_jax.layers
            return nr_jax.conv_unit(self.widths, "b", 4)(x, train)

    with pytest.raises(ValueError, match="unit 'b'"):
        nr_jax.channel_graph(Bad(), (1, 8, 8, 1))
