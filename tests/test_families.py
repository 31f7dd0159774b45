"""The contract every model family keeps, checked once on the tiny variant of each family.

A family (one module under `nr_jax/models/`) registers a tiny variant that compiles in seconds;
every case below holds for each of them: the channel graph agrees with the variables, rejuvenation
keeps the survivors bit for bit and the optimiser state in step, the survivors' head computes
what the old network computed, and the trainer steps through one rejuvenation with one trace per
width configuration. What is specific to a family (residual ties, concatenation layout, the
parameter counts of the paper-size models) stays in its own test file.

The host-side checks use numpy variables shaped by `jax.eval_shape` (nothing compiles); only the
forward passes and the trainer's steps compile.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    apply,
    gammas_at_utilization,
    host_variables,
    kept_outputs,
    kernel_moments,
    mask_dead,
    random_gammas,
    set_gammas,
    sgd_chain,
    shrink_outgoing,
    synthetic_batch,
    warm_state,
)

import nr_jax
from nr_jax import train
from nr_jax.config import base_config
from nr_jax.graph import INPUT

CLASSES = 10
X = jax.random.normal(jax.random.key(7), (4, 28, 28, 1))  # Fashion-MNIST-sized: fits every family


class Case(NamedTuple):
    """One tiny model of the contract.

    Attributes:
      name: registered model name.
      kwargs: extra model arguments (also `config.model_kwargs` in the trainer case); they may
        change what can be pruned, never the forward pass (the survivor-path reference is the
        registered default model, one compile for every variant of a name).
      dead: a unit whose γ are all ~0 (a whole dead branch), or None.
      train: whether the trainer case runs (it compiles two train steps). vgg_tiny's trainer
        loop is `tests/test_train.py::test_one_trace_per_width_configuration`.
      steps_before: trainer steps before the rejuvenation (each compile costs seconds).
      nr: `config.nr` overrides of the trainer case.
      criterion: the liveness criterion (`nr_jax.criteria`): "bn" (dead channels by random γ)
        or "outgoing" for units without a scale (dead channels by shrunk outgoing weights).
    """

    name: str
    kwargs: dict[str, Any] = {}
    dead: str | None = None
    train: bool = True
    steps_before: int = 2
    nr: dict[str, Any] = {}
    criterion: str = "bn"

    def model(self, **kwargs: Any) -> Any:
        return nr_jax.models.get(self.name, num_classes=CLASSES, **{**self.kwargs, **kwargs})

    def __str__(self) -> str:
        return "-".join([self.name, *(k for k, v in self.kwargs.items() if v)])


PRUNE = {"prune_residual": True}
CASES = [
    Case("vgg_tiny", train=False),
    Case("resnet_tiny_basic", PRUNE, dead="s2b1_conv1"),
    Case("resnet_tiny_cifar", dead="s2b1_conv1", steps_before=0),
    Case("resnet_tiny_cifar", PRUNE, dead="s2b1_conv1", train=False),
    Case("densenet_tiny", nr={"allocation": "integer"}),
    Case("vgg_imagenet_tiny"),
    # units without BatchNorm: the trainer's "auto" criterion is "outgoing" (group lasso)
    Case("cnn_nobn_tiny", criterion="outgoing"),
    Case("mlp_tiny", criterion="outgoing"),
]
TRAIN_CASES = [c for c in CASES if c.train]


def setup(case: Case, seed: int = 1) -> tuple[Any, nr_jax.ChannelGraph, dict]:
    """The case's model, graph and host variables with random dead channels (and `case.dead`)."""
    model = case.model()
    graph = nr_jax.channel_graph(model, X.shape)
    if case.criterion == "outgoing":
        variables = shrink_outgoing(host_variables(graph, seed), graph, seed, dead_frac=0.5)
    else:
        variables, _ = random_gammas(host_variables(graph, seed), graph, seed, dead_frac=0.5)
    if case.dead is not None:
        dead = np.full(graph[case.dead].out_channels, 1e-5, np.float32)
        variables = set_gammas(variables, {case.dead: dead})
    return model, graph, jax.device_get(variables)


@pytest.fixture(scope="module", params=CASES, ids=str)
def rejuvenated(request):
    """A case rejuvenated with `sgd_chain` and a warm optimiser state (host only)."""
    case = request.param
    model, graph, variables = setup(case)
    tx = sgd_chain(graph)
    state = warm_state(tx, variables["params"])
    live = nr_jax.criteria.resolve(case.criterion)(variables, graph)
    res = nr_jax.rejuvenate(jax.random.key(3), model, variables, state, tx, graph, live=live)
    return case, variables, graph, tx, state, live, res


def test_the_contract_covers_every_tiny_model():
    """A new family's tiny variant joins the contract (and the test environment is strict)."""
    assert {c.name for c in CASES} == {n for n in nr_jax.models.names() if "tiny" in n}
    assert len(jax.devices()) == 4  # tests/conftest.py
    with pytest.raises(ValueError, match="jax_numpy_rank_promotion"):
        jnp.ones((2, 3)) + jnp.ones((3,))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_graph_agrees_with_the_variables(case):
    """Every unit's kernel, BN and mask shapes, the counters and the L1 paths follow the graph."""
    graph = nr_jax.channel_graph(case.model(), X.shape)
    params, masks = graph.variable_shapes["params"], graph.variable_shapes[nr_jax.MASKS]
    assert set(params) == {u.name for u in graph.all_units}
    flat = flax.traverse_util.flatten_dict(params)
    for u in graph.units:
        assert params[u.name]["kernel"].shape == u.kernel_shape
        assert len(u.kernel_shape) == (2 if u.dense else 4)
        assert flat[u.scale_path or (*u.path, "bias")].shape == (u.out_channels,)
        assert masks[u.name]["mask"].shape == (u.out_channels,)
        assert u.in_channels == sum(stop - start for _, start, stop in u.inputs)
    image = math.prod(X.shape[1:]) if graph.units[0].dense else X.shape[-1]  # MLP: flattened
    assert graph.units[0].inputs == ((frozenset([INPUT]), 0, image),)
    assert graph.classifier.out_channels == CLASSES and not graph.rejuvenated
    c = nr_jax.count(graph)
    assert c.total == sum(math.prod(s.shape) for s in jax.tree.leaves(params))
    assert c.conv == sum(u.weights for u in graph.units)
    assert c.macs == sum(u.macs for u in graph.units)
    assert graph.l1_scale_paths() == {u.scale_path for u in graph.prunable if u.scale_path}


def test_rejuvenation_invariants(rejuvenated):
    """New trees have exactly the new model's and `tx.init`'s shapes; survivors are bit-identical
    in the layout [survivors, new]; new inputs never reach survivors; the momentum follows its
    channels (survivors carried, new slots zero); λ is kept (method.md 4.1-4.2)."""
    _, variables, graph, tx, state, live, res = rejuvenated
    new_params = res.variables["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.variables, jax.eval_shape(res.model.init, jax.random.key(0), X)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(
        res.opt_state, jax.eval_shape(tx.init, new_params)
    )
    chex.assert_tree_all_finite((res.variables, res.opt_state))
    assert res.graph.rejuvenated and not graph.rejuvenated
    for u in graph.units:
        keep_out = np.flatnonzero(kept_outputs(live, graph, u.name))
        keep_in = np.flatnonzero(live.inp[u.name])
        lo, li = len(keep_out), len(keep_in)
        assert (res.graph[u.name].in_split, res.graph[u.name].out_split) == (li, lo)
        assert res.graph[u.name].out_channels >= max(lo, 1)
        old_k = variables["params"][u.name]["kernel"]
        new_k = np.asarray(new_params[u.name]["kernel"])
        np.testing.assert_array_equal(new_k[..., :li, :lo], old_k[..., keep_in, :][..., keep_out])
        assert not np.any(new_k[..., li:, :lo])
        channel_leaves = 0  # BN (scale, bias, mean, var), GroupNorm / LayerNorm, or the bias
        for coll in ("params", "batch_stats"):
            old_leaves = flax.traverse_util.flatten_dict(variables.get(coll, {}))
            new_leaves = flax.traverse_util.flatten_dict(res.variables.get(coll, {}))
            for key, old in old_leaves.items():
                if key[: len(u.path)] != u.path or key[-1] == "kernel":
                    continue
                fill = {"scale": 0.5, "var": 1.0}.get(key[-1], 0.0)
                np.testing.assert_array_equal(np.asarray(new_leaves[key])[:lo], old[keep_out])
                np.testing.assert_array_equal(np.asarray(new_leaves[key])[lo:], fill)
                channel_leaves += 1
        assert channel_leaves == (1 if u.norm is None else 4 if u.norm == "batch" else 2)
        old_m, new_m = kernel_moments(state, u), kernel_moments(res.opt_state, res.graph[u.name])
        assert len(old_m) == len(new_m) == 1
        for path, old in old_m.items():
            new = np.asarray(new_m[path])
            np.testing.assert_array_equal(new[..., :li, :lo], old[..., keep_in, :][..., keep_out])
            assert not np.any(new[..., li:, :]) and not np.any(new[..., lo:])
    keep_in = np.flatnonzero(live.inp[graph.classifier.name])
    np.testing.assert_array_equal(
        np.asarray(new_params[graph.classifier.name]["kernel"])[: len(keep_in)],
        variables["params"][graph.classifier.name]["kernel"][keep_in],
    )
    assert res.graph.classifier.in_split == len(keep_in)
    np.testing.assert_array_equal(nr_jax.get_lambda(res.opt_state), nr_jax.get_lambda(state))


def test_new_inputs_exactly_where_producers_grew(rejuvenated):
    """A unit reads new channels iff one of its producers grew; the image never grows."""
    *_, res = rejuvenated
    grown = {u.name for u in res.graph.units if u.out_channels > u.out_split}
    assert grown, "nothing grew: the check below would be vacuous"
    for u in res.graph.all_units:
        producers = {p for seg in u.inputs for p in seg[0]}
        assert (u.in_channels > u.in_split) == bool(producers & grown), u.name
    stem = res.graph.units[0]
    image = math.prod(X.shape[1:]) if stem.dense else X.shape[-1]  # MLP: the flattened image
    assert stem.in_channels == stem.in_split == image


def test_same_key_same_result_and_purity(rejuvenated):
    """rejuvenate is a pure function of its inputs and its key (conventions.md 12)."""
    case, variables, graph, tx, state, live, res = rejuvenated
    model = case.model()
    before = jax.tree.map(np.array, (variables, state))
    again = nr_jax.rejuvenate(jax.random.key(3), model, variables, state, tx, graph, live=live)
    other = nr_jax.rejuvenate(jax.random.key(4), model, variables, state, tx, graph, live=live)
    chex.assert_trees_all_equal((res.variables, res.opt_state), (again.variables, again.opt_state))
    assert res.model == again.model and res.graph == again.graph
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, (variables, state)), before)
    differs = [
        not np.array_equal(
            res.variables["params"][n]["kernel"], other.variables["params"][n]["kernel"]
        )
        for n in res.graph.widths
    ]
    assert any(differs), "a different key drew the same new weights"


def test_survivor_path_reproduces_old_network(rejuvenated):
    """The survivors' head of the new network computes the old network with its dead channels
    zeroed (method.md 4.1), through every residual sum and concatenation; the second head adds."""
    case, variables, _, _, _, live, res = rejuvenated
    reference = apply(
        nr_jax.models.get(case.name, num_classes=CLASSES), mask_dead(variables, live), X
    )
    assert float(jnp.max(jnp.abs(reference))) > 1e-3  # the comparison is not vacuous
    out = apply(res.model, res.variables, X)
    assert out.shape == (X.shape[0], 2, CLASSES)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out[:, 0], reference, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(nr_jax.predict(out), out[:, 0] + out[:, 1])


# not the MLP: its first layer reads the flattened image, whose width never grows, and holds
# almost every weight, so its cost is linear in its width: sqrt(1/U) spends about half the budget
# and that layer is fully effective (tests/test_criteria.py::test_mlp_budget)
BUDGET_CASES = [*(c for c in CASES if c.name != "mlp_tiny"), Case("resnet_tiny_basic")]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=str)
def test_effective_params_at_quarter_utilization(case):
    """At U ~ 0.25 the sqrt rule restores the conv budget (floors: at most 15% under it) and keeps
    about half of the parameters effective (method.md 5.3: ~ (1 + (r-1)^2) U of the conv weights,
    plus BN and the head). BN and the second head grow with the widths: up to +10% in all."""
    model = case.model()
    graph = nr_jax.channel_graph(model, X.shape)
    u, variables = gammas_at_utilization(
        host_variables(graph), graph, 0.25, criterion=case.criterion
    )
    assert 0.2 <= u <= 0.25
    live = nr_jax.criteria.resolve(case.criterion)(variables, graph)
    args = (jax.random.key(0), model, variables, None, optax.identity(), graph)
    res = nr_jax.rejuvenate(*args, live=live)
    before, after = res.report.counts_before, res.report.counts_after
    assert before.effective == before.total
    assert 0.85 * before.conv <= after.conv <= before.conv
    assert 0.8 * before.total <= after.total <= 1.1 * before.total
    assert 0.45 <= after.effective / before.total <= 0.65


def trainer_config(case: Case):
    config = base_config()
    config.model = case.name
    config.model_kwargs.update(case.kwargs)
    config.nr.lam = 1e-2
    config.nr.target = 0.99
    config.nr.update(case.nr)
    config.progress = False
    config.data_parallel = False  # trace counts on one device (sharding: tests/test_train.py)
    return config


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
def test_train_steps_with_one_rejuvenation(case):
    """Trainer steps, a rejuvenation forced by the controller (random dead channels), steps on
    the new widths: one trace per width configuration, both heads trained, all finite."""
    config = trainer_config(case)
    trainer = train.Trainer(config, workdir="")
    assert trainer.graph == nr_jax.channel_graph(case.model(), (1, 28, 28, 1))
    assert nr_jax.run_liveness.criterion_name(config, trainer.graph) == case.criterion
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(state.params)
    for u in trainer.graph.units:  # the family's γ initialisation (method.md 7.7)
        if u.scale_path is not None:
            np.testing.assert_array_equal(flat[u.scale_path], trainer.model.gamma_init)
    for i in range(case.steps_before):
        state, metrics = trainer.steps.train(state, synthetic_batch(i))
        assert float(metrics["utilization"]) == 1.0
    host = jax.device_get(state.variables)
    if case.criterion == "outgoing":  # dead channels: shrunk outgoing weights, else small γ
        variables = shrink_outgoing(host, trainer.graph, seed=3)
    else:
        variables, _ = random_gammas(host, trainer.graph, seed=3)
    state, event = trainer.epoch_end(state.replace(params=variables["params"]), jax.random.key(1))
    assert "rejuvenation" in event and trainer.graph.rejuvenated
    assert all(u.out_split is not None for u in trainer.graph.units)
    assert trainer.graph.classifier.in_split is not None
    assert float(nr_jax.get_lambda(state.opt_state)) == config.nr.lam_after
    first = trainer.graph.units[0].name
    before = np.asarray(state.params[first]["kernel"])
    for i in range(2):
        state, metrics = trainer.steps.train(state, synthetic_batch(10 + i))
    assert trainer.counter == {"train": 2 if case.steps_before else 1}
    assert {"accuracy_old", "accuracy_new"} <= set(metrics)
    assert np.isfinite(float(metrics["loss"]))
    chex.assert_tree_all_finite(state.params)
    assert not np.array_equal(before, state.params[first]["kernel"])
