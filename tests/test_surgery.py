"""Rejuvenation: widths on paper, invariants of the new trees, function preservation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ThreeUnitNet, apply, init, random_gammas, set_gammas, zero_dead

import nr_jax

X3 = jnp.ones((2, 8, 8, 2))
GAMMAS = {"a": [1.0, 0.005, -0.5, 0.0], "b": [0.2, -0.2, 0.001, 0.2], "c": [0.3, 0.2]}
XV = jax.random.normal(jax.random.key(7), (4, 16, 16, 1))


def sgd_chain(graph):
    return optax.chain(
        nr_jax.l1_bn_scales(graph, 1e-4),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.1, momentum=0.9),
    )


def adamw_chain(graph):
    return optax.chain(nr_jax.l1_bn_scales(graph, 1e-4), optax.adamw(1e-3, weight_decay=1e-4))


def masked_chain(graph):
    no_bn = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "bn" not in jax.tree_util.keystr(path), p
    )
    return optax.chain(
        nr_jax.l1_bn_scales(graph, 1e-4),
        optax.masked(optax.add_decayed_weights(1e-4), no_bn),
        optax.sgd(0.1, momentum=0.9),
    )


def vgg_setup(seed=0, dead_frac=0.5, scheme="removed"):
    model = nr_jax.models.get("vgg_tiny", num_classes=10, scheme=scheme)
    variables = init(model, jax.random.key(seed), XV)
    graph = nr_jax.channel_graph(model, XV.shape)
    variables, _ = random_gammas(variables, graph, seed, dead_frac)
    # non-trivial running statistics
    _, upd = apply(model, variables, XV, train=True)
    return model, {**variables, **upd}, graph


def warm_state(tx, params):
    """An optimiser state with non-zero moments (two updates)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(2):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.1 * (i + 1)), params)
        _, state = update(grads, state, params)
    return state


def test_widths_on_paper():
    model = ThreeUnitNet()
    variables = set_gammas(init(model, jax.random.key(0), X3), GAMMAS)
    graph = nr_jax.channel_graph(model, X3.shape)
    # live: a 2 of 4, b 3 of 4 (from 2 live inputs), c 2 of 2 (from 3 live inputs)
    # params live = 2*2*9 + 2*3*9 + 3*2*1 = 96 of 72 + 144 + 8 = 224
    res = nr_jax.rejuvenate(jax.random.key(1), model, variables, None, optax.identity(), graph)
    r = math.sqrt(224 / 96)
    assert res.report.r == pytest.approx(r)
    assert res.report.widths_after == {
        "a": math.floor(2 * r),
        "b": math.floor(3 * r),
        "c": math.floor(2 * r),
    }
    a, b, c = res.graph.units
    assert (a.in_split, a.out_split, a.in_channels) == (2, 2, 2)  # stem: inputs never grow
    assert (b.in_split, b.out_split) == (2, 3)
    assert (c.in_split, c.out_split) == (3, 2)
    assert res.graph.classifier.in_split == 2
    assert res.opt_state is None


@pytest.mark.parametrize("make_tx", [sgd_chain, adamw_chain, masked_chain])
def test_invariants(make_tx):
    model, variables, graph = vgg_setup()
    tx = make_tx(graph)
    state = warm_state(tx, variables["params"])
    live = jax.device_get(nr_jax.liveness(variables, graph))
    res = nr_jax.rejuvenate(jax.random.key(3), model, variables, state, tx, graph)
    new_params = res.variables["params"]
    # shapes: the new trees are exactly what the new model and tx.init produce
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.variables, jax.eval_shape(lambda: init(res.model, jax.random.key(0), XV))
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(res.opt_state, tx.init(new_params))
    chex.assert_tree_all_finite(res.variables)
    chex.assert_tree_all_finite(res.opt_state)
    # survivors are bit-identical; the layout is [survivors, new]
    for u in graph.units:
        keep_out = np.flatnonzero(live.out[u.name])
        keep_in = np.flatnonzero(live.inp[u.name])
        old_k = np.asarray(variables["params"][u.name]["kernel"])
        new_k = np.asarray(new_params[u.name]["kernel"])
        lo, li = len(keep_out), len(keep_in)
        np.testing.assert_array_equal(new_k[:, :, :li, :lo], old_k[:, :, keep_in][..., keep_out])
        assert not np.any(new_k[:, :, li:, :lo])  # new inputs never reach survivors
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
    # the optimiser state follows its channels: survivors carried, new slots zero, counters kept
    old_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    new_leaves = dict(jax.tree_util.tree_flatten_with_path(res.opt_state)[0])
    conv1 = [
        (p, v)
        for p, v in old_leaves
        if "conv1" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)
    ]
    assert conv1, "no conv1 kernel moment in the optimiser state"
    keep_out = np.flatnonzero(live.out["conv1"])
    keep_in = np.flatnonzero(live.inp["conv1"])
    for path, old in conv1:
        new = np.asarray(new_leaves[path])
        li, lo = len(keep_in), len(keep_out)
        np.testing.assert_array_equal(
            new[:, :, :li, :lo], np.asarray(old)[:, :, keep_in][..., keep_out]
        )
        assert not np.any(new[:, :, li:, :]) and not np.any(new[:, :, :, lo:])
    for path, old in old_leaves:
        if np.ndim(old) == 0:
            np.testing.assert_array_equal(new_leaves[path], old)  # counters and λ kept


@pytest.mark.parametrize("scheme", ["removed", "attention"])
def test_survivor_path_reproduces_old_network(scheme):
    model, variables, graph = vgg_setup(seed=1, scheme=scheme)
    live = nr_jax.liveness(variables, graph)
    reference = apply(model, zero_dead(variables, live), XV)
    res = nr_jax.rejuvenate(jax.random.key(5), model, variables, None, optax.identity(), graph)
    out = apply(res.model, res.variables, XV)
    assert out.shape == (XV.shape[0], 2, 10)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)
    # and the summed prediction adds the new head
    chex.assert_trees_all_close(nr_jax.predict(out), out[:, 0] + out[:, 1])


def test_survivors_keep_training_signal_separate():
    """Cross connections removed: gradients never reach the zero cross blocks."""
    model, variables, graph = vgg_setup(seed=2)
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)

    def loss(params):
        out, _ = res.model.apply(
            {**res.variables, "params": params}, XV, train=True, mutable=["batch_stats"]
        )
        return nr_jax.nr_loss(out, jnp.arange(XV.shape[0]) % 10)

    grads = jax.jit(jax.grad(loss))(res.variables["params"])
    for u in res.graph.units:
        g = np.asarray(grads[u.name]["kernel"])
        li, lo = u.in_split, u.out_split
        assert not np.any(g[:, :, li:, :lo])
        if li < u.in_channels:
            assert not np.any(g[:, :, :li, lo:])


def test_cross_attention_trains_cross_blocks():
    """Cross-attention: cross blocks start at zero but receive gradient; all weights count."""
    model, variables, graph = vgg_setup(seed=2, scheme="attention")
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    assert res.report.counts_after.effective == res.report.counts_after.total

    def loss(params):
        out, _ = res.model.apply(
            {**res.variables, "params": params}, XV, train=True, mutable=["batch_stats"]
        )
        return nr_jax.nr_loss(out, jnp.arange(XV.shape[0]) % 10)

    grads = jax.jit(jax.grad(loss))(res.variables["params"])
    split = [u for u in res.graph.units if 0 < u.in_split < u.in_channels]
    assert split
    for u in split:
        w = np.asarray(res.variables["params"][u.name]["kernel"])
        g = np.asarray(grads[u.name]["kernel"])
        li, lo = u.in_split, u.out_split
        assert not np.any(w[:, :, li:, :lo]) and not np.any(w[:, :, :li, lo:])
        assert np.any(g[:, :, li:, :lo]) and np.any(g[:, :, :li, lo:])


def test_four_convolution_attention_computes_the_same():
    """The official four-convolution cross-attention equals our two-convolution form."""
    outs = []
    for scheme in ("attention", "attention4"):
        model, variables, graph = vgg_setup(seed=2, scheme=scheme)
        res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
        params = jax.tree.map(lambda x: x + 0.01, res.variables["params"])  # non-zero cross blocks
        outs.append(apply(res.model, {**res.variables, "params": params}, XV))
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_same_key_same_result_and_purity():
    model, variables, graph = vgg_setup(seed=3)
    tx = sgd_chain(graph)
    state = warm_state(tx, variables["params"])
    before = jax.tree.map(np.array, (variables, state))
    a = nr_jax.rejuvenate(jax.random.key(9), model, variables, state, tx, graph)
    b = nr_jax.rejuvenate(jax.random.key(9), model, variables, state, tx, graph)
    c = nr_jax.rejuvenate(jax.random.key(10), model, variables, state, tx, graph)
    chex.assert_trees_all_equal(a.variables, b.variables)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    assert a.model == b.model and a.graph == b.graph
    assert not np.array_equal(
        a.variables["params"]["conv2"]["kernel"], c.variables["params"]["conv2"]["kernel"]
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, (variables, state)), before)


def test_zero_utilization_refuses():
    model, variables, graph = vgg_setup()
    dead = set_gammas(variables, {u.name: np.zeros(u.out_channels) for u in graph.units})
    with pytest.raises(ValueError, match="utilisation is 0"):
        nr_jax.rejuvenate(jax.random.key(0), model, dead, None, optax.identity(), graph)


def test_all_dead_unit_keeps_floor_width_and_zero_mask():
    model = ThreeUnitNet()
    gammas = {**GAMMAS, "c": [5e-4, 1e-4]}  # c all-dead
    variables = set_gammas(init(model, jax.random.key(0), X3), gammas)
    graph = nr_jax.channel_graph(model, X3.shape)
    res = nr_jax.rejuvenate(
        jax.random.key(1), model, variables, None, optax.identity(), graph, min_width=2
    )
    assert res.report.dead_units == ("c",)
    assert res.graph["c"].out_channels == 2 and res.graph["c"].out_split == 0
    np.testing.assert_array_equal(res.variables[nr_jax.MASKS]["c"]["mask"], [0, 0])
    out = apply(res.model, res.variables, X3)
    chex.assert_tree_all_finite(out)
    with pytest.raises(ValueError, match="already rejuvenated"):
        nr_jax.rejuvenate(
            jax.random.key(1), res.model, res.variables, None, optax.identity(), res.graph
        )


def test_counters_after_rejuvenation():
    model, variables, graph = vgg_setup(seed=4)
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    before, after = res.report.counts_before, res.report.counts_after
    assert after.effective < after.total
    # effective conv weights = old->old + new->new blocks (stem: new outputs read all inputs)
    eff = 0
    for u in res.graph.units:
        k2 = u.kernel[0] * u.kernel[1]
        new_in = u.in_channels - u.in_split if u.in_split < u.in_channels else u.in_channels
        eff += k2 * (u.in_split * u.out_split + new_in * (u.out_channels - u.out_split))
    assert after.effective - after.bn - after.classifier == eff
    assert before.total == before.effective
    # the allocated budget is restored up to the floor() of each width
    assert 0.75 * before.conv <= after.conv <= before.conv


def test_flops_budget():
    model, variables, graph = vgg_setup(seed=5)
    res = nr_jax.rejuvenate(
        jax.random.key(0), model, variables, None, optax.identity(), graph, resource="flops"
    )
    util = nr_jax.utilization(nr_jax.liveness(variables, graph), graph, "flops")
    assert res.report.r == pytest.approx(math.sqrt(float(util.total) / float(util.live)), rel=1e-5)
    assert res.report.counts_after.macs <= res.report.counts_before.macs


def test_custom_allocation_rule():
    model, variables, graph = vgg_setup(seed=6)

    def double(graph, survivors, r):
        return {n: 2 * k for n, k in survivors.items()}

    res = nr_jax.rejuvenate(
        jax.random.key(0), model, variables, None, optax.identity(), graph, allocation=double
    )
    for name, k in res.report.survivors.items():
        assert res.report.widths_after[name] == max(2 * k, 1)


def test_mismatched_trees_are_rejected():
    model, variables, graph = vgg_setup()
    other = nr_jax.models.get("vgg_fmnist", num_classes=10)
    other_graph = nr_jax.channel_graph(other, (1, 28, 28, 1))
    with pytest.raises(ValueError, match="BN scale"):
        nr_jax.rejuvenate(jax.random.key(0), other, variables, None, optax.identity(), other_graph)
    tx = sgd_chain(graph)
    foreign_state = adamw_chain(graph).init(variables["params"])
    with pytest.raises(ValueError, match="structure"):
        nr_jax.rejuvenate(jax.random.key(0), model, variables, foreign_state, tx, graph)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("vgg_tiny", {}),
        ("resnet_tiny_cifar", {}),
        ("resnet_tiny_basic", {"prune_residual": True}),
        ("densenet_tiny", {}),
        ("vgg_imagenet_tiny", {}),
    ],
)
def test_derived_graph_equals_traced_graph(name, kwargs):
    """rejuvenate derives the new graph without tracing; check=True traces and compares."""
    model = nr_jax.models.get(name, num_classes=10, **kwargs)
    graph = nr_jax.channel_graph(model, (1, 28, 28, 1))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), graph.variable_shapes
    )
    variables, _ = random_gammas(variables, graph, seed=3)
    res = nr_jax.rejuvenate(
        jax.random.key(0), model, variables, None, optax.identity(), graph, check=True
    )
    assert res.graph == nr_jax.channel_graph(res.model, (1, 28, 28, 1))


@pytest.mark.parametrize("granularity", [4, 8])
def test_rounded_allocation_keeps_budget_and_granularity(granularity):
    model = nr_jax.models.get("vgg_fmnist", num_classes=10)
    graph = nr_jax.channel_graph(model, (1, 28, 28, 1))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), graph.variable_shapes
    )
    variables, _ = random_gammas(variables, graph, seed=5, dead_frac=0.6)
    res = nr_jax.rejuvenate(
        jax.random.key(0),
        model,
        variables,
        None,
        optax.identity(),
        graph,
        allocation=nr_jax.rounded_allocation(granularity),
    )
    budget = nr_jax.allocated_resource(graph, graph.widths)
    after = nr_jax.allocated_resource(res.graph, res.graph.widths)
    assert abs(after - budget) <= 0.01 * budget
    assert after == res.report.counts_after.conv
    for name, w in res.report.widths_after.items():
        assert w % granularity == 0 or w == res.report.survivors[name]
        assert w >= res.report.survivors[name]


def test_plan_then_apply_equals_rejuvenate():
    """`rejuvenate` is liveness, `nr_jax.plan`, `apply_plan`: same key, bitwise the same result,
    also through the plan's JSON; the optimiser state has exactly tx.init(new_params)'s layout."""
    model, variables, graph = vgg_setup(seed=7)
    tx = adamw_chain(graph)
    state = warm_state(tx, variables["params"])
    kwargs = {"resource": "flops", "allocation": nr_jax.rounded_allocation(4, resource="flops")}
    want = nr_jax.rejuvenate(jax.random.key(4), model, variables, state, tx, graph, **kwargs)
    plan = nr_jax.plan(graph, nr_jax.liveness(variables, graph), **kwargs)
    assert plan.widths == want.report.widths_after and plan.r == want.report.r
    assert plan.budget_after == want.report.counts_after.macs
    plan = nr_jax.Plan.from_json(plan.to_json())
    got = nr_jax.apply_plan(jax.random.key(4), plan, model, variables, state, tx, graph)
    chex.assert_trees_all_equal(got.variables, want.variables)
    chex.assert_trees_all_equal(got.opt_state, want.opt_state)
    assert got.model == want.model and got.graph == want.graph and got.report == want.report
    chex.assert_trees_all_equal_shapes_and_dtypes(got.opt_state, tx.init(got.variables["params"]))


def test_apply_plan_rejects_a_plan_for_another_graph():
    model, variables, graph = vgg_setup()
    other = nr_jax.models.get("vgg_fmnist", num_classes=10)
    other_graph = nr_jax.channel_graph(other, (1, 28, 28, 1))
    rng = np.random.default_rng(0)
    other_vars = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), other_graph.variable_shapes
    )
    plan = nr_jax.plan(other_graph, nr_jax.liveness(other_vars, other_graph))
    with pytest.raises(ValueError, match="the plan is for units"):
        nr_jax.apply_plan(jax.random.key(0), plan, model, variables, None, optax.identity(), graph)
    with pytest.raises(TypeError, match="nr_jax.Plan"):
        nr_jax.apply_plan(jax.random.key(0), {}, model, variables, None, optax.identity(), graph)


def test_allocation_names_resolve():
    assert nr_jax.allocation.resolve("sqrt") is nr_jax.sqrt_allocation
    rule = nr_jax.allocation.resolve("round4", resource="flops", min_width=3)
    assert (
        rule(nr_jax.channel_graph(ThreeUnitNet(), X3.shape), {"a": 1, "b": 1, "c": 1}, 1.0)["c"]
        >= 3
    )
    with pytest.raises(nr_jax.config.ConfigError, match=r"config.nr.allocation = 'cubic' is not"):
        nr_jax.allocation.resolve("cubic")
