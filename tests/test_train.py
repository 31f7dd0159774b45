"""Training: one trace per width configuration, the schedule, and end-to-end runs."""

import json
import os

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nr_jax
from nr_jax import controller, train
from nr_jax.callbacks import Callbacks
from nr_jax.config import ConfigError, base_config
from nr_jax.run_state import restore_run

FMNIST = "/usr/share/datasets/fashion-mnist"


def tiny_config(**nr):
    c = base_config()
    c.model = "vgg_tiny"
    c.batch_size = 32
    c.eval_batch_size = 100
    c.epochs = 2
    c.lr_milestones = (1,)
    c.train_limit = 640
    c.test_limit = 200
    c.log_every_steps = 5
    c.progress = False
    c.data_parallel = False  # the 4 test devices only in the sharding test
    c.nr.lam = 1e-2  # strong: a few hundred steps must bring U below the target
    c.nr.target = 0.9
    c.nr.max_search_epochs = 5
    c.nr.update(nr)
    return c


def synthetic_batch(seed, n=16, hw=28):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


def test_one_trace_per_width_configuration():
    config = tiny_config()
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    for i in range(3):
        state, _ = trainer.steps.train(state, synthetic_batch(i))
    trainer.steps.eval(state.variables, synthetic_batch(9))
    state = state.replace(opt_state=train.set_learning_rate(state.opt_state, 0.01))  # LR change
    state = state.replace(opt_state=nr_jax.set_lambda(state.opt_state, 1e-3))  # λ change
    ctrl = state.controller._replace(search_epochs=state.controller.search_epochs + 1)
    state = state.replace(epoch=state.epoch + 1, controller=ctrl)  # epoch boundary
    masks = jax.tree.map(lambda m: m.at[0].set(0.0), state.masks)  # mask change
    state = state.replace(masks=masks)
    for i in range(3):
        state, _ = trainer.steps.train(state, synthetic_batch(10 + i))
    trainer.steps.eval(state.variables, synthetic_batch(9))
    assert trainer.counter == {"train": 1, "eval": 1}
    # rejuvenation: a new width configuration, traced once more, then reused
    state, event = trainer.epoch_end(
        state.replace(opt_state=nr_jax.set_lambda(state.opt_state, 0.0)), jax.random.key(1)
    )
    if "rejuvenation" not in event:  # force it: the controller's decision is tested elsewhere
        res = nr_jax.rejuvenate(
            jax.random.key(1),
            trainer.model,
            state.variables,
            state.opt_state,
            trainer.tx,
            trainer.graph,
        )
        trainer.set_widths(res.model.widths)
        state = state.replace(
            params=res.variables["params"],
            batch_stats=res.variables["batch_stats"],
            masks=res.variables[nr_jax.MASKS],
            opt_state=res.opt_state,
        )
    for i in range(3):
        state, metrics = trainer.steps.train(state, synthetic_batch(20 + i))
        trainer.steps.eval(state.variables, synthetic_batch(9))
    state = state.replace(epoch=state.epoch + 1)
    state = state.replace(opt_state=train.set_learning_rate(state.opt_state, 1e-3))
    state, metrics = trainer.steps.train(state, synthetic_batch(30))
    assert trainer.counter == {"train": 2, "eval": 2}
    assert float(metrics["lr"]) == np.float32(1e-3)
    assert "accuracy_old" in metrics and "accuracy_new" in metrics
    chex.assert_tree_all_finite(state.params)


def test_learning_rate_follows_epochs_since_search():
    config = tiny_config()
    config.lr, config.lr_milestones, config.lr_gamma = 0.1, (2, 4), 0.1
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))

    def lr(epoch, offset, phase=controller.REJUVENATED):
        ctrl = state.controller._replace(
            search_epochs=jnp.int32(offset), phase=jnp.int32(phase), cycle=jnp.int32(1)
        )
        return float(
            train.learning_rate(config, state.replace(epoch=jnp.int32(epoch), controller=ctrl))
        )

    assert lr(9, 5, controller.SEARCH) == pytest.approx(0.1)  # searching: no schedule yet
    assert lr(5, 5) == pytest.approx(0.1)  # the schedule starts after the search
    assert lr(6, 5) == pytest.approx(0.1)
    assert lr(7, 5) == pytest.approx(0.01)
    assert lr(9, 5) == pytest.approx(0.001)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_tx_is_one_complete_optimizer(weight_decay):
    """A custom loop uses `tx` as it is: L1 on γ, then weight decay, then momentum, then the LR
    (PyTorch semantics: p <- p - lr * buf, buf <- m * buf + g + wd * p + λ sign(γ))."""
    config = tiny_config(lam=0.5)
    config.weight_decay, config.momentum = weight_decay, 0.9
    trainer = train.Trainer(config, workdir="")
    params = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    params = params.params
    tx = trainer.tx
    opt_state = train.set_learning_rate(tx.init(params), 0.25)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.125), params)
    l1 = {u.path for u in trainer.graph.units if not u.fixed}
    buf = None
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        flat = flax.traverse_util.flatten_dict(params)
        g = {k: 0.125 + weight_decay * v for k, v in flat.items()}
        for k, v in flat.items():
            if k[:-2] in l1 and k[-2:] == ("bn", "scale"):
                g[k] = g[k] + 0.5 * np.sign(v)
        buf = g if buf is None else {k: 0.9 * buf[k] + g[k] for k in g}
        want = {k: v - 0.25 * buf[k] for k, v in flat.items()}
        chex.assert_trees_all_close(flax.traverse_util.flatten_dict(new), want, rtol=1e-5)
        params = new
    assert float(train.get_learning_rate(opt_state)) == 0.25


def test_bad_config_is_refused_before_compute(tmp_path):
    for field, value, match in (
        ("model", "resnet9000", "config.model"),
        ("nr.target", 1.5, "config.nr.target"),
        ("nr.lam", -1.0, "config.nr.lam"),
        ("batch_size", 0, "config.batch_size"),
    ):
        c = tiny_config()
        node, key = (c.nr, field[3:]) if field.startswith("nr.") else (c, field)
        node[key] = value
        with pytest.raises(ConfigError, match=match):
            train.train_and_evaluate(c, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason=f"{FMNIST} missing (apt-get install dataset-fashion-mnist)"
)


@needs_fmnist
@pytest.mark.real_data
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    config = tiny_config()
    config.checkpoint_every_steps = 8
    events = []
    callbacks = Callbacks(
        on_train_step=lambda step: events.append(("train_step", step)),
        on_eval_batch=lambda i: events.append(("eval", i)),
        after_rejuvenation=lambda: events.append(("after_rejuvenation",)),
        on_checkpoint=lambda event, step, d: events.append((event, step, os.path.basename(d))),
        at_end=lambda: events.append(("end",)),
    )
    summary = train.train_and_evaluate(config, str(tmp_path), callbacks=callbacks)
    assert summary["phase"] == "rejuvenated"
    k = summary["search_epochs"]
    assert 1 <= k <= config.nr.max_search_epochs
    assert summary["epochs_run"] == config.epochs + k
    assert summary["traces"] == {"train": 2, "eval": 2}
    assert summary["final_test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in history if "epoch/epoch" in h]
    assert len(epochs) == summary["epochs_run"]
    assert sum(bool(h.get("epoch/rejuvenated")) for h in epochs) == 1
    report = json.loads((tmp_path / "rejuvenation.json").read_text())
    for name in ("utilization.png", "accuracy.png", "widths.png", "gammas.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert report["counts_after"]["effective"] < report["counts_after"]["total"]
    # the callbacks: every step once, in order; each save bracketed by start and end; the
    # rejuvenation before its epoch's checkpoint; the end last
    steps = [e[1] for e in events if e[0] == "train_step"]
    assert steps == list(range(1, 20 * summary["epochs_run"] + 1))
    saves = [e for e in events if len(e) == 3]  # (event, step, directory)
    n = summary["epochs_run"]
    saved = sorted({20 * e + d for e in range(n) for d in (8, 16, 20)})  # mid-epoch, epoch end
    assert saves == [(e, step, "checkpoints") for step in saved for e in ("start", "end")]
    assert events.count(("eval", 0)) == n and ("eval", 1) in events
    rej = events.index(("after_rejuvenation",))
    assert events[rej + 1] == ("start", 20 * summary["rejuvenation_epoch"], "checkpoints")
    assert events[-1] == ("end",) and events.count(("end",)) == 1
    # resuming a finished run from its checkpoint trains nothing more and restores the widths
    again = train.train_and_evaluate(config, str(tmp_path))
    assert again["widths"] == summary["widths"]
    assert again["final_test_accuracy"] == summary["final_test_accuracy"]


@needs_fmnist
@pytest.mark.real_data
def test_resume_after_rejuvenation_matches_uninterrupted_run(tmp_path):
    full = train.train_and_evaluate(tiny_config(), str(tmp_path / "full"))
    short = tiny_config()
    short.epochs = 1  # stops one epoch after the search ...
    train.train_and_evaluate(short, str(tmp_path / "split"))
    resumed = train.train_and_evaluate(tiny_config(), str(tmp_path / "split"))  # ... and resumes
    assert resumed["widths"] == full["widths"]
    assert resumed["final_test_accuracy"] == full["final_test_accuracy"]


@pytest.mark.parametrize("outcome", ["stop", "rejuvenate"])
def test_search_timeout_outcome(outcome, caplog):
    config = tiny_config(target=0.05, max_search_epochs=1, on_search_timeout=outcome)
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    params = jax.tree.map(lambda x: x, state.params)
    params["conv1"]["bn"]["scale"] = params["conv1"]["bn"]["scale"].at[:8].set(0.0)  # U < 1
    state = state.replace(params=params)
    state, event = trainer.epoch_end(state, jax.random.key(1))
    assert event["search_timeout"] and "did not reach the target" in caplog.text
    assert int(state.controller.search_epochs) == 1
    if outcome == "stop":
        assert int(state.controller.phase) == controller.PLAIN and "rejuvenation" not in event
    else:
        assert int(state.controller.phase) == controller.REJUVENATED
        assert event["rejuvenation"].utilization > config.nr.target
    assert float(nr_jax.get_lambda(state.opt_state)) == config.nr.lam_after


@needs_fmnist
@pytest.mark.real_data
def test_two_step_flow_and_official_preset(tmp_path):
    """Step 1 stops right after rejuvenation; step 2 resumes, rescales once and trains on.
    The official preset starts the optimiser afresh after rejuvenation (all momentum lost)."""
    step1 = tiny_config(compress_only=True, rescale_target=0.5)
    step1.preset = "official"
    s1 = train.train_and_evaluate(step1, str(tmp_path))
    assert s1["phase"] == "rejuvenated" and s1["epochs_run"] == s1["search_epochs"]
    step2 = tiny_config(rescale_target=0.5)
    step2.preset = "official"
    trainer = train.Trainer(step2, str(tmp_path))
    from nr_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        state, *_ = restore_run(trainer, ckpt)
    momentum = optax.tree_utils.tree_get(state.opt_state, "trace")
    assert jax.tree.leaves(momentum) and not any(np.any(x) for x in jax.tree.leaves(momentum))
    s2 = train.train_and_evaluate(step2, str(tmp_path))
    assert s2["epochs_run"] == step2.epochs + s1["search_epochs"]
    meta = json.loads((tmp_path / "summary.json").read_text())
    assert meta["final_test_accuracy"] > 0.2


@pytest.mark.parametrize("chunked", [False, True])
def test_data_parallel_equals_one_device(monkeypatch, chunked):
    """4 CPU devices (conftest): the sharded step computes what the single-device step does,
    also when the single-device step sums its kernel gradients over one-image batch chunks."""
    assert jax.device_count() == 4
    if chunked:
        monkeypatch.setattr(nr_jax.ops, "DW_CHUNK_BYTES", 1)
        monkeypatch.setattr(nr_jax.ops, "DW_CHUNK_MIN_ROWS", 1)
    results = {}
    for dp in (False, True):
        config = tiny_config()
        config.data_parallel = dp
        trainer = train.Trainer(config, workdir="")
        assert (trainer.mesh is not None) == dp
        state = trainer.place(
            train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
        )
        for i in range(3):
            batch = trainer.steps.global_batch(synthetic_batch(i))
            if dp:  # this process's rows, assembled into one array over the 4 devices
                assert len(batch["image"].sharding.device_set) == 4
            state, metrics = trainer.steps.train(state, batch)
        if dp:
            assert len(state.params["conv0"]["kernel"].sharding.device_set) == 4
        # batch chunks on one device only: the data-parallel step's batch is sharded
        hlo = trainer.steps.train.lower(state, batch).as_text()
        assert ("stablehlo.while" in hlo) == (chunked and not dp)
        results[dp] = (jax.device_get(state.params), jax.device_get(metrics))
    chex.assert_trees_all_close(results[True], results[False], rtol=1e-4, atol=1e-5)


def test_non_finite_parameters_stop_the_run():
    config = tiny_config()
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    train.check_finite(state)  # a healthy state passes
    params = jax.tree.map(lambda x: x, state.params)
    params["conv1"]["kernel"] = params["conv1"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.check_finite(state.replace(params=params))


def test_bfloat16_compute_keeps_float32_state():
    config = tiny_config()
    config.compute_dtype = "bfloat16"
    trainer = train.Trainer(config, workdir="")
    state = train.init_state(trainer.model, trainer.tx, config, (28, 28, 1), jax.random.key(0))
    for i in range(2):
        state, metrics = trainer.steps.train(state, synthetic_batch(i))
    assert np.isfinite(float(metrics["loss"]))
    for leaf in jax.tree.leaves((state.params, state.batch_stats)):
        assert leaf.dtype == jnp.float32
