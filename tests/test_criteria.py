"""Pluggable liveness (issue 16): each criterion on hand-built variables, the survivors of
GroupNorm / LayerNorm units, dense and normalisation-free units through rejuvenation, and the
group-lasso pressure on paper.

The criteria run on numpy variables shaped by the channel graph (nothing compiles); only the
forward passes and the short training loop compile.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import gammas_at_utilization, host_variables, mask_dead, shrink_outgoing

import nr_jax
from nr_jax import criteria, layers, norms, outgoing
from nr_jax.config import ConfigError

SHAPE = (1, 4, 4, 2)
X = jax.random.normal(jax.random.key(7), (4, 16, 16, 1))


class Chain(nn.Module):
    """Hand-built: unit a (1x1 conv, 2 -> 4), unit b (1x1 conv, 4 -> 3), the classifier (3 -> 2);
    `dense`: the same as an MLP on the flattened input."""

    norm: str | None = "batch"
    dense: bool = False
    num_groups: int = 2
    fixed_b: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        w = layers.WidthSpec()
        kw = {"norm": self.norm, "num_groups": self.num_groups}
        if self.dense:
            x = layers.flatten(x)
            x = layers.dense_unit(w, "a", 4, **kw)(x, train)
            x = layers.dense_unit(w, "b", 3, fixed=self.fixed_b, **kw)(x, train)
        else:
            x = layers.conv_unit(w, "a", 4, kernel_size=1, **kw)(x, train)
            x = layers.conv_unit(w, "b", 3, kernel_size=1, fixed=self.fixed_b, **kw)(x, train)
        return layers.classifier_unit(w, 2)(x)


def chain(**kwargs):
    model = Chain(**kwargs)
    graph = nr_jax.channel_graph(model, SHAPE)
    return model, graph, host_variables(graph)


def with_leaves(variables, values):
    """A copy of numpy `variables` with the leaves at the given params paths replaced."""
    flat = nr_jax.outgoing.flat_params(jax.tree.map(np.array, variables["params"]))
    for path, v in values.items():
        flat[path] = np.asarray(v, np.float32).reshape(flat[path].shape)
    return {**variables, "params": jax.tree_util.tree_map(lambda x: x, _unflat(flat))}


def _unflat(flat):
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)


def assert_live(live, out, inp=None, dead=None):
    for name, want in out.items():
        np.testing.assert_array_equal(live.out[name], np.asarray(want, bool), err_msg=name)
    for name, want in (inp or {}).items():
        np.testing.assert_array_equal(live.inp[name], np.asarray(want, bool), err_msg=name)
    for name, want in (dead or {}).items():
        assert bool(live.dead[name]) == want, name


# ---------------------------------------------------------------------------------------------
# Each criterion on paper
# ---------------------------------------------------------------------------------------------


def test_bn_criterion_is_liveness_and_the_default():
    """ "bn" is `nr_jax.liveness` (the official rule), value for value."""
    _, graph, variables = chain()
    variables = with_leaves(
        variables, {("a", "bn", "scale"): [1.0, 0.005, -0.5, 0.0], ("b", "bn", "scale"): [2, 0, 1]}
    )
    got = criteria.resolve("bn")(variables, graph)
    chex.assert_trees_all_equal(got, nr_jax.liveness(variables, graph))
    assert_live(got, {"a": [1, 0, 1, 0], "b": [1, 0, 1]}, {"b": [1, 0, 1, 0], "head": [1, 0, 1]})
    assert not criteria.BNScale.needs_activity


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("dense", [False, True])
def test_norm_criterion_on_paper(norm, dense):
    """ "norm" applies the official rule to GroupNorm / LayerNorm scales (conv and dense units);
    "bn" refuses them, naming the criteria that fit."""
    _, graph, variables = chain(norm=norm, dense=dense)
    assert graph["a"].scale_path == ("a", "norm", "scale")
    assert graph.l1_scale_paths() == {("a", "norm", "scale"), ("b", "norm", "scale")}
    assert graph["a"].norm_groups == ((2, 2) if norm == "group" else (4,))
    variables = with_leaves(
        variables,
        {("a", "norm", "scale"): [1.0, 0.005, -0.5, 0.0], ("b", "norm", "scale"): [5e-4, 1e-4, 0]},
    )
    live = criteria.resolve("norm")(variables, graph)
    assert_live(live, {"a": [1, 0, 1, 0], "b": [0, 0, 0]}, {"b": [1, 0, 1, 0]}, {"b": True})
    with pytest.raises(ValueError, match="unit a has no BatchNorm.*'norm'"):
        nr_jax.liveness(variables, graph)


def test_outgoing_criterion_on_paper():
    """ "outgoing": ‖consumer rows reading the channel‖₂, the relative rule; the classifier's rows
    for the last unit; all-dead when every norm is under dead_threshold."""
    _, graph, variables = chain(norm=None)
    b_rows = [[3, 4, 0], [0.003, 0.004, 0], [0, 0, 1], [0, 0, 0]]  # norms 5, 0.005, 1, 0
    head_rows = [[1, 0], [0, 1e-4], [0, 0]]  # norms 1, 1e-4, 0
    variables = with_leaves(variables, {("b", "kernel"): b_rows, ("head", "kernel"): head_rows})
    norms_ = outgoing.unit_norms(variables["params"], graph)
    np.testing.assert_allclose(norms_["a"], [5, 0.005, 1, 0], rtol=1e-6)
    live = criteria.resolve("outgoing")(variables, graph)
    assert_live(live, {"a": [1, 0, 1, 0], "b": [1, 0, 0]}, {"head": [1, 0, 0]}, {"b": False})
    tiny = with_leaves(variables, {("head", "kernel"): np.full((3, 2), 1e-4)})
    assert_live(criteria.Outgoing()(tiny, graph), {"b": [0, 0, 0]}, dead={"b": True})
    with pytest.raises(ValueError, match="no BatchNorm"):
        nr_jax.liveness(variables, graph)
    with pytest.raises(ValueError, match="no normalisation scale"):
        criteria.NormScale()(variables, graph)


def test_dormancy_on_paper():
    """ReDo: s = a / mean(a), live iff s > τ; a silent unit is all-dead, its consumers' inputs
    dead; a fixed unit keeps its dormant neurons."""
    _, graph, variables = chain(norm=None, dense=True)
    act = {"a": np.array([1.0, 0.05, 2.0, 0.95]), "b": np.zeros(3)}  # a: mean 1
    live = criteria.resolve("dormancy", tau=0.1)(variables, graph, act)
    assert_live(live, {"a": [1, 0, 1, 1], "b": [0, 0, 0]}, {"head": [0, 0, 0]}, {"b": True})
    strict = criteria.Dormancy(tau=0.0)(variables, graph, {**act, "b": np.array([0.0, 1, 2])})
    assert_live(strict, {"a": [1, 1, 1, 1], "b": [0, 1, 1]})
    _, fixed_graph, _ = chain(norm=None, dense=True, fixed_b=True)
    fixed = criteria.Dormancy()(variables, fixed_graph, {**act, "b": np.array([0.0, 1, 2])})
    assert_live(fixed, {"b": [1, 1, 1]})
    with pytest.raises(ValueError, match="needs `activity`"):
        criteria.Dormancy()(variables, graph)
    with pytest.raises(ValueError, match=r"activity of unit b: expected shape \(3,\)"):
        criteria.Dormancy()(variables, graph, {"a": act["a"], "b": np.ones(2)})


def test_dormancy_reads_a_forward_pass():
    """`activity` is the mean |unit output| per neuron; a neuron whose ReLU never fires is dead,
    jitted and eager alike."""
    model, graph, variables = chain(norm=None, dense=True)
    variables = with_leaves(variables, {("a", "bias"): [0.0, -100.0, 0.0, 0.0]})
    x = jax.random.normal(jax.random.key(0), (8, *SHAPE[1:]))
    act = jax.jit(functools.partial(criteria.activity, model))(variables, x)
    assert set(act) == {"a", "b"} and act["a"].shape == (4,)
    assert float(act["a"][1]) == 0.0 and float(jnp.min(act["a"][jnp.array([0, 2, 3])])) > 0
    live = jax.jit(lambda v, a: criteria.Dormancy()(v, graph, a))(variables, act)
    assert not bool(live.out["a"][1]) and bool(live.out["a"][0])
    np.testing.assert_array_equal(live.inp["b"], live.out["a"])


@pytest.mark.parametrize(("norm", "name"), [("group", "norm"), (None, "outgoing"), ("batch", "bn")])
def test_criteria_jit_and_host_agree(norm, name):
    """Every variables-only criterion is a pure jnp function (jitted) and numpy on the host."""
    _, graph, variables = chain(norm=norm)
    decay = lambda x: x * np.float32(0.9) ** np.arange(x.size).reshape(x.shape)  # noqa: E731
    variables = jax.tree.map(decay, variables)
    rule = criteria.resolve(name, threshold=0.3)
    host = rule(variables, graph)
    assert isinstance(host.out["a"], np.ndarray)
    jitted = jax.jit(lambda v: rule(v, graph))(variables)
    chex.assert_trees_all_equal(jax.device_get(jitted), host)


def test_resolve_and_suggest():
    assert criteria.resolve("norm", threshold=0.2) == criteria.NormScale(threshold=0.2)
    assert criteria.resolve("dormancy", tau=0.025).tau == 0.025
    with pytest.raises(ConfigError, match=r"config.nr.criterion = 'gamma' is not allowed"):
        criteria.resolve("gamma")
    assert criteria.suggest(chain()[1]) == ("bn", "l1")
    assert criteria.suggest(chain(norm="layer")[1]) == ("norm", "l1")
    assert criteria.suggest(chain(norm=None, dense=True)[1]) == ("outgoing", "group_lasso")
    assert nr_jax.sparsity.resolve("none", chain()[1], 0.5).init({}).lam == 0.5
    with pytest.raises(ConfigError, match=r"config.nr.pressure = 'l2' is not allowed"):
        nr_jax.sparsity.resolve("l2", chain()[1], 0.5)


# ---------------------------------------------------------------------------------------------
# GroupNorm / LayerNorm: what dropping dead channels does, and separate groups afterwards
# ---------------------------------------------------------------------------------------------


def test_regroup_on_paper():
    """Survivors keep their old groups (empty ones vanish); new channels get groups of their own."""
    assert norms.regroup("group", (4, 4, 4), [0, 1, 9], 9) == (2, 1, 3, 3)
    assert norms.regroup("group", (4, 4, 4), [5], 1) == (1,)
    assert norms.regroup("layer", (12,), [0, 3, 4], 10) == (3, 7)
    assert norms.regroup("batch", None, [0], 4) is None
    assert norms.default_groups("group", 10, 4) == (3, 3, 2, 2)


def scaled_model(norm, seed=0, dead_frac=0.5):
    """cnn_nobn_tiny with `norm`, random host variables with random dead channels."""
    model = nr_jax.models.get("cnn_nobn_tiny", num_classes=10, norm=norm, num_groups=2)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = host_variables(graph, seed)
    rng = np.random.default_rng(seed)
    if norm is None:
        return model, graph, shrink_outgoing(variables, graph, seed, dead_frac), "outgoing"
    scales = {}
    for u in graph.units:
        g = rng.uniform(0.2, 1.0, u.out_channels)
        dead = rng.random(u.out_channels) < dead_frac
        dead[0] = False
        g[dead] = rng.uniform(0, 1e-4, dead.sum())
        scales[u.scale_path] = g
    return model, graph, with_leaves(variables, scales), "bn" if norm == "batch" else "norm"


@pytest.mark.parametrize("norm", ["batch", None, "group", "layer"])
def test_survivor_shift_measured(norm):
    """Dropping dead channels leaves BatchNorm and normalisation-free survivors exact; GroupNorm
    and LayerNorm survivors change (their statistics lose the dead channels): measured."""
    model, graph, variables, name = scaled_model(norm)
    live = criteria.resolve(name)(variables, graph)
    shift = criteria.survivor_shift(model, variables, graph, X, live)
    rel = shift.relative
    print(f"\nsurvivor shift ({norm}): " + ", ".join(f"{k} {v:.3g}" for k, v in rel.items()))
    assert set(shift.units) == {u.name for u in graph.units}
    if norm in ("batch", None):
        assert max(rel.values()) < 1e-5
    else:
        assert rel["conv0"] > 1e-3 and rel["logits"] > 1e-3


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_separate_groups_keep_survivors_after_rejuvenation(norm):
    """Right after rejuvenation every survivor (and the old head) computes exactly what the
    pruned network (dead channels dropped, nothing added) computes: new channels sit in groups of
    their own. Sharing a group with them would change the survivors (the control)."""
    model, graph, variables, name = scaled_model(norm, seed=1)
    live = criteria.resolve(name)(variables, graph)
    args = (jax.random.key(2), model, variables, None, optax.identity(), graph)
    res = nr_jax.rejuvenate(*args, live=live, check=True)
    pruned = nr_jax.rejuvenate(*args, live=live, allocation=nr_jax.slimming.keep_allocation)
    out, units = criteria.unit_outputs(res.model, res.variables, X)
    ref, ref_units = criteria.unit_outputs(pruned.model, pruned.variables, X)
    grew = 0
    for u in res.graph.units:
        lo = u.out_split
        assert sum(u.norm_groups) == u.out_channels and lo in np.cumsum((0, *u.norm_groups))
        chex.assert_trees_all_close(units[u.name][..., :lo], ref_units[u.name], atol=1e-5)
        grew += u.out_channels > lo
    assert grew
    chex.assert_trees_all_close(out[:, 0], nr_jax.predict(ref), atol=1e-5, rtol=1e-5)
    # control: the new channels in the survivors' groups (one LayerNorm group, GroupNorm merged)
    shared = {
        n: layers.UnitWidth(w.features, w.in_split, w.out_split, (w.features,))
        for n, w in res.model.widths.as_dict().items()
        if n != "head"
    }
    mixed = res.model.clone(
        widths=nr_jax.WidthSpec.from_dict({**res.model.widths.as_dict(), **shared})
    )
    _, mixed_units = criteria.unit_outputs(mixed, res.variables, X)
    first = res.graph.units[0]
    change = jnp.max(
        jnp.abs(mixed_units[first.name][..., : first.out_split] - ref_units[first.name])
    )
    assert float(change) > 1e-3


# ---------------------------------------------------------------------------------------------
# Dense and normalisation-free units through rejuvenation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "criterion", "scheme"),
    [("mlp_tiny", "dormancy", "attention"), ("cnn_nobn_tiny", "outgoing", "removed")],
)
def test_survivor_path_reproduces_old_network(name, criterion, scheme):
    """The old head of the rejuvenated MLP / BN-free CNN computes the old network with its dead
    channels zeroed (method.md 4.1): dense units and biases follow their channels, the classifier
    after an MLP gets its two heads."""
    model = nr_jax.models.get(name, num_classes=10, scheme=scheme)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = shrink_outgoing(host_variables(graph, 3), graph, 3)
    if criterion == "dormancy":  # some neurons that never fire
        flat = outgoing.flat_params(variables["params"])
        for u in graph.units:
            flat[(*u.path, "bias")][::3] = -100.0
        variables = {**variables, "params": _unflat(flat)}
        outs = criteria.unit_outputs(model, variables, X)[1]
        act = {n: jnp.mean(jnp.abs(y), axis=tuple(range(y.ndim - 1))) for n, y in outs.items()}
        live = criteria.Dormancy()(variables, graph, act)
    else:
        live = criteria.resolve(criterion)(variables, graph)
    live = jax.device_get(live)
    assert not all(np.all(m) for m in live.out.values())
    reference = criteria.unit_outputs(model, mask_dead(variables, live), X)[0]
    assert float(jnp.max(jnp.abs(reference))) > 1e-3
    res = nr_jax.rejuvenate(
        jax.random.key(5), model, variables, None, optax.identity(), graph, live=live, check=True
    )
    for u in res.graph.units:
        assert res.graph[u.name].dense == (name == "mlp_tiny")
        k = np.asarray(res.variables["params"][u.name]["kernel"])
        assert k.shape == u.kernel_shape
        np.testing.assert_array_equal(res.variables["params"][u.name]["bias"][u.out_split :], 0)
    out = criteria.unit_outputs(res.model, res.variables, X)[0]
    assert out.shape == (X.shape[0], 2, 10)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The group-lasso pressure
# ---------------------------------------------------------------------------------------------


def test_group_lasso_shrinks_whole_groups():
    """With no data gradient, plain SGD on λ Σ‖W_out(c)‖ moves every group toward 0 by lr·λ per
    step without turning it (whole groups shrink together); a zero group stays zero; rows that
    read the image and the outgoing rows of a fixed unit get no pressure."""
    lr, lam, steps = 0.5, 0.25, 3  # lr·λ = 0.125
    _, graph, variables = chain(norm=None, fixed_b=True)
    b_rows = np.array([[3, 4, 0], [0, 0, 0], [0, 1, 1], [1, 2, 2]], np.float32)  # 5, 0, √2, 3
    variables = with_leaves(variables, {("b", "kernel"): b_rows})
    params = variables["params"]
    tx = optax.chain(nr_jax.group_lasso(graph, lam), optax.sgd(lr))
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for _ in range(steps):
        updates, state = jax.jit(tx.update)(zero, state, params)
        params = optax.apply_updates(params, updates)
    norm0 = np.linalg.norm(b_rows, axis=1)
    want = np.where(norm0 > 0, (norm0 - steps * lr * lam) / np.where(norm0 > 0, norm0, 1), 0)
    np.testing.assert_allclose(
        np.asarray(params["b"]["kernel"]).reshape(4, 3), b_rows * want[:, None], rtol=1e-6
    )
    for path in (("a", "kernel"), ("head", "kernel"), ("a", "bias"), ("b", "bias")):
        np.testing.assert_array_equal(
            outgoing.flat_params(params)[path], outgoing.flat_params(variables["params"])[path]
        )
    assert float(nr_jax.get_lambda(nr_jax.set_lambda(state, 0.5))) == 0.5


def test_group_lasso_on_densenet_and_after_rejuvenation():
    """DenseNet: the "outgoing" norm of a channel spans every consumer that reads it; the group
    lasso presses each consumer row (Σ |update|² = the number of non-zero rows at λ = 1), and,
    built for the old graph, presses the rejuvenated network exactly as one built for the new."""
    model = nr_jax.models.get("densenet_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = host_variables(graph)
    params = variables["params"]
    flat = outgoing.flat_params(params)
    total, n_rows = 0.0, 0
    for v in graph.all_units:
        k = np.asarray(outgoing.kernel_of(flat, v))
        rows = np.sum(k**2, axis=tuple(i for i in range(k.ndim) if i != k.ndim - 2))
        image = sum(z - a for p, a, z in v.inputs if nr_jax.graph.INPUT in p)
        total += rows[image:].sum()
        n_rows += int(np.sum(rows[image:] > 0))
    per_source = outgoing.norms(params, graph)
    assert len(per_source) == len(graph.units)  # every unit is read by someone
    np.testing.assert_allclose(
        sum(float(np.sum(n**2)) for n in per_source.values()), total, rtol=1e-5
    )
    tx = nr_jax.group_lasso(graph, 1.0)
    update = jax.jit(tx.update)
    upd, _ = update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    total_sq = sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(upd))
    np.testing.assert_allclose(total_sq, n_rows, rtol=1e-4)
    dead = shrink_outgoing(variables, graph, 0)
    res = nr_jax.rejuvenate(
        jax.random.key(0),
        model,
        dead,
        None,
        optax.identity(),
        graph,
        live=criteria.Outgoing()(dead, graph),
    )
    new = res.variables["params"]
    zero = jax.tree.map(jnp.zeros_like, new)
    old_tx, new_tx = tx, nr_jax.group_lasso(res.graph, 1.0)
    got = jax.jit(old_tx.update)(zero, old_tx.init(new), new)[0]
    want = jax.jit(new_tx.update)(zero, new_tx.init(new), new)[0]
    chex.assert_trees_all_close(got, want)


def test_mlp_budget():
    """An MLP's first layer reads the image (784 features that never grow) and holds almost every
    weight: its cost is linear in its width, so the official sqrt(1/U) rule spends only about
    half the budget at U = 0.25, while the budget-matching rounded rule spends all of it."""
    model = nr_jax.models.get("mlp_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, (1, 28, 28, 1))
    u, variables = gammas_at_utilization(host_variables(graph), graph, 0.25, criterion="outgoing")
    live = criteria.Outgoing()(variables, graph)
    args = (jax.random.key(0), model, variables, None, optax.identity(), graph)
    budget = nr_jax.count(graph).conv
    sqrt = nr_jax.rejuvenate(*args, live=live).report.counts_after.conv
    rounded = nr_jax.rejuvenate(*args, live=live, allocation=nr_jax.rounded_allocation(1))
    assert 0.2 <= u <= 0.25 and 0.4 * budget <= sqrt <= 0.6 * budget
    assert abs(rounded.report.counts_after.conv - budget) <= 0.01 * budget


@pytest.mark.parametrize(
    ("name", "pressure", "criterion"),
    [
        pytest.param("cnn_nobn_tiny", "group_lasso", "outgoing", marks=pytest.mark.slow),
        ("mlp_tiny", "none", "dormancy"),
    ],
)
def test_trains_through_one_rejuvenation_with_one_trace_per_width(name, pressure, criterion):
    """The BN-free CNN (group lasso, "outgoing") and the MLP (no pressure, "dormancy") train,
    rejuvenate and train on: one trace per width configuration, both heads learning, all finite.
    (The trainer's runs with `nr.criterion` / `nr.pressure`: tests/test_families.py and
    tests/test_trainer_criteria.py.)"""
    model = nr_jax.models.get(name, num_classes=10)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = jax.jit(lambda k: model.init(k, X, train=False))(jax.random.key(0))
    tx = optax.chain(nr_jax.sparsity.resolve(pressure, graph, 1e-2), optax.sgd(0.05, 0.9))
    traces = []

    def make_step(model):
        @jax.jit
        def step(variables, opt_state, x, y):
            traces.append(model.widths)

            def loss_fn(params):
                out = model.apply({**variables, "params": params}, x, train=True)
                return nr_jax.nr_loss(out, y)

            loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
            updates, opt_state = tx.update(grads, opt_state, variables["params"])
            return {**variables, "params": optax.apply_updates(variables["params"], updates)}, (
                opt_state,
                loss,
            )

        return step

    y = jnp.arange(X.shape[0]) % 10
    opt_state, step = tx.init(variables["params"]), make_step(model)
    for _ in range(2):
        variables, (opt_state, loss) = step(variables, opt_state, X, y)
    host = jax.device_get(variables)
    if criterion == "outgoing":
        host = shrink_outgoing(host, graph, seed=0)
        live = criteria.Outgoing()(host, graph)
    else:  # neurons that never fire
        flat = outgoing.flat_params(jax.tree.map(np.array, host["params"]))
        for u in graph.units:
            flat[(*u.path, "bias")][::3] = -100.0
        host = {**host, "params": _unflat(flat)}
        live = criteria.Dormancy()(host, graph, criteria.activity(model, host, X))
    rule = nr_jax.rounded_allocation(1)  # the budget (sqrt(1/U) under-spends the MLP's)
    args = (jax.random.key(1), model, host, opt_state, tx, graph)
    res = nr_jax.rejuvenate(*args, live=live, allocation=rule)
    assert all(u.out_channels > u.out_split for u in res.graph.units)
    variables, opt_state = res.variables, nr_jax.set_lambda(res.opt_state, 0.0)
    step = make_step(res.model)
    before = np.asarray(variables["params"]["head"]["kernel"])
    for _ in range(2):
        variables, (opt_state, loss) = step(variables, opt_state, X, y)
    assert len(traces) == 2 and traces[0] != traces[1]
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(variables)
    after = np.asarray(variables["params"]["head"]["kernel"])
    split = res.graph.classifier.in_split
    assert not np.array_equal(before[:split], after[:split])  # the old head learns
    assert not np.array_equal(before[split:], after[split:])  # and the new one
