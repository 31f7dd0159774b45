"""The validation split (`config.val_size`) and where test figures appear in a run's records."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from nr_jax import data as nr_data
from nr_jax import steps as nr_steps
from nr_jax import train
from nr_jax.checkpoint import Checkpointer
from nr_jax.config import ConfigError, base_config, validate
from nr_jax.data import run as data_run
from nr_jax.run_state import restore_run

FMNIST = "/usr/share/datasets/fashion-mnist"
N = 6_000  # examples of the synthetic training split


@pytest.fixture
def synthetic_split(monkeypatch):
    """`cache.load_arrays` returning a synthetic split whose example i carries i in its pixels."""
    ids = np.arange(N)
    images = np.stack([ids % 256, ids // 256], axis=1).astype(np.uint8).reshape(N, 1, 2, 1)
    labels = (ids % 10).astype(np.int32)

    def load_arrays(name="fashion_mnist", split="train", *, data_dir=None, limit=None):
        del name, data_dir
        n = N if split == "train" else 100
        return images[:n][:limit], labels[:n][:limit]

    monkeypatch.setattr(data_run.cache, "load_arrays", load_arrays)
    return images


def run_data(**fields) -> nr_data.RunData:
    c = base_config()
    c.update(fields)
    return nr_data.RunData(c, nr_data.dataset_info("fashion_mnist"))


def ids_of(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def test_validation_split_on_paper():
    val, train_idx = data_run.validation_split(10, 3)
    expected = np.sort(np.random.default_rng(data_run.VAL_SEED).permutation(10)[:3])
    np.testing.assert_array_equal(val, expected)
    np.testing.assert_array_equal(np.sort(np.concatenate([val, train_idx])), np.arange(10))
    assert list(train_idx) == sorted(set(range(10)) - set(val.tolist()))
    empty, everything = data_run.validation_split(10, 0)
    assert len(empty) == 0 and list(everything) == list(range(10))
    with pytest.raises(
        ValueError, match=r"config\.val_size = 10 is not allowed: an integer in \[0, 10\)"
    ):
        data_run.validation_split(10, 10)


def test_split_is_disjoint_and_fixed_across_seeds_and_train_limits(synthetic_split):
    reference = run_data(val_size=500)
    val_ids = ids_of(reference.val[0])
    np.testing.assert_array_equal(val_ids, reference.val_indices)
    assert reference.num_val == len(val_ids) == 500 and reference.num_train == N - 500
    for seed, limit in [(0, 0), (1, 0), (7, 1_000), (3, 4_000)]:
        d = run_data(val_size=500, seed=seed, train_limit=limit)
        np.testing.assert_array_equal(ids_of(d.val[0]), val_ids)  # the same held-out images
        train_ids = ids_of(d.train[0])
        assert not set(train_ids.tolist()) & set(val_ids.tolist())  # never trained on
        rest = np.setdiff1d(np.arange(N), val_ids)
        np.testing.assert_array_equal(train_ids, rest[: limit or None])  # first N of the rest
        np.testing.assert_array_equal(d.train[1], train_ids % 10)
    val_batches = list(reference.val_batches())
    assert sum(float(b["mask"].sum()) for b in val_batches) == 500


def test_no_validation_split_keeps_the_first_n(synthetic_split):
    d = run_data(train_limit=1_000)
    assert d.num_val == 0 and d.val is None and d.val_indices is None
    np.testing.assert_array_equal(ids_of(d.train[0]), np.arange(1_000))
    with pytest.raises(ValueError, match="no validation split"):
        d.val_batches()
    with pytest.raises(
        ValueError, match="config.train_limit = .* is not allowed: at most the 5500"
    ):
        run_data(val_size=500, train_limit=5_501)


def test_val_size_is_validated():
    c = base_config()
    c.data_parallel = False
    c.val_size = -1
    with pytest.raises(ConfigError, match=r"config\.val_size"):
        validate(c)


class FakeSteps:
    """`Steps` stand-in: each batch is {"correct": accuracy}, one example per batch."""

    def eval(self, variables, batch):
        del variables
        c = jnp.asarray(batch["correct"], jnp.float32)
        return {"loss_sum": 1.0 - c, "count": jnp.float32(1.0), "correct_sum": c}

    def global_batch(self, batch):
        return batch


class FakeData:
    """A run's data whose validation accuracy of each epoch is given; test accuracy 0.1 * epoch."""

    def __init__(self, val_accuracies, num_val=1):
        self.val_accuracies, self.num_val = val_accuracies, num_val
        self.epoch = self.test_evals = 0

    def val_batches(self):
        self.epoch += 1
        return [{"correct": self.val_accuracies[self.epoch - 1]}]

    def test_batches(self):
        self.test_evals += 1
        return [{"correct": 0.1 * max(self.epoch, 1)}]


def test_evaluate_epoch_puts_test_figures_only_at_final_and_best():
    data, steps, best, records = FakeData([0.5, 0.7, 0.6, 0.7, 0.65]), FakeSteps(), {}, []
    bests, state = [], types.SimpleNamespace(variables=None)
    for epoch in range(1, 6):
        record, best = nr_steps.evaluate_epoch(steps, state, data, epoch, epoch == 5, best)
        records.append(record)
        bests.append(best["epoch"])
    assert bests == [1, 2, 2, 2, 2]  # strictly better only: the tie at epoch 4 keeps epoch 2
    assert data.test_evals == 3  # epochs 1 and 2 (new bests) and 5 (final)
    for r in records[:-1]:
        assert set(r) == {"val_loss", "val_accuracy_sum"}
    assert records[-1]["test_accuracy_sum"] == pytest.approx(0.5)
    assert best["val_accuracy_sum"] == pytest.approx(0.7)
    assert best["test_accuracy_sum"] == pytest.approx(0.2)  # evaluated at epoch 2, kept
    # without a validation split: the test set every epoch, no best entry
    plain = FakeData([], num_val=0)
    record, best = nr_steps.evaluate_epoch(steps, state, plain, 1, False, {})
    assert set(record) == {"test_loss", "test_accuracy_sum"} and best == {}


needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason=f"{FMNIST} missing (apt-get install dataset-fashion-mnist)"
)


@needs_fmnist
@pytest.mark.real_data
def test_run_with_validation_records_test_only_at_final_and_best(tmp_path):
    c = base_config()
    c.model, c.batch_size, c.eval_batch_size = "vgg_tiny", 32, 100
    c.val_size, c.train_limit, c.test_limit = 200, 320, 200
    c.epochs, c.lr_milestones = 2, (1,)
    c.progress, c.plots, c.tensorboard, c.data_parallel = False, False, False, False
    c.nr.lam, c.nr.target, c.nr.max_search_epochs = 1e-2, 0.9, 3
    summary = train.train_and_evaluate(c, str(tmp_path))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if "epoch/epoch" in r]
    assert len(epochs) == summary["epochs_run"] >= 3
    for r in epochs:
        assert "epoch/val_accuracy_sum" in r and "epoch/val_loss" in r
    assert [any(k.startswith("epoch/test_") for k in r) for r in epochs] == [False] * (
        len(epochs) - 1
    ) + [True]
    best = summary["best_validation"]
    vals = [r["epoch/val_accuracy_sum"] for r in epochs]
    assert best["epoch"] == 1 + vals.index(max(vals)) and best["val_accuracy_sum"] == max(vals)
    assert 0 < best["test_accuracy_sum"] <= 1
    assert summary["final_test_accuracy"] == epochs[-1]["epoch/test_accuracy_sum"]
    # the best entry is checkpointed: a resumed run keeps it
    trainer = train.Trainer(c, str(tmp_path))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        *_, resumed_best = restore_run(trainer, ckpt)
    assert resumed_best == best
