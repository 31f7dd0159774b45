"""DenseNet: liveness through concatenations on paper, rejuvenation's [survivors, new] layout.

The crux (method.md 7.5): after rejuvenation a dense consumer must see [survivors of every
producer, new channels of every producer]. The layout is checked on paper here; the family
contract (tests/test_families.py) checks it end to end on densenet_tiny: survivors bit-identical,
momentum following its channels, and the survivors' head of the rejuvenated network reproducing
the old network with its dead channels zeroed, through every concatenation.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply, init, one_sgd_step, random_gammas, set_gammas, sgd_chain, zero_dead

import nr_jax
from nr_jax.graph import INPUT
from nr_jax.models.densenet import DenseNet

X = jnp.asarray(np.random.default_rng(7).normal(size=(4, 8, 8, 3)), jnp.float32)


def key(seed):
    """An RBG key: XLA compiles its samplers in ~1 s on CPU, threefry's in ~10 s."""
    return jax.random.key(seed, impl="rbg")


# A hand-sized dense block: stem 3x3 1->3, two dense layers (1x1 -> 2, 3x3 -> 2), no transition.
HAND = DenseNet(blocks=(2,), growth=2, bn_size=1, stem_features=3, num_classes=3)
XH = jnp.ones((2, 8, 8, 1))
HAND_GAMMAS = {
    "stem": [1.0, 0.0, -1.0],  # live [1, 0, 1]
    "b1l1_conv1": [1.0, 1.0],  # live [1, 1], from 2 of 3 inputs
    "b1l1_conv2": [1.0, 0.001],  # live [1, 0]
    "b1l2_conv1": [0.5, 0.5],  # live [1, 1], from concat(stem, l1) = [1, 0, 1, 1, 0]
    "b1l2_conv2": [0.0, 1.0],  # live [0, 1]
}


def tiny_setup(seed=0, dead_frac=0.5, gammas=None):
    """densenet_tiny with random live masks (or given γ) and non-trivial running statistics."""
    model = nr_jax.models.get("densenet_tiny", num_classes=10)
    variables = init(model, key(seed), X)
    graph = nr_jax.channel_graph(model, X.shape)
    variables, _ = random_gammas(variables, graph, seed, dead_frac)
    if gammas:
        variables = set_gammas(variables, gammas)
    _, upd = apply(model, variables, X, train=True)
    return model, {**variables, **upd}, graph


def test_graph_of_tiny_densenet():
    graph = nr_jax.channel_graph(nr_jax.models.get("densenet_tiny", num_classes=10), X.shape)
    assert [u.name for u in graph.units] == [
        "stem",
        "b1l1_conv1",
        "b1l1_conv2",
        "b1l2_conv1",
        "b1l2_conv2",
        "t1",
        "b2l1_conv1",
        "b2l1_conv2",
        "b2l2_conv1",
        "b2l2_conv2",
    ]
    assert not any(u.fixed for u in graph.units)  # method.md 2.3: nothing fixed in DenseNet
    assert graph["b1l2_conv1"].inputs == (
        (frozenset(["stem"]), 0, 8),
        (frozenset(["b1l1_conv2"]), 0, 4),
    )
    assert graph["t1"].inputs[-1] == (frozenset(["b1l2_conv2"]), 0, 4)
    assert graph["t1"].out_channels == 8 and graph["t1"].out_hw == (8, 8)  # floor(16 / 2)
    assert graph["b2l1_conv1"].inputs == ((frozenset(["t1"]), 0, 8),)
    assert graph["b2l1_conv1"].out_hw == (4, 4)  # after the transition's 2x2 average pool
    assert graph.classifier.inputs == (
        (frozenset(["t1"]), 0, 8),
        (frozenset(["b2l1_conv2"]), 0, 4),
        (frozenset(["b2l2_conv2"]), 0, 4),
    )


def test_utilization_on_paper():
    variables = set_gammas(init(HAND, key(0), XH), HAND_GAMMAS)
    graph = nr_jax.channel_graph(HAND, XH.shape)
    live = nr_jax.liveness(jax.device_get(variables), graph)
    # a consumer's live inputs are the concatenation of its producers' live outputs
    np.testing.assert_array_equal(live.inp["b1l2_conv1"], [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(live.inp["head"], [1, 0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(live.out["b1l1_conv2"], [1, 0])
    # params live: stem 9*1*2, l1c1 1*2*2, l1c2 9*2*1, l2c1 1*3*2, l2c2 9*2*1 = 64
    # of 27 + 6 + 36 + 10 + 36 = 115; no stride, so flops = params x 64 positions
    u = nr_jax.utilization(live, graph)
    assert float(u.live) == 64 and float(u.total) == 115
    assert float(u.flops_live) == 64 * 64 and float(u.flops_total) == 115 * 64
    c = nr_jax.count(graph)
    assert (c.conv, c.bn, c.classifier) == (115, 2 * 11, 7 * 3 + 3)
    assert c.macs == 115 * 64

    # rejuvenation with doubled widths: the consumers' inputs are [all survivors, all new]
    def double(graph, survivors, r):
        return {n: 2 * k for n, k in survivors.items()}

    res = nr_jax.rejuvenate(
        key(1), HAND, variables, None, optax.identity(), graph, allocation=double
    )
    assert res.report.r == pytest.approx(math.sqrt(115 / 64))
    assert res.graph.widths == {
        "stem": 4,
        "b1l1_conv1": 4,
        "b1l1_conv2": 2,
        "b1l2_conv1": 4,
        "b1l2_conv2": 2,
    }
    l2c1, head = res.graph["b1l2_conv1"], res.graph.classifier
    assert (l2c1.in_channels, l2c1.in_split) == (6, 3)
    assert l2c1.inputs == (
        (frozenset(["stem"]), 0, 2),
        (frozenset(["b1l1_conv2"]), 0, 1),
        (frozenset(["stem"]), 2, 4),
        (frozenset(["b1l1_conv2"]), 1, 2),
    )
    assert (head.in_channels, head.in_split) == (8, 4)
    assert head.inputs[:3] == (
        (frozenset(["stem"]), 0, 2),
        (frozenset(["b1l1_conv2"]), 0, 1),
        (frozenset(["b1l2_conv2"]), 0, 1),
    )
    assert res.graph["stem"].inputs == ((frozenset([INPUT]), 0, 1),)
    # the survivors' kernel columns of b1l2_conv1 are its old live inputs, in producer order
    old = np.asarray(variables["params"]["b1l2_conv1"]["kernel"])
    new = np.asarray(res.variables["params"]["b1l2_conv1"]["kernel"])
    np.testing.assert_array_equal(new[:, :, :3, :2], old[:, :, [0, 2, 3]])


@pytest.mark.parametrize(
    "killed, dead_units",
    [
        ("b1l2_conv2", ("b1l2_conv2",)),  # the 3x3 conv of a dense layer: γ all ~0
        ("b2l1_conv1", ("b2l1_conv1", "b2l1_conv2")),  # its bottleneck: the 3x3 has no live input
    ],
)
def test_whole_dead_dense_layer(killed, dead_units):
    n = 4 if killed.endswith("conv2") else 16
    model, variables, graph = tiny_setup(seed=2, gammas={killed: np.full(n, 1e-5, np.float32)})
    live = nr_jax.liveness(jax.device_get(variables), graph)
    assert {u for u, d in live.dead.items() if d} == set(dead_units)
    reference = apply(model, zero_dead(variables, live), X)
    res = nr_jax.rejuvenate(key(1), model, variables, None, optax.identity(), graph, min_width=2)
    assert res.report.dead_units == dead_units
    for name in dead_units:
        dead = res.graph[name]
        assert dead.out_channels == 2 and dead.out_split == 0
        np.testing.assert_array_equal(res.variables[nr_jax.MASKS][name]["mask"], [0, 0])
    # the consumers see none of the dead layer's channels among their survivors
    for u in res.graph.all_units:
        assert u.in_split == int(np.sum(live.inp[u.name]))
    out = apply(res.model, res.variables, X)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)


def quarter_setup():
    """densenet_tiny at a utilisation just under 0.25 (r in [2, 3))."""
    model, variables, graph = tiny_setup(seed=2, dead_frac=0.55)
    u = float(nr_jax.utilization(nr_jax.liveness(jax.device_get(variables), graph), graph).ratio)
    assert 1 / 9 < u <= 0.25, u
    return model, variables, graph, u


def test_integer_allocation_doubles_every_width():
    model, variables, graph, u = quarter_setup()
    res = nr_jax.rejuvenate(
        key(0),
        model,
        variables,
        None,
        optax.identity(),
        graph,
        allocation=nr_jax.integer_allocation,
    )
    assert 2 <= res.report.r < 3
    for name, k in res.report.survivors.items():
        assert k > 0
        assert res.report.widths_after[name] == 2 * k
    # effective conv weights: old->old plus new->new, each the live count: 2 x live = 2U x all
    after, before = res.report.counts_after, res.report.counts_before
    live = nr_jax.utilization(nr_jax.liveness(jax.device_get(variables), graph), graph)
    assert after.effective - after.bn - after.classifier == 2 * int(live.live)
    # effective parameters are about half the baseline (method.md 5.3)
    assert 0.35 < after.effective / before.total < 0.6
    assert after.total <= before.total


def _one_train_step(model, shape):
    x = jnp.ones(shape, jnp.float32)
    graph = nr_jax.channel_graph(model, shape)
    variables = init(model, key(0), x)
    labels = jnp.zeros((shape[0],), jnp.int32)
    variables, _, loss = one_sgd_step(model, sgd_chain(graph), variables, x, labels)
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(variables["params"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, num_classes, hw, params, gmacs",
    [
        ("densenet_bc100_k40_cifar", 10, 32, 8.269e6, 3.194),
        ("densenet_bc100_k40_cifar", 100, 32, 8.372e6, 3.194),
        ("densenet121", 1000, 224, 7.916e6, 2.833),
    ],
)
def test_full_size(name, num_classes, hw, params, gmacs):
    model = nr_jax.models.get(name, num_classes=num_classes)
    c = nr_jax.count(nr_jax.channel_graph(model, (1, hw, hw, 3)))
    print(f"{name} C{num_classes}: {c.total:,} params, {c.macs / 1e9:.3f} GMACs")
    assert c.total == pytest.approx(params, rel=1e-3)  # method.md 5.3
    assert c.macs / 1e9 == pytest.approx(gmacs, rel=1e-3)
    if num_classes != 100:
        _one_train_step(model, (2, hw, hw, 3))


@pytest.mark.slow
def test_k12_variant_counts():
    c = nr_jax.count(
        nr_jax.channel_graph(
            nr_jax.models.get("densenet_bc100_k12_cifar", num_classes=10), (1, 32, 32, 3)
        )
    )
    assert c.total == 751_498 and c.macs == 287_926_272  # DenseNet-BC-100 (k=12): 0.8M
