"""ResNets as NR models: residual ties, fixed units, prunable streams, dead branches, sizes.

What every family keeps (survivors bit-identical, the survivors' function, effective parameters
at U ~ 0.25, the trainer through one rejuvenation) is checked on the tiny ResNets, official and
prune_residual, in tests/test_families.py.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    apply,
    gammas_at_utilization,
    host_variables,
    init,
    kept_outputs,
    one_sgd_step,
    random_gammas,
    set_gammas,
    sgd_chain,
    zero_dead,
)

import nr_jax
from nr_jax.models.resnet import ResNet

XV = jax.random.normal(jax.random.key(7), (4, 8, 8, 3))  # tiny CIFAR nets: 8x8 -> 4x4 -> 2x2


def host_liveness(variables, graph):
    """Liveness on the host (numpy path: nothing is compiled)."""
    return nr_jax.liveness(jax.device_get(variables), graph)


# ---------------------------------------------------------------------------------------------
# 1. A 2-block residual net on paper
# ---------------------------------------------------------------------------------------------


def two_block_net(prune_residual):
    """stem 3x3 (1->2) | block s1b0: conv1 3x3 2->2, conv2 3x3 2->2, identity shortcut |
    block s2b0 (stride 2): conv1 3x3 2->4, conv2 3x3 4->4, down 1x1 2->4 | head (3 classes)."""
    return ResNet(
        stage_sizes=(1, 1),
        block="basic",
        planes=(2, 4),
        strides=(1, 2),
        stem="cifar",
        stem_width=2,
        num_classes=3,
        prune_residual=prune_residual,
    )


X2 = jnp.ones((2, 4, 4, 1))
# interior: s1b0_conv1 live [1, 0]; s2b0_conv1 live [1, 0, 1, 0] (0.004 < 1e-2 * 0.5)
# stream 1 {stem, s1b0_conv2}: channel 1 dead in both -> [1, 0] when prunable
# stream 2 {s2b0_conv2, s2b0_down}: channel 1 dead in both, channel 2 live in conv2 -> [1, 0, 1, 1]
GAMMAS2 = {
    "stem": [1.0, 1e-4],
    "s1b0_conv1": [1.0, 0.001],
    "s1b0_conv2": [0.8, 1e-5],
    "s2b0_conv1": [0.5, 0.0, 0.3, 0.004],
    "s2b0_conv2": [1.0, 1e-4, 1.0, 1.0],
    "s2b0_down": [1.0, 1e-4, 1e-4, 1.0],
}


@pytest.fixture(scope="module")
def net2():
    graphs = {p: nr_jax.channel_graph(two_block_net(p), X2.shape) for p in (False, True)}
    return set_gammas(host_variables(graphs[False]), GAMMAS2), graphs


def test_two_block_graph_structure(net2):
    _, graphs = net2
    g = graphs[False]
    assert [u.name for u in g.units] == [
        "stem",
        "s1b0_conv1",
        "s1b0_conv2",
        "s2b0_conv1",
        "s2b0_conv2",
        "s2b0_down",
    ]
    assert set(g.ties) == {
        frozenset({"stem", "s1b0_conv2"}),
        frozenset({"s2b0_conv2", "s2b0_down"}),
    }
    assert g["s2b0_conv1"].inputs == ((frozenset({"stem", "s1b0_conv2"}), 0, 2),)
    assert g.classifier.inputs == ((frozenset({"s2b0_conv2", "s2b0_down"}), 0, 4),)
    assert g["s2b0_down"].strides == (2, 2) and g["s2b0_down"].out_hw == (2, 2)
    # the official rule: only interior convs are prunable; prune_residual: every conv
    assert g.l1_scale_paths() == {("s1b0_conv1", "bn", "scale"), ("s2b0_conv1", "bn", "scale")}
    assert {p[0] for p in graphs[True].l1_scale_paths()} == {u.name for u in g.units}
    # conv 314 + BN 2*18 + classifier 4*3+3
    c = nr_jax.count(g)
    assert (c.conv, c.bn, c.classifier, c.total, c.macs) == (314, 36, 15, 365, 2336)


@pytest.mark.parametrize("prune", [False, True])
def test_two_block_utilization_on_paper(net2, prune):
    """params, k*k*in_live*out_live per unit (total 18+36+36+72+144+8 = 314):
    official:       stem 9*1*2, s1 conv1 9*2*1, conv2 9*1*2, s2 conv1 9*2*2, conv2 9*2*4, down 2*4
                    = 18+18+18+36+72+8 = 170
    prune_residual: stem 9*1*1, s1 conv1 9*1*1, conv2 9*1*1, s2 conv1 9*1*2, conv2 9*2*3, down 1*3
                    = 9+9+9+18+54+3 = 102
    flops: x16 (4x4) for stem and stage 1, x4 (2x2) for stage 2 (total 90*16 + 224*4 = 2336):
    official 54*16 + 116*4 = 1328; prune_residual 27*16 + 75*4 = 732."""
    variables, graphs = net2
    graph = graphs[prune]
    live = host_liveness(variables, graph)
    up = nr_jax.utilization(live, graph)
    uf = nr_jax.utilization(live, graph, "flops")
    p_live, f_live = (102, 732) if prune else (170, 1328)
    assert (float(up.live), float(up.total)) == (p_live, 314)
    assert (float(uf.live), float(uf.total)) == (f_live, 2336)
    assert float(up.ratio) == pytest.approx(p_live / 314)
    stream1 = [1, 0] if prune else [1, 1]
    stream2 = [1, 0, 1, 1] if prune else [1, 1, 1, 1]
    for name in ("stem", "s1b0_conv2"):
        np.testing.assert_array_equal(live.out[name], stream1)
    for name in ("s2b0_conv2", "s2b0_down"):
        np.testing.assert_array_equal(live.out[name], stream2)
    np.testing.assert_array_equal(live.inp["s1b0_conv1"], stream1)
    np.testing.assert_array_equal(live.inp["s2b0_down"], stream1)
    np.testing.assert_array_equal(live.inp["head"], stream2)
    np.testing.assert_array_equal(live.out["s2b0_conv1"], [1, 0, 1, 0])
    assert not any(bool(d) for d in live.dead.values())


# ---------------------------------------------------------------------------------------------
# 4. prune_residual: the stream narrows only when it may
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", [False, True])
def test_prune_residual_stream(net2, prune):
    variables, graphs = net2
    model, graph = two_block_net(prune), graphs[prune]
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    r = math.sqrt(314 / (102 if prune else 170))
    assert res.report.r == pytest.approx(r)
    survivors = (1, 3) if prune else (2, 4)  # stream 1, stream 2
    for names, s in zip(
        (("stem", "s1b0_conv2"), ("s2b0_conv2", "s2b0_down")), survivors, strict=True
    ):
        for n in names:
            assert res.report.survivors[n] == s
            assert res.graph[n].out_split == s
            assert res.graph[n].out_channels == max(math.floor(s * r), s)
    assert res.graph.classifier.in_split == survivors[1]
    assert res.graph["s2b0_down"].in_split == survivors[0]
    # without growth (allocation = survivors) a reclaimed stream is literally narrower
    keep = lambda graph, surv, r: dict(surv)  # noqa: E731
    res = nr_jax.rejuvenate(
        jax.random.key(0), model, variables, None, optax.identity(), graph, allocation=keep
    )
    assert res.graph["stem"].out_channels == res.graph["s1b0_conv2"].out_channels == survivors[0]
    assert res.graph["s2b0_down"].out_channels == res.graph["s2b0_conv2"].out_channels
    assert res.graph.classifier.in_channels == survivors[1]
    if prune:  # the narrowed network computes the survivors' function
        live = host_liveness(variables, graph)
        reference = apply(two_block_net(False), zero_dead(variables, live), X2)
        chex.assert_trees_all_close(
            apply(res.model, res.variables, X2)[:, 0], reference, atol=1e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------------------------
# 2, 3, 5. Rejuvenation of the tiny bottleneck net: random live masks and one dead branch
# ---------------------------------------------------------------------------------------------

DEAD_BRANCH = "s2b1"  # every γ of s2b1_conv1 ~0: the whole branch dies, its shortcut is identity


@pytest.mark.parametrize("name", ["resnet_tiny_basic", "resnet_tiny_cifar"])
@pytest.mark.parametrize("prune", [False, True])
def test_tiny_fixed_units_follow_the_official_rule(name, prune):
    """Official: the residual streams (and the stem) are fixed, so only interior convs get L1;
    prune_residual: every conv is prunable (method.md 2.3)."""
    graph = nr_jax.channel_graph(
        nr_jax.models.get(name, num_classes=10, prune_residual=prune), XV.shape
    )
    tied = {n for t in graph.ties for n in t}
    assert len(graph.ties) == (2 if name.endswith("basic") else 3)
    fixed = {u.name for u in graph.units if u.fixed}
    assert fixed == (set() if prune else tied | {"stem"})
    assert (("stem", "bn", "scale") in graph.l1_scale_paths()) == prune


@pytest.fixture(scope="module", params=[False, True], ids=["official", "prune_residual"])
def tiny_rejuvenated(request):
    prune = request.param
    model = nr_jax.models.get("resnet_tiny_cifar", num_classes=10, prune_residual=prune)
    graph = nr_jax.channel_graph(model, XV.shape)
    variables, _ = random_gammas(host_variables(graph), graph, seed=1, dead_frac=0.5)
    variables = set_gammas(variables, {f"{DEAD_BRANCH}_conv1": np.full(8, 1e-5, np.float32)})
    live = host_liveness(variables, graph)
    res = nr_jax.rejuvenate(jax.random.key(3), model, variables, None, optax.identity(), graph)
    return prune, graph, live, res


def test_tiny_streams(tiny_rejuvenated):
    """Residual ties survive rejuvenation with one width and one split point per stream; every
    live unit of a stream sees the same stream mask, which narrows only with prune_residual."""
    prune, graph, live, res = tiny_rejuvenated
    assert len(res.graph.ties) == len(graph.ties) == 3
    for tie in res.graph.ties:
        assert len({(res.graph[n].out_channels, res.graph[n].out_split) for n in tie}) == 1
    for tie in graph.ties:  # one stream mask for every live tied unit
        names = sorted(n for n in tie if not live.dead[n])
        for n in names[1:]:
            np.testing.assert_array_equal(live.out[n], live.out[names[0]])
    streams = [np.asarray(live.out[sorted(t)[0]]) for t in graph.ties]
    if prune:  # some stream channel is dead in every unit of its stream
        assert not all(np.all(m) for m in streams)
    else:
        assert all(np.all(m) for m in streams)


def test_dead_branch(tiny_rejuvenated):
    prune, graph, live, res = tiny_rejuvenated
    b = DEAD_BRANCH
    assert bool(live.dead[f"{b}_conv1"]) and bool(live.dead[f"{b}_conv3"])  # no live input
    assert set(res.report.dead_units) == {f"{b}_conv1", f"{b}_conv2", f"{b}_conv3"}
    g, masks = res.graph, res.variables[nr_jax.MASKS]
    for n in (f"{b}_conv1", f"{b}_conv2"):  # interior: the floor width, a zero mask
        assert (g[n].out_channels, g[n].out_split) == (1, 0)
        np.testing.assert_array_equal(masks[n]["mask"], [0])
    # the dead last conv keeps the stream's width (zero mask); the identity shortcut carries it
    stream = graph.ties[graph["s2b0_down"].tie]
    assert {"s2b0_conv3", "s2b0_down", f"{b}_conv3"} == stream
    width, survivors = g["s2b0_down"].out_channels, g["s2b0_down"].out_split
    assert survivors == (int(np.sum(kept_outputs(live, graph, "s2b0_down"))) if prune else 32)
    assert width == max(math.floor(survivors * res.report.r), survivors)
    assert g[f"{b}_conv3"].out_channels == width and g[f"{b}_conv3"].out_split == survivors
    np.testing.assert_array_equal(masks[f"{b}_conv3"]["mask"], np.zeros(width))
    assert g["s3b0_conv1"].in_channels == g["s3b0_down"].in_channels == width
    assert g["s3b0_down"].in_split == survivors


# ---------------------------------------------------------------------------------------------
# 8. Full-size models (slow)
# ---------------------------------------------------------------------------------------------

FULL = [  # name, classes, input size, params (M) and GMACs of method.md 5.3, exact counts
    ("resnet164_cifar", 10, 32, 1.704, 0.248, 1_704_154, 247_644_160),
    ("resnet164_cifar", 100, 32, 1.727, 0.248, 1_727_284, 247_644_160),
    ("resnet18", 1000, 224, 11.690, 1.814, 11_689_512, 1_813_561_344),
    ("resnet34", 1000, 224, 21.798, 3.663, 21_797_672, 3_663_249_408),
    ("resnet50", 1000, 224, 25.557, 4.087, 25_557_032, 4_087_136_256),
    ("resnet101", 1000, 224, 44.549, 7.799, 44_549_160, 7_799_357_440),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, classes, hw, params_m, gmacs, params, macs", FULL)
def test_full_size_counts_and_one_train_step(name, classes, hw, params_m, gmacs, params, macs):
    model = nr_jax.models.get(name, num_classes=classes)
    graph = nr_jax.channel_graph(model, (1, hw, hw, 3))
    c = nr_jax.count(graph)
    assert c.total == pytest.approx(params_m * 1e6, rel=1e-3)
    assert round(c.total / 1e6, 3) == params_m and round(c.macs / 1e9, 3) == gmacs
    assert (c.total, c.macs) == (params, macs)
    print(f"{name} ({classes} classes): {c.total:,} params, {c.macs:,} MACs")
    if classes == 100:
        return  # same network as the 10-class one but for the head
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, 3))
    variables = init(model, jax.random.key(0, impl="unsafe_rbg"), x)  # compiles ~3x faster
    variables, _, loss = one_sgd_step(
        model, sgd_chain(graph), variables, x, jnp.arange(2) % classes
    )
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(variables)


@pytest.mark.slow
@pytest.mark.parametrize("classes, expected", [(10, 0.871e6), (100, 0.918e6)])
def test_resnet164_effective_params_at_quarter_utilization(classes, expected):
    """method.md 5.3: at U ~ 0.244 (r ~ 2.02) ResNet-164 keeps 0.871M (C10) / 0.918M (C100)
    effective parameters (README: 0.88M / 0.92M), about half of the 1.70M baseline."""
    model = nr_jax.models.get("resnet164_cifar", num_classes=classes)
    graph = nr_jax.channel_graph(model, (1, 32, 32, 3))
    u, variables = gammas_at_utilization(host_variables(graph), graph, 0.244)
    assert 0.235 <= u <= 0.244
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    after = res.report.counts_after
    print(
        f"ResNet-164 C{classes}: U={u:.4f} r={res.report.r:.3f} "
        f"effective={after.effective:,} allocated={after.total:,}"
    )
    assert after.effective == pytest.approx(expected, rel=0.015)
    before = res.report.counts_before.total
    assert 0.98 * before <= after.total <= 1.03 * before
