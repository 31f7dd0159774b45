"""The trainer's liveness criterion and pressure (`nr.criterion`, `nr.pressure`; issue 16).

"auto" follows the model's normalisation (a BatchNorm run is the official one, unchanged); what a
model cannot serve is refused by name before any compute; every pressure keeps λ in the
optimiser state; a dormancy run reads its epoch-end activity from a fixed batch of images and
rejuvenates. The names and the optimiser compile nothing; the dormancy run compiles two steps
of the tiny MLP.
"""

from __future__ import annotations

import os

import chex
import flax
import jax
import numpy as np
import optax
import pytest
from helpers import host_variables, synthetic_batch

import nr_jax
from nr_jax import criteria, run_liveness, train
from nr_jax.config import ConfigError, base_config

FMNIST = "/usr/share/datasets/fashion-mnist"
SHAPE = (1, 28, 28, 1)


def config_for(model: str, **nr) -> object:
    c = base_config()
    c.model = model
    c.progress = False
    c.data_parallel = False
    c.nr.update(nr)
    return c


@pytest.mark.parametrize(
    ("model", "kwargs", "expected"),
    [
        ("vgg_tiny", {}, ("bn", "l1")),
        ("resnet_tiny_cifar", {}, ("bn", "l1")),
        ("cnn_nobn_tiny", {}, ("outgoing", "group_lasso")),
        ("cnn_nobn_tiny", {"norm": "group"}, ("norm", "l1")),
        ("mlp_tiny", {}, ("outgoing", "group_lasso")),
    ],
)
def test_auto_follows_the_models_normalisation(model, kwargs, expected):
    graph = nr_jax.channel_graph(nr_jax.models.get(model, num_classes=10, **kwargs), SHAPE)
    config = config_for(model)
    names = run_liveness.criterion_name(config, graph), run_liveness.pressure_name(config, graph)
    assert names == expected
    config.nr.criterion, config.nr.pressure = "dormancy", "none"  # explicit names win
    assert run_liveness.criterion_name(config, graph) == "dormancy"
    assert run_liveness.pressure_name(config, graph) == "none"
    assert isinstance(run_liveness.run_criterion(config, graph), criteria.Dormancy)


def test_bn_run_default_is_the_official_rule():
    """vgg_tiny by default: the BN rule with the run's thresholds, and the L1-on-γ chain of
    before (same state structure, same updates)."""
    config = config_for("vgg_tiny", threshold=2e-2, dead_threshold=2e-3)
    trainer = train.Trainer(config, workdir="")
    assert trainer.criterion == criteria.BNScale(threshold=2e-2, dead_threshold=2e-3)
    params = host_variables(trainer.graph)["params"]
    old = optax.chain(
        nr_jax.l1_bn_scales(trainer.graph, config.nr.lam),
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(config.momentum),
        optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=config.lr),
    )
    grads = jax.tree.map(lambda p: np.full_like(p, 0.3), params)
    new_state, old_state = trainer.tx.init(params), old.init(params)
    chex.assert_trees_all_equal_structs(new_state, old_state)
    both = jax.jit(lambda s, t: (trainer.tx.update(grads, s, params), old.update(grads, t, params)))
    (new_upd, _), (old_upd, _) = both(new_state, old_state)  # one compile, not op by op
    chex.assert_trees_all_equal(new_upd, old_upd)


@pytest.mark.parametrize("pressure", ["l1", "group_lasso", "none"])
def test_lambda_lives_in_every_pressures_state(pressure):
    model = "vgg_tiny" if pressure == "l1" else "mlp_tiny"
    config = config_for(model, pressure=pressure, lam=3e-3)
    graph = nr_jax.channel_graph(nr_jax.models.get(model, num_classes=10), SHAPE)
    state = train.make_optimizer(config, graph).init(host_variables(graph)["params"])
    assert float(nr_jax.get_lambda(state)) == pytest.approx(3e-3)
    assert float(nr_jax.get_lambda(nr_jax.set_lambda(state, 0.0))) == 0.0


@pytest.mark.parametrize(
    ("model", "field", "value", "match"),
    [
        ("vgg_tiny", "criterion", "gamma", "config.nr.criterion = 'gamma'"),
        ("vgg_tiny", "pressure", "l2", "config.nr.pressure = 'l2'"),
        ("cnn_nobn_tiny", "criterion", "bn", "config.nr.criterion = 'bn'"),
        ("mlp_tiny", "criterion", "norm", "config.nr.criterion = 'norm'"),
        ("mlp_tiny", "pressure", "l1", "config.nr.pressure = 'l1'"),
        ("cnn_nobn_tiny", "rescale_target", 0.5, "config.nr.rescale_target = 0.5"),
        ("mlp_tiny", "recompute_bn_batches", 2, "config.nr.recompute_bn_batches = 2"),
    ],
)
def test_what_the_model_cannot_serve_is_refused_by_name(model, field, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        train.Trainer(config_for(model, **{field: value}), workdir="")
    assert "\n" not in str(e.value)


def test_dormancy_run_rejuvenates():
    """The MLP without pressure: the step's utilisation from the batch's activity, the epoch end
    from the fixed activity batch; neurons that never fire are dead, and the network is
    rejuvenated on them (one trace per width configuration)."""
    config = config_for("mlp_tiny", criterion="dormancy", pressure="none", lam=0.0, target=0.99)
    trainer = train.Trainer(config, workdir="")
    images = np.asarray(synthetic_batch(5, n=32)["image"])
    trainer.use_data(10, activity_images=images)
    state = train.init_state(trainer.model, trainer.tx, config, SHAPE[1:], jax.random.key(0))
    assert state.batch_stats == {} and "batch_stats" not in state.variables
    state, metrics = trainer.steps.train(state, synthetic_batch(0))
    assert 0.0 < float(metrics["utilization"]) <= 1.0
    flat = flax.traverse_util.flatten_dict(jax.device_get(state.params))
    for u in trainer.graph.units:  # every third neuron never fires (ReLU after the unit)
        flat[(*u.path, "bias")] = np.array(flat[(*u.path, "bias")])
        flat[(*u.path, "bias")][::3] = -100.0
    params = flax.traverse_util.unflatten_dict(flat)
    before = trainer.graph
    state, event = trainer.epoch_end(state.replace(params=params), jax.random.key(1))
    assert "rejuvenation" in event and trainer.graph.rejuvenated
    report = event["rejuvenation"]
    for u in before.units:  # the dormant neurons are not among the survivors
        assert report.survivors[u.name] <= u.out_channels - len(range(0, u.out_channels, 3))
    assert event["gammas"] == {}  # no normalisation scale to record
    state, metrics = trainer.steps.train(state, synthetic_batch(1))
    assert trainer.counter == {"train": 2}
    assert np.isfinite(float(metrics["loss"])) and "utilization" in metrics
    chex.assert_tree_all_finite(state.params)


def test_dormancy_epoch_end_needs_its_images():
    config = config_for("mlp_tiny", criterion="dormancy", pressure="none")
    graph = nr_jax.channel_graph(nr_jax.models.get("mlp_tiny", num_classes=10), SHAPE)
    rule = run_liveness.run_criterion(config, graph)
    with pytest.raises(ValueError, match="activity images"):
        run_liveness.measure(rule, host_variables(graph), graph)


def test_images_activity_is_the_mean_over_all_images():
    model = nr_jax.models.get("mlp_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, SHAPE)
    variables = host_variables(graph)
    images = np.asarray(synthetic_batch(2, n=12)["image"])
    whole = run_liveness.images_activity(model, variables, images, 12)
    chunked = run_liveness.images_activity(model, variables, images, 8)  # chunks of 8 and 4
    chex.assert_trees_all_close(whole, chunked, rtol=1e-5)
    assert set(whole) == {u.name for u in graph.units}


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs dataset-fashion-mnist")
def test_first_images_are_the_training_splits_first():
    config = config_for("mlp_tiny")
    config.val_size, config.train_limit = 100, 64
    data = nr_jax.data.RunData(config, nr_jax.data.dataset_info("fashion_mnist"))
    images = data.first_images(512)  # at most the training split
    assert images.shape == (64, 28, 28, 1) and images.dtype == np.float32
    expected = nr_jax.data.normalize(data.train[0], data.info)  # evaluation preprocessing
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(data.first_images(8), images[:8])
