"""The run switches beyond the paper: the slimming control (`nr_jax.slimming.prune`), the
within-epoch λ controller, the eval-lag check (issue 14) and repeated rejuvenation (issue 16)."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from helpers import apply, init, random_gammas, zero_dead

import nr_jax
from nr_jax import train
from nr_jax.slimming import prune

XV = jax.random.normal(jax.random.key(7), (4, 16, 16, 1))
FMNIST = "/usr/share/datasets/fashion-mnist"


def vgg_setup(seed=0, name="vgg_tiny"):
    model = nr_jax.models.get(name, num_classes=10)
    variables = init(model, jax.random.key(seed), XV)
    graph = nr_jax.channel_graph(model, XV.shape)
    variables, _ = random_gammas(variables, graph, seed, dead_frac=0.5)
    _, upd = apply(model, variables, XV, train=True)
    return model, {**variables, **upd}, graph


@pytest.mark.parametrize("name", ["vgg_tiny", "resnet_tiny_basic"])
def test_prune_keeps_the_survivors_function_in_a_plain_network(name):
    model, variables, graph = vgg_setup(seed=3, name=name)
    live = nr_jax.liveness(variables, graph)
    reference = apply(model, zero_dead(variables, live), XV)
    tx = optax.sgd(0.1, momentum=0.9)
    res = prune(jax.random.key(0), model, variables, tx.init(variables["params"]), tx, graph)
    out = apply(res.model, res.variables, XV)
    assert out.shape == reference.shape  # one classifier: plain logits
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
    assert not res.graph.rejuvenated
    for u in res.graph.units:  # no widening: exactly the survivors (floor 1 for all-dead units)
        assert u.out_channels == max(res.report.survivors[u.name], 1)
        assert u.in_split is None and u.out_split is None
    assert res.report.counts_after.conv < res.report.counts_before.conv
    # the optimiser state fits the new parameters
    jax.tree.map(
        lambda a, b: np.testing.assert_equal(a.shape, b.shape),
        res.opt_state[0].trace,
        res.variables["params"],
    )


def tiny(**nr):
    c = nr_jax.config.base_config()
    c.model, c.batch_size, c.eval_batch_size = "vgg_tiny", 32, 100
    c.epochs, c.lr_milestones = 1, (1,)
    c.val_size, c.train_limit, c.test_limit = 200, 640, 200
    c.log_every_steps, c.progress, c.plots, c.tensorboard = 5, False, False, False
    c.data_parallel, c.checkpoint = False, False
    c.nr.lam, c.nr.target, c.nr.max_search_epochs = 1e-2, 0.95, 5
    c.nr.update(nr)
    return c


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs dataset-fashion-mnist")
def test_slimming_run_with_the_step_controller_and_precise_bn(tmp_path):
    """One run through the three switches: λ steered every 5 steps, the eval-lag check, and
    the slimming control instead of rejuvenation (a plain network after the decision)."""
    config = tiny(
        regrow=False,
        lam_control="steps",
        lam_control_every=5,
        lam_control_epochs=1,
        recompute_bn_batches=2,
    )
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lams = {round(r["train/lambda"], 10) for r in records if "train/lambda" in r}
    epochs = [r for r in records if "epoch/epoch" in r]
    search = [r for r in epochs if r["epoch/phase"] != "search" or "epoch/rejuvenated" in r]
    assert len(lams) > 2  # λ moved within the search
    assert all(lam <= 4 * config.nr.lam * (1 + 1e-6) for lam in lams)
    assert "epoch/val_bn_accuracy_sum" in epochs[0] and "epoch/val_bn_loss" in epochs[0]
    assert "epoch/val_bn_accuracy_sum" not in epochs[-1]  # after the search: off
    assert search, "the search never ended"
    reju = json.loads((tmp_path / "rejuvenation.json").read_text())
    for unit, width in reju["widths_after"].items():
        assert width == max(reju["survivors"][unit], 1)
    assert "epoch/val_accuracy_old" not in epochs[-1]  # one classifier
    assert summary["traces"]["train"] == 2


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs dataset-fashion-mnist")
def test_driver_branches_the_slimming_control_from_the_nr_search(tmp_path, monkeypatch):
    """The table driver keeps the NR run's last search checkpoint and starts the slimming run
    from it: the search is replayed bit-identically, then pruned instead of rejuvenated."""
    from experiments import evaluate
    from experiments.evaluation import provenance

    monkeypatch.setattr(provenance, "code_fingerprint", lambda root=evaluate.ROOT: "code")

    def train_fn(config, workdir, callbacks=None):  # the table's arms on the tiny run
        c = tiny(regrow=config.nr.regrow)
        c.checkpoint, c.checkpoint_every_steps, c.keep_checkpoints = True, 8, 2
        return train.train_and_evaluate(c, workdir, callbacks=callbacks)

    table = evaluate.Table("b", tmp_path / "results", tmp_path / "runs", train_fn=train_fn)
    runs = evaluate.plan("b", ["vgg"], ["nr", "slimming"], [0])
    (nr, _), (slim, _) = [(r, res) for r, _, res in evaluate.run_table(table, runs)]
    kept = list((nr.workdir(table.runs_root) / evaluate.SEARCH_CHECKPOINT).iterdir())
    assert len(kept) == 1
    a, b = (json.loads(r.result_path(table.results_root).read_text()) for r in (nr, slim))
    k = a["search_epochs"]
    assert b["search_epochs"] == k and b["epochs"][:k] == a["epochs"][:k]  # the same search
    assert b["widths"] != a["widths"]
    reju = json.loads((slim.workdir(table.runs_root) / "rejuvenation.json").read_text())
    assert all(w == max(reju["survivors"][u], 1) for u, w in reju["widths_after"].items())


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs dataset-fashion-mnist")
def test_two_cycles_end_to_end(tmp_path):
    """Search, rejuvenate, train a cycle, merge, search again, rejuvenate, train the schedule."""
    config = tiny(cycles=2, cycle_epochs=1)
    config.val_size = 0
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch/epoch" in r]
    rejuvenated = [r["epoch/epoch"] for r in epochs if r.get("epoch/rejuvenated")]
    merged = [r["epoch/epoch"] for r in epochs if "epoch/merged" in r]
    assert len(rejuvenated) == 2 and merged == [rejuvenated[0] + 1]
    # one trace per width configuration: start, rejuvenated, merged, rejuvenated again
    assert summary["traces"]["train"] == 4
    assert summary["epochs_run"] == summary["search_epochs"] + 1 + config.epochs
    # the LR schedule restarts at each rejuvenation: base LR right after both
    lrs = {r["epoch/epoch"]: r["epoch/train_lr"] for r in epochs}
    assert lrs[rejuvenated[0] + 1] == lrs[rejuvenated[1] + 1] == pytest.approx(config.lr)
    # the budget of the second rejuvenation is the first's (allocated conv weights)
    model = nr_jax.models.get("vgg_tiny", num_classes=10)
    start = nr_jax.count(nr_jax.channel_graph(model, (1, 28, 28, 1))).conv
    reju = json.loads((tmp_path / "rejuvenation.json").read_text())  # the second one
    # every rejuvenation recorded with its cycle, and the cycles plotted
    cycles = json.loads((tmp_path / "rejuvenations.json").read_text())
    assert [(r["cycle"], r["epoch"]) for r in cycles] == [(1, rejuvenated[0]), (2, rejuvenated[1])]
    assert cycles[-1] == {"cycle": 2, **reju} and summary["rejuvenations"] == cycles
    assert cycles[1]["widths_before"] == cycles[0]["widths_after"]  # the merge keeps the widths
    assert str(tmp_path / "cycles.png") in nr_jax.plots.plot_run(str(tmp_path))
    for counts in (reju["counts_before"], reju["counts_after"]):  # the budget kept
        assert abs(counts["conv"] - start) <= 0.05 * start
