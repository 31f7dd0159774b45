"""ResNets as NR models: residual ties, fixed units, rejuvenation invariants, sizes, training."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply, init, random_gammas, set_gammas, zero_dead

import nr_jax
from nr_jax import train
from nr_jax.config import base_config
from nr_jax.models.resnet import ResNet

XV = jax.random.normal(jax.random.key(7), (4, 8, 8, 3))  # tiny CIFAR nets: 8x8 -> 4x4 -> 2x2


def sgd_chain(graph):
    return optax.chain(
        nr_jax.l1_bn_scales(graph, 1e-4),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.1, momentum=0.9),
    )


def _trace(opt_state):
    """The momentum tree of `sgd_chain`'s state (l1, decay, (trace, scale))."""
    return opt_state[2][0].trace


def warm_state(tx, params, seed=0):
    """A state of `tx` for `params` with random momentum buffers and λ = 1e-4 (host numpy)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (
            rng.standard_normal(x.shape).astype(x.dtype) if x.ndim else np.full((), 1e-4, x.dtype)
        ),
        jax.eval_shape(tx.init, params),
    )


def host_variables(graph, seed=0):
    """Random numpy variables of the graph's shapes: model.init without its (slow) compile.

    Kernels N(0, 2/fan_out), BN β, running mean and variance random, γ 1, masks 1.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        coll, last = path[0].key, path[-1].key
        if coll == nr_jax.MASKS or last == "scale":
            return np.ones(s.shape, s.dtype)
        if last == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if last == "kernel":
            std = math.sqrt(2.0 / (math.prod(s.shape[:-2]) * s.shape[-1]))
            return (std * rng.standard_normal(s.shape)).astype(s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)  # β, mean, head bias

    return jax.tree_util.tree_map_with_path(leaf, graph.variable_shapes)


def host_liveness(variables, graph):
    """Liveness on the host (numpy path: nothing is compiled)."""
    return nr_jax.liveness(jax.device_get(variables), graph)


def gammas_at_utilization(variables, graph, target, seed=0, iters=12):
    """Random γ (helpers.random_gammas) with the dead fraction bisected so that U ~ target."""

    def at(frac):
        v = jax.device_get(random_gammas(variables, graph, seed, frac)[0])
        return float(nr_jax.utilization(nr_jax.liveness(v, graph), graph).ratio), v

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if at(mid)[0] > target:
            lo = mid
        else:
            hi = mid
    return at(hi)


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


@pytest.fixture(scope="module", params=[False, True], ids=["official", "prune_residual"])
def tiny_rejuvenated(request):
    prune = request.param
    model = nr_jax.models.get("resnet_tiny_cifar", num_classes=10, prune_residual=prune)
    graph = nr_jax.channel_graph(model, XV.shape)
    variables, _ = random_gammas(host_variables(graph), graph, seed=1, dead_frac=0.5)
    variables = set_gammas(variables, {f"{DEAD_BRANCH}_conv1": np.full(8, 1e-5, np.float32)})
    tx = sgd_chain(graph)
    state = warm_state(tx, variables["params"])
    live = host_liveness(variables, graph)
    res = nr_jax.rejuvenate(jax.random.key(3), model, variables, state, tx, graph)
    return prune, variables, graph, tx, state, live, res


def test_tiny_invariants(tiny_rejuvenated):
    prune, variables, graph, tx, state, live, res = tiny_rejuvenated
    new_params = res.variables["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.variables, jax.eval_shape(lambda: res.model.init(jax.random.key(0), XV))
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.opt_state, jax.eval_shape(tx.init, new_params)
    )
    chex.assert_tree_all_finite(res.variables)
    chex.assert_tree_all_finite(res.opt_state)
    # residual ties survive, with one width and one split point per stream
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
    # survivors are bit-identical; layout [survivors, new]; new inputs never reach survivors;
    # the momentum follows its channels (survivors carried, new slots zero)
    old_m, new_m = _trace(state), _trace(res.opt_state)
    for u in graph.units:
        keep_out = np.flatnonzero(_plan_out(live, graph, u.name))
        keep_in = np.flatnonzero(live.inp[u.name])
        lo, li = len(keep_out), len(keep_in)
        assert (res.graph[u.name].in_split, res.graph[u.name].out_split) == (li, lo)
        old_k = np.asarray(variables["params"][u.name]["kernel"])
        new_k = np.asarray(new_params[u.name]["kernel"])
        np.testing.assert_array_equal(new_k[:, :, :li, :lo], old_k[:, :, keep_in][..., keep_out])
        assert not np.any(new_k[:, :, li:, :lo])
        for coll, leaf, fill in (
            ("params", "scale", 0.5),
            ("params", "bias", 0.0),
            ("batch_stats", "mean", 0.0),
            ("batch_stats", "var", 1.0),
        ):
            old = np.asarray(variables[coll][u.name]["bn"][leaf])
            new = np.asarray(res.variables[coll][u.name]["bn"][leaf])
            np.testing.assert_array_equal(new[:lo], old[keep_out])
            np.testing.assert_array_equal(new[lo:], fill)
        old = np.asarray(old_m[u.name]["kernel"])
        new = np.asarray(new_m[u.name]["kernel"])
        np.testing.assert_array_equal(new[:, :, :li, :lo], old[:, :, keep_in][..., keep_out])
        assert not np.any(new[:, :, li:]) and not np.any(new[:, :, :, lo:])
    keep_in = np.flatnonzero(live.inp["head"])
    np.testing.assert_array_equal(
        np.asarray(new_params["head"]["kernel"])[: len(keep_in)],
        np.asarray(variables["params"]["head"]["kernel"])[keep_in],
    )


def _plan_out(live, graph, name):
    """Kept output channels: a tied unit keeps its stream's channels even when it is dead."""
    u = graph[name]
    if u.tie is None:
        return live.out[name]
    return np.any([live.out[n] for n in graph.ties[u.tie]], axis=0)


def test_tiny_survivor_path_reproduces_old_network(tiny_rejuvenated):
    _, variables, _, _, _, live, res = tiny_rejuvenated
    base = nr_jax.models.get("resnet_tiny_cifar", num_classes=10)  # the same forward either way
    reference = apply(base, zero_dead(variables, live), XV)
    out = apply(res.model, res.variables, XV)
    assert out.shape == (XV.shape[0], 2, 10)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)


def test_dead_branch(tiny_rejuvenated):
    prune, _, graph, _, _, live, res = tiny_rejuvenated
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
    assert survivors == (int(np.sum(_plan_out(live, graph, "s2b0_down"))) if prune else 32)
    assert width == max(math.floor(survivors * res.report.r), survivors)
    assert g[f"{b}_conv3"].out_channels == width and g[f"{b}_conv3"].out_split == survivors
    np.testing.assert_array_equal(masks[f"{b}_conv3"]["mask"], np.zeros(width))
    assert g["s3b0_conv1"].in_channels == g["s3b0_down"].in_channels == width
    assert g["s3b0_down"].in_split == survivors


# ---------------------------------------------------------------------------------------------
# 6. Effective parameters after rejuvenation at U ~ 0.25 (method.md 5.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, prune", [("resnet_tiny_basic", False), ("resnet_tiny_cifar", True)])
def test_tiny_effective_params_at_quarter_utilization(name, prune):
    model = nr_jax.models.get(name, num_classes=10, prune_residual=prune)
    graph = nr_jax.channel_graph(model, XV.shape)
    u, variables = gammas_at_utilization(host_variables(graph), graph, 0.25)
    assert 0.2 <= u <= 0.25
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    before, after = res.report.counts_before, res.report.counts_after
    assert 0.8 * before.total <= after.total <= 1.05 * before.total  # the budget is restored
    assert 0.45 <= after.effective / before.total <= 0.65  # ~ (1 + (r-1)^2) U + BN, head


# ---------------------------------------------------------------------------------------------
# 7. A few training steps with one rejuvenation
# ---------------------------------------------------------------------------------------------


def synthetic_batch(seed, n=8, hw=28):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


@pytest.mark.parametrize(
    "name, prune, steps_before", [("resnet_tiny_basic", True, 2), ("resnet_tiny_cifar", False, 0)]
)
def test_train_with_one_rejuvenation(name, prune, steps_before):
    """Trainer steps, a forced rejuvenation by the controller, steps on the new widths.

    Compile time dominates on CPU: the PRNG key is `unsafe_rbg` (init compiles ~3x faster than
    with threefry) and the bottleneck net skips the pre-rejuvenation steps (the basic net runs
    them; the slow tests run one pre-rejuvenation step of every full-size model).
    """
    config = base_config()
    config.model = name
    config.model_kwargs.prune_residual = prune
    config.nr.lam = 1e-2
    config.nr.target = 0.99
    config.progress = False
    config.data_parallel = False  # trace counts on one device (sharding: tests/test_train.py)
    trainer = train.Trainer(config, workdir="")
    assert (("stem", "bn", "scale") in trainer.graph.l1_scale_paths()) == prune
    key = jax.random.key(0, impl="unsafe_rbg")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), key)
    for i in range(steps_before):
        state, metrics = trainer.steps.train(state, synthetic_batch(i))
        assert float(metrics["utilization"]) == 1.0
    # force the rejuvenation: random dead channels
    variables, _ = random_gammas(state.variables, trainer.graph, seed=3, dead_frac=0.5)
    state, event = trainer.controller(state.replace(params=variables["params"]), jax.random.key(1))
    assert "rejuvenation" in event and trainer.graph.rejuvenated
    tied = {n for t in trainer.graph.ties for n in t}
    assert all(trainer.graph[n].out_split is not None for n in tied)
    before = jax.device_get(state.params)
    for i in range(2):
        state, metrics = trainer.steps.train(state, synthetic_batch(10 + i))
    assert trainer.counter == {"train": 2 if steps_before else 1}
    assert "accuracy_old" in metrics and np.isfinite(float(metrics["loss"]))
    chex.assert_tree_all_finite(state.params)
    assert not np.array_equal(before["stem"]["kernel"], state.params["stem"]["kernel"])


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
    labels = jnp.arange(2) % classes
    variables = init(model, jax.random.key(0, impl="unsafe_rbg"), x)  # compiles ~3x faster
    tx = sgd_chain(graph)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(p):
            out, upd = model.apply(
                {**variables, "params": p}, x, train=True, mutable=["batch_stats"]
            )
            return nr_jax.nr_loss(out, labels), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, "params": params, **upd}, opt_state, loss

    variables, opt_state, loss = step(variables, opt_state)
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
