"""Tests for nr_jax.data: tfds builders on fabricated raw files, .npz cache, grain pipelines.

Everything is fabricated in tmp_path at test time: Fashion-MNIST IDX files, CIFAR python
pickles (archive and folder), official-looking tfds `cifar10` / `imagenet2012` datasets in
array_record (prepared without TensorFlow by same-named local builders) and tfrecord-only
dataset directories.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tarfile
import threading
from pathlib import Path

import chex
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from nr_jax import data
from nr_jax.config import ConfigError, base_config
from nr_jax.data import formats, imagenet, pipeline, registry

NUM_TRAIN = 50
NUM_TEST = 20
REAL_DIR = Path(data.DEFAULT_FASHION_MNIST_DIR)
INFO = data.DATASET_INFO["fashion_mnist"]


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Writes ``array`` (uint8) as a gzip IDX file: big-endian magic and dims, then data."""
    assert magic & 0xFF == array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _make_fake_source(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    arrays = {}
    for split, prefix, num in (("train", "train", NUM_TRAIN), ("test", "t10k", NUM_TEST)):
        images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(num,), dtype=np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fake IDX source plus one shared, already prepared data dir (prepared once)."""
    root = tmp_path_factory.mktemp("fake_fashion_mnist")
    arrays = _make_fake_source(root / "source")
    data_dir = root / "tfds"
    data.prepare_dataset(data_dir=data_dir, source_dir=root / "source")
    return {"source": root / "source", "data_dir": data_dir, "arrays": arrays}


@pytest.fixture(scope="module")
def train_arrays(fake: dict) -> tuple[np.ndarray, np.ndarray]:
    return data.load_arrays(split="train", data_dir=fake["data_dir"])


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,num", [("train", NUM_TRAIN), ("test", NUM_TEST)])
def test_load_arrays_round_trip(fake: dict, split: str, num: int) -> None:
    images, labels = data.load_arrays("fashion_mnist", split, data_dir=fake["data_dir"])
    chex.assert_shape(images, (num, 28, 28, 1))
    chex.assert_shape(labels, (num,))
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    want_images, want_labels = fake["arrays"][split]
    np.testing.assert_array_equal(images[..., 0], want_images)  # Exact pixels, file order.
    np.testing.assert_array_equal(labels, want_labels.astype(np.int32))


def test_no_tensorflow_imported(fake: dict) -> None:
    data.load_arrays(split="test", data_dir=fake["data_dir"])
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None, "test env should not have TF"


def test_limit_takes_first_examples(fake: dict) -> None:
    images, labels = data.load_arrays(split="train", data_dir=fake["data_dir"], limit=7)
    chex.assert_shape(images, (7, 28, 28, 1))
    np.testing.assert_array_equal(images[..., 0], fake["arrays"]["train"][0][:7])
    np.testing.assert_array_equal(labels, fake["arrays"]["train"][1][:7])
    empty, _ = data.load_arrays(split="train", data_dir=fake["data_dir"], limit=0)
    assert empty.shape == (0, 28, 28, 1)


@pytest.mark.parametrize("limit,error", [(-1, ValueError), (NUM_TRAIN + 1, ValueError)])
def test_limit_out_of_range(fake: dict, limit: int, error: type[Exception]) -> None:
    with pytest.raises(error, match=str(NUM_TRAIN)):
        data.load_arrays(split="train", data_dir=fake["data_dir"], limit=limit)


def test_limit_wrong_type(fake: dict) -> None:
    with pytest.raises(TypeError, match="limit"):
        data.load_arrays(split="train", data_dir=fake["data_dir"], limit=2.5)  # type: ignore[arg-type]


def test_cache_written_and_reused(
    fake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "tfds"
    first = data.load_arrays(split="test", data_dir=data_dir, source_dir=fake["source"])
    cache = data_dir / "fashion_mnist_local" / "nr_jax_cache" / "1.0.0" / "test.npz"
    assert cache.is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tfds source must not be read when the cache is valid")

    monkeypatch.setattr(data.FashionMnistLocal, "as_data_source", fail)
    monkeypatch.setattr(data.FashionMnistLocal, "download_and_prepare", fail)
    monkeypatch.setattr(formats, "read_idx", fail)
    # Even with the raw files gone, the cached split still loads.
    second = data.load_arrays(split="test", data_dir=data_dir, source_dir=tmp_path / "gone")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_stale_cache_is_rebuilt(fake: dict, tmp_path: Path) -> None:
    data_dir = tmp_path / "tfds"
    want = data.load_arrays(split="test", data_dir=data_dir, source_dir=fake["source"])
    cache = data_dir / "fashion_mnist_local" / "nr_jax_cache" / "1.0.0" / "test.npz"
    with open(cache, "wb") as f:  # Same path, but claims another builder version.
        np.savez(
            f,
            images=np.zeros_like(want[0]),
            labels=np.zeros_like(want[1]),
            meta_builder=np.asarray("fashion_mnist_local"),
            meta_version=np.asarray("0.9.0"),
            meta_split=np.asarray("test"),
            meta_format=np.asarray("1"),
        )
    got = data.load_arrays(split="test", data_dir=data_dir, source_dir=fake["source"])
    np.testing.assert_array_equal(got[0], want[0])
    with np.load(cache) as npz:
        assert str(npz["meta_version"]) == str(data.FashionMnistLocal.VERSION)


def test_corrupt_cache_is_rebuilt(fake: dict) -> None:
    data_dir = fake["data_dir"]
    data.load_arrays(split="test", data_dir=data_dir)
    cache = data_dir / "fashion_mnist_local" / "nr_jax_cache" / "1.0.0" / "test.npz"
    cache.write_bytes(b"not a zip file")
    images, _ = data.load_arrays(split="test", data_dir=data_dir)
    np.testing.assert_array_equal(images[..., 0], fake["arrays"]["test"][0])


def test_env_vars_select_dirs(fake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(fake["source"]))
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env_tfds"))
    images, _ = data.load_arrays(split="test")
    np.testing.assert_array_equal(images[..., 0], fake["arrays"]["test"][0])
    assert (tmp_path / "env_tfds" / "fashion_mnist_local" / "1.0.0").is_dir()
    assert data.resolve_data_dir() == tmp_path / "env_tfds"


def test_missing_source_dir(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load_arrays(split="train", data_dir=tmp_path / "tfds", source_dir=missing)
    message = str(excinfo.value)
    assert str(missing) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert data.FASHION_MNIST_DIR_ENV in message
    assert isinstance(excinfo.value, FileNotFoundError)
    assert not (tmp_path / "tfds" / "fashion_mnist_local" / "1.0.0").exists()


def test_missing_single_file(tmp_path: Path) -> None:
    source = tmp_path / "partial"
    _make_fake_source(source)
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_arrays(split="train", data_dir=tmp_path / "tfds", source_dir=source)


def test_bad_idx_magic(tmp_path: Path) -> None:
    source = tmp_path / "bad"
    _make_fake_source(source)
    _write_idx(source / "train-labels-idx1-ubyte.gz", np.zeros((NUM_TRAIN,), np.uint8), 2305)
    with pytest.raises(ValueError, match="magic"):
        data.prepare_dataset(data_dir=tmp_path / "tfds", source_dir=source)


def test_unknown_name_and_split(fake: dict) -> None:
    with pytest.raises(ValueError, match="fashion_mnist") as excinfo:
        data.load_arrays("cifar_1000", data_dir=fake["data_dir"])
    assert "cifar_1000" in str(excinfo.value)
    assert isinstance(excinfo.value, ConfigError) and "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        data.dataset_info("mnist")
    assert str(excinfo.value) == (
        "config.dataset = 'mnist' is not allowed: one of "
        "['cifar10', 'cifar100', 'fashion_mnist', 'imagenet2012']"
    )
    assert data.dataset_info("cifar10") is data.DATASET_INFO["cifar10"]
    with pytest.raises(ValueError, match="validation"):
        data.load_arrays(split="validation", data_dir=fake["data_dir"])
    assert "fashion_mnist" in data.known_datasets()


# --------------------------------------------------------------------------------------
# Normalisation and batching (synthetic arrays; no tfds)
# --------------------------------------------------------------------------------------


def _synthetic(num: int = 103, size: int = 28, channels: int = 1) -> tuple:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num, size, size, channels), dtype=np.uint8)
    # Label = index, so batches reveal which examples they contain.
    return images, np.arange(num, dtype=np.int64)


def test_dataset_info() -> None:
    assert data.DatasetInfo(10, (28, 28, 1), (0.2860,), (0.3530,)) == INFO
    with pytest.raises(dataclasses.FrozenInstanceError):
        INFO.num_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="channel"):
        data.DatasetInfo(10, (32, 32, 3), (0.5,), (0.2,))


def test_normalize() -> None:
    images = np.array([0, 73, 255], dtype=np.uint8).reshape(1, 1, 3, 1)
    out = data.normalize(images, INFO)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, (images / 255.0 - 0.2860) / 0.3530, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        data.normalize(images.astype(np.float32), INFO)
    with pytest.raises(ValueError, match="shape"):
        data.normalize(np.zeros((2, 4, 4, 3), np.uint8), INFO)


def test_steps_per_epoch() -> None:
    assert data.steps_per_epoch(103, 10) == 10
    assert data.steps_per_epoch(100, 100) == 1
    for bad in (0, -1, 101):
        with pytest.raises(ValueError, match="batch_size"):
            data.steps_per_epoch(100, bad)


def test_train_batches_shapes_and_coverage() -> None:
    images, labels = _synthetic()
    batches = list(data.train_batches(images, labels, 10, seed=0, epoch=0, info=INFO))
    assert len(batches) == data.steps_per_epoch(103, 10) == 10
    for batch in batches:
        chex.assert_shape(batch["image"], (10, 28, 28, 1))
        chex.assert_shape(batch["label"], (10,))
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"], data.normalize(images[batch["label"]], INFO))
    seen = np.concatenate([b["label"] for b in batches])
    assert len(np.unique(seen)) == 100  # Each example at most once; 3 dropped.
    plain = next(data.train_batches(images, labels, 10, seed=0, epoch=0))
    assert plain["image"].min() >= 0.0 and plain["image"].max() <= 1.0


def test_train_batches_deterministic_shuffle() -> None:
    images, labels = _synthetic()

    def order(seed: int, epoch: int) -> np.ndarray:
        batches = data.train_batches(images, labels, 10, seed=seed, epoch=epoch)
        return np.concatenate([b["label"] for b in batches])

    np.testing.assert_array_equal(order(3, 1), order(3, 1))
    assert not np.array_equal(order(3, 1), order(3, 2))
    assert not np.array_equal(order(3, 1), order(4, 1))
    assert not np.array_equal(order(3, 1), np.arange(100))


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_resume(augment: bool) -> None:
    images, labels = _synthetic()
    kwargs = {"seed": 5, "epoch": 2, "augment": augment, "info": INFO}
    full = list(data.train_batches(images, labels, 10, **kwargs))
    tail = list(data.train_batches(images, labels, 10, start_batch=4, **kwargs))
    assert len(tail) == len(full) - 4
    for got, want in zip(tail, full[4:], strict=True):
        chex.assert_trees_all_equal(got, want)
    assert list(data.train_batches(images, labels, 10, start_batch=10, **kwargs)) == []
    with pytest.raises(ValueError, match="start_batch"):
        data.train_batches(images, labels, 10, start_batch=11, **kwargs)


@pytest.mark.parametrize("augment", [False, True])
def test_iterator_state_round_trip_mid_epoch(augment: bool) -> None:
    images, labels = _synthetic()
    kwargs = {"seed": 7, "epoch": 3, "augment": augment, "info": INFO}
    iterator = data.train_batches(images, labels, 10, **kwargs)
    head = [next(iterator) for _ in range(3)]
    state = json.loads(json.dumps(iterator.get_state()))  # What a checkpoint stores.
    rest = list(iterator)
    assert len(rest) == 7
    resumed = data.train_batches(images, labels, 10, **kwargs)
    resumed.set_state(state)
    chex.assert_trees_all_equal(list(resumed), rest)  # Bit-identical remaining batches.
    full = list(data.train_batches(images, labels, 10, **kwargs))
    chex.assert_trees_all_equal(head + rest, full)


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    images, labels = _synthetic()

    def epoch(seed: int, number: int, threads: int = 0) -> list[dict]:
        batches = data.train_batches(
            images, labels, 10, seed=seed, epoch=number, augment=True, num_threads=threads
        )
        return list(batches)

    same, again = epoch(3, 1), epoch(3, 1, threads=2)  # Worker threads change nothing.
    chex.assert_trees_all_equal(same, again)
    for other in (epoch(3, 2), epoch(4, 1)):
        order = np.concatenate([b["label"] for b in other])
        assert not np.array_equal(order, np.concatenate([b["label"] for b in same]))


@pytest.mark.parametrize("size,pad", [(28, 2), (32, 4)])
def test_train_batches_augment(size: int, pad: int) -> None:
    channels = 1 if size == 28 else 3
    images, labels = _synthetic(64, size, channels)
    kwargs = {"seed": 1, "epoch": 0, "augment": True}
    first = list(data.train_batches(images, labels, 16, **kwargs))
    again = list(data.train_batches(images, labels, 16, **kwargs))
    chex.assert_trees_all_equal(first, again)
    plain = list(data.train_batches(images, labels, 16, seed=1, epoch=0))
    changed = 0
    for aug, ref in zip(first, plain, strict=True):
        chex.assert_shape(aug["image"], (16, size, size, channels))
        assert aug["image"].dtype == np.float32
        np.testing.assert_array_equal(aug["label"], ref["label"])  # Same shuffle.
        # Without info the pixels are x / 255, so x is recovered exactly by rounding.
        pixels = np.rint(aug["image"] * 255.0).astype(np.uint8)
        raw = images[aug["label"]]
        padded = np.pad(raw, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        for k in range(16):
            # Every augmented image is some crop of the padded image, possibly flipped.
            candidates = [
                crop
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for crop in (
                    padded[k, dy : dy + size, dx : dx + size],
                    padded[k, dy : dy + size, dx : dx + size][:, ::-1],
                )
            ]
            assert any(np.array_equal(pixels[k], c) for c in candidates)
            changed += not np.array_equal(pixels[k], raw[k])
    assert changed > 32


def test_train_batches_input_errors() -> None:
    images, labels = _synthetic()
    with pytest.raises(TypeError, match="uint8"):
        data.train_batches(images.astype(np.float32), labels, 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="labels"):
        data.train_batches(images, labels[:-1], 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.train_batches(images, labels, 104, seed=0, epoch=0)
    with pytest.raises(TypeError, match="seed"):
        data.train_batches(images, labels, 10, seed=1.5, epoch=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("num,batch_size", [(103, 10), (100, 10), (3, 8)])
def test_eval_batches_padding(num: int, batch_size: int) -> None:
    images, labels = _synthetic(num)
    batches = list(data.eval_batches(images, labels, batch_size, info=INFO))
    assert len(batches) == -(-num // batch_size)
    for batch in batches:
        chex.assert_shape(batch["image"], (batch_size, 28, 28, 1))
        chex.assert_shape([batch["label"], batch["mask"]], (batch_size,))
        assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == num
    np.testing.assert_array_equal(masks[:num], 1.0)
    got_labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(got_labels[:num], labels)  # In order, each once.
    got_images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(got_images[:num], data.normalize(images, INFO))


def _run_config(data_dir: Path, **overrides: object):
    config = base_config()
    config.update(dataset="fashion_mnist", data_dir=str(data_dir), batch_size=8, seed=11)
    config.update(eval_batch_size=16, augment=True, **overrides)
    return config


def test_run_data_resumes_from_the_saved_state(fake: dict) -> None:
    run = data.RunData(_run_config(fake["data_dir"], train_limit=40), INFO)
    assert (run.num_train, run.steps_per_epoch) == (40, 5)
    iterator = run.train_iterator(2)
    head = [next(iterator) for _ in range(2)]
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = list(run.train_iterator(2, state))
    chex.assert_trees_all_equal(head + resumed, list(run.train_iterator(2)))
    chex.assert_trees_all_equal(list(iterator), resumed)
    first = np.concatenate([b["label"] for b in run.train_iterator(0)])
    assert len(first) == 40
    test = list(run.test_batches())
    assert len(test) == 2 and sum(float(b["mask"].sum()) for b in test) == NUM_TEST


def test_prefetch_order_and_errors() -> None:
    assert list(data.prefetch(iter(range(20)), size=3)) == list(range(20))

    def broken():
        yield 1
        raise RuntimeError("boom")

    iterator = data.prefetch(broken())
    assert next(iterator) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(iterator)

    images, labels = _synthetic()
    direct = list(data.train_batches(images, labels, 10, seed=0, epoch=0))
    fetched = list(data.prefetch(data.train_batches(images, labels, 10, seed=0, epoch=0)))
    chex.assert_trees_all_equal(direct, fetched)
    with pytest.raises(ValueError, match="size"):
        data.prefetch(iter([]), size=0)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]


def test_prefetch_close_stops_thread() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = len(_prefetch_threads())
    iterator = data.prefetch(endless(), size=1)
    assert next(iterator) == 0
    assert len(_prefetch_threads()) == before + 1
    assert all(t.daemon for t in _prefetch_threads())
    iterator.close()  # type: ignore[attr-defined]
    assert len(_prefetch_threads()) == before  # close() joins grain's thread


def test_prefetch_keeps_grain_state() -> None:
    images, labels = _synthetic()
    kwargs = {"seed": 2, "epoch": 1, "augment": True}
    fetched = data.prefetch(data.train_batches(images, labels, 10, **kwargs), size=3)
    head = [next(fetched) for _ in range(4)]
    state = fetched.get_state()  # type: ignore[attr-defined]
    fetched.close()  # type: ignore[attr-defined]
    resumed = data.train_batches(images, labels, 10, **kwargs)
    resumed.set_state(state)
    full = list(data.train_batches(images, labels, 10, **kwargs))
    chex.assert_trees_all_equal(head + list(resumed), full)


# --------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_fashion_mnist_test_split() -> None:
    """Prepares into the default data dir ($NR_JAX_DATA_DIR or ~/tensorflow_datasets).

    The first run prepares both splits (~20 s); later runs read the .npz cache.
    """
    if not REAL_DIR.is_dir():
        pytest.skip(
            f"{REAL_DIR} is missing: run `apt-get install -y dataset-fashion-mnist` "
            f"or point {data.FASHION_MNIST_DIR_ENV} at the IDX files"
        )
    images, labels = data.load_arrays("fashion_mnist", "test", source_dir=REAL_DIR)
    chex.assert_shape(images, (10000, 28, 28, 1))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    raw = formats.read_idx(REAL_DIR / "t10k-images-idx3-ubyte.gz", 2051)
    np.testing.assert_array_equal(images[..., 0], raw)
    assert "tensorflow" not in sys.modules


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (fabricated python-pickle archives and tfds datasets)
# --------------------------------------------------------------------------------------

CIFAR_SPLITS = {
    # name: (folder, archive, {split: [(file, num examples)]}, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        {
            "train": [(f"data_batch_{i}", 3) for i in range(1, 6)],
            "test": [("test_batch", 4)],
        },
        b"labels",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        {"train": [("train", 7)], "test": [("test", 5)]},
        b"fine_labels",
        100,
    ),
}


def _make_cifar_source(
    directory: Path, name: str, *, archive: bool, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes CIFAR pickles (as the authors' archives: CHW rows) and returns HWC arrays."""
    folder, archive_name, files, label_key, classes = CIFAR_SPLITS[name]
    rng = np.random.default_rng(seed)
    staging = directory / folder
    staging.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, batches in files.items():
        images, labels = [], []
        for file_name, num in batches:
            chw = rng.integers(0, 256, size=(num, 3, 32, 32), dtype=np.uint8)
            batch_labels = [int(x) for x in rng.integers(0, classes, size=num)]
            batch = {
                b"batch_label": file_name.encode(),
                b"data": chw.reshape(num, 3072),
                label_key: batch_labels,
                b"filenames": [f"img_{i}.png".encode() for i in range(num)],
            }
            if name == "cifar100":
                batch[b"coarse_labels"] = [x // 5 for x in batch_labels]
            (staging / file_name).write_bytes(pickle.dumps(batch, protocol=2))
            images.append(chw.transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch_labels))
        expected[split] = (np.concatenate(images), np.concatenate(labels).astype(np.int32))
    if archive:
        with tarfile.open(directory / archive_name, "w:gz") as tar:
            tar.add(staging, arcname=folder)
        shutil.rmtree(staging)
    return expected


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "folder"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_round_trip(tmp_path: Path, name: str, archive: bool) -> None:
    source = tmp_path / "src"
    expected = _make_cifar_source(source, name, archive=archive)
    data_dir = tmp_path / "tfds"
    for split, (want_images, want_labels) in expected.items():
        images, labels = data.load_arrays(name, split, data_dir=data_dir, source_dir=source)
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        chex.assert_shape(images, want_images.shape)
        np.testing.assert_array_equal(images, want_images)  # Exact pixels, file order.
        np.testing.assert_array_equal(labels, want_labels)
    local = registry.SOURCES[name].builder_cls.name
    assert local == f"{name}_local"
    assert (data_dir / local / "1.0.0").is_dir()
    assert (data_dir / local / "nr_jax_cache" / "1.0.0" / "test.npz").is_file()
    assert "tensorflow" not in sys.modules


def test_cifar_default_and_env_source_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Default: the archive sits in the data dir itself.
    data_dir = tmp_path / "tfds"
    expected = _make_cifar_source(data_dir, "cifar100", archive=True)
    monkeypatch.delenv(data.CIFAR_DIR_ENV, raising=False)
    images, _ = data.load_arrays("cifar100", "test", data_dir=data_dir)
    np.testing.assert_array_equal(images, expected["test"][0])
    # $NR_JAX_CIFAR_DIR pointing at the extracted folder itself.
    source = tmp_path / "elsewhere"
    expected = _make_cifar_source(source, "cifar10", archive=False, seed=3)
    monkeypatch.setenv(data.CIFAR_DIR_ENV, str(source / "cifar-10-batches-py"))
    images, labels = data.load_arrays("cifar10", "test", data_dir=data_dir)
    np.testing.assert_array_equal(images, expected["test"][0])
    np.testing.assert_array_equal(labels, expected["test"][1])


def test_cifar_missing_names_places_searched(tmp_path: Path) -> None:
    data_dir, source = tmp_path / "tfds", tmp_path / "nothing_here"
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load_arrays("cifar10", "train", data_dir=data_dir, source_dir=source)
    message = str(excinfo.value)
    for expected in (
        str(data_dir / "cifar10"),  # (1) the official tfds dataset
        str(source / "cifar-10-batches-py"),  # (2) the extracted pickles
        str(source / "cifar-10-python.tar.gz"),  # (3) the archive
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        f"tfds build cifar10 --file_format=array_record --data_dir={data_dir}",
        data.CIFAR_DIR_ENV,
    ):
        assert expected in message
    assert "tfrecord" not in message
    assert not (data_dir / "cifar10_local" / "1.0.0").exists()
    with pytest.raises(data.DatasetNotFoundError, match="cifar-100-python.tar.gz"):
        data.load_arrays("cifar100", "test", data_dir=data_dir, source_dir=source)


def test_cifar_incomplete_archive(tmp_path: Path) -> None:
    source = tmp_path / "src"
    _make_cifar_source(source, "cifar10", archive=False)
    (source / "cifar-10-batches-py" / "test_batch").unlink()
    with tarfile.open(source / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(source / "cifar-10-batches-py")
    with pytest.raises(data.DatasetNotFoundError, match="cifar-10-batches-py/test_batch"):
        data.load_arrays("cifar10", "test", data_dir=tmp_path / "tfds", source_dir=source)


def test_cifar_unpickler_refuses_other_globals() -> None:
    raw = pickle.dumps({b"data": collections.OrderedDict()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="OrderedDict"):
        formats.load_cifar_pickle(raw, "test")
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for protocol in (2, 4, 5):
        loaded = formats.load_cifar_pickle(pickle.dumps({b"data": array}, protocol=protocol), "t")
        np.testing.assert_array_equal(loaded[b"data"], array)


class _FakeOfficialCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for tfds' `cifar10` (same name, version and features), prepared without TF."""

    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")
    code_path = epath.Path(__file__)
    NUM = {"train": 10, "test": 4}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: object) -> dict:
        return {split: self._generate_examples(split) for split in self.NUM}

    def _generate_examples(self, split: str):
        for i in range(self.NUM[split]):
            # Image i is constant 10 * i + (channel), label i: checkable in any order.
            image = (10 * i + np.arange(3, dtype=np.uint8)) * np.ones((32, 32, 1), np.uint8)
            yield i, {"id": f"{split}_{i:05d}", "image": formats.encode_png(image), "label": i}


def _prepare_official_cifar10(data_dir: Path) -> None:
    _FakeOfficialCifar10(
        data_dir=os.fspath(data_dir), file_format="array_record"
    ).download_and_prepare()


def test_official_tfds_cifar_array_record_is_read_first(tmp_path: Path) -> None:
    data_dir = tmp_path / "tfds"
    _prepare_official_cifar10(data_dir)
    source = tmp_path / "src"
    _make_cifar_source(source, "cifar10", archive=True)  # Present, but must not be used.
    images, labels = data.load_arrays("cifar10", "train", data_dir=data_dir, source_dir=source)
    chex.assert_shape(images, (10, 32, 32, 3))
    assert sorted(labels.tolist()) == list(range(10))
    want = (10 * labels[:, None] + np.arange(3)).astype(np.uint8)
    np.testing.assert_array_equal(images, np.broadcast_to(want[:, None, None], images.shape))
    assert (data_dir / "cifar10" / "nr_jax_cache" / "3.0.2" / "train.npz").is_file()
    assert not (data_dir / "cifar10_local").exists()
    assert data.prepare_dataset("cifar10", data_dir=data_dir) == data_dir / "cifar10" / "3.0.2"
    assert "tensorflow" not in sys.modules


def _write_tfrecord_only(data_dir: Path, name: str, version: str, legacy: bool) -> Path:
    """What `tfds build <name>` (default file format) leaves behind, minus the shards."""
    version_dir = data_dir / name / version
    version_dir.mkdir(parents=True)
    info = {"name": name, "version": version, "splits": [{"name": "train"}]}
    if not legacy:  # Older tfds wrote no fileFormat at all for the tfrecord default.
        info["fileFormat"] = "tfrecord"
    (version_dir / "dataset_info.json").write_text(json.dumps(info))
    (version_dir / f"{name}-train.tfrecord-00000-of-00001").write_bytes(b"")
    return version_dir


@pytest.mark.parametrize("legacy", [False, True], ids=["fileFormat", "legacy"])
def test_tfrecord_only_cifar_says_how_to_reprepare(tmp_path: Path, legacy: bool) -> None:
    data_dir = tmp_path / "tfds"
    version_dir = _write_tfrecord_only(data_dir, "cifar10", "3.0.2", legacy)
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load_arrays("cifar10", "train", data_dir=data_dir, source_dir=tmp_path / "none")
    message = str(excinfo.value)
    assert str(version_dir) in message and "tfrecord" in message
    assert "only be read with TensorFlow" in message
    assert (
        f"tfds convert_format --dataset_version_dir={version_dir} --out_file_format=array_record"
        in message
    )
    assert (
        f"tfds build cifar10 --file_format=array_record --data_dir={data_dir} --overwrite"
        in message
    )
    assert str(tmp_path / "none" / "cifar-10-python.tar.gz") in message
    # With the python archive at hand, the pickles are used instead.
    expected = _make_cifar_source(tmp_path / "src", "cifar10", archive=True)
    images, _ = data.load_arrays("cifar10", "test", data_dir=data_dir, source_dir=tmp_path / "src")
    np.testing.assert_array_equal(images, expected["test"][0])


def test_tfrecord_with_array_record_alternative_is_readable(tmp_path: Path) -> None:
    """What `tfds convert_format --out_file_format=array_record` leaves: both formats."""
    data_dir = tmp_path / "tfds"
    _prepare_official_cifar10(data_dir)
    info_path = data_dir / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info.update(fileFormat="tfrecord", alternativeFileFormats=["array_record"])
    info_path.write_text(json.dumps(info))
    images, labels = data.load_arrays("cifar10", "test", data_dir=data_dir, source_dir=tmp_path)
    chex.assert_shape(images, (4, 32, 32, 3))
    assert sorted(labels.tolist()) == [0, 1, 2, 3]


def test_cifar_dataset_info_and_train_batches() -> None:
    info = data.DATASET_INFO["cifar10"]
    assert info == data.DatasetInfo(
        10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    )
    assert data.DATASET_INFO["cifar100"] == dataclasses.replace(info, num_classes=100)
    imagenet = data.DATASET_INFO["imagenet2012"]
    assert (imagenet.num_classes, imagenet.image_shape) == (1000, (224, 224, 3))
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    assert data.DATASET_INFO["fashion_mnist"] == INFO
    assert {"cifar10", "cifar100", "fashion_mnist"} <= set(data.known_datasets())
    assert pipeline.augment_padding(32, 32) == 4  # CIFAR: random crop 32 with padding 4.
    images, labels = _synthetic(40, 32, 3)
    batch = next(data.train_batches(images, labels, 8, seed=0, epoch=0, info=info))
    raw = images[batch["label"]].astype(np.float64) / 255.0
    want = (raw - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(batch["image"], want, rtol=1e-5, atol=1e-5)
    aug = next(data.train_batches(images, labels, 8, seed=0, epoch=0, augment=True, info=info))
    chex.assert_shape(aug["image"], (8, 32, 32, 3))


# --------------------------------------------------------------------------------------
# ImageNet-style source (fabricated tiny `imagenet2012` with JPEGs of different sizes)
# --------------------------------------------------------------------------------------

IMAGENET_INFO = data.DATASET_INFO["imagenet2012"]
IMAGENET_SIZES = {
    "train": [(300, 260), (240, 320), (256, 256), (500, 180), (230, 240), (280, 300), (120, 90)],
    "validation": [(300, 260), (240, 320), (256, 300), (500, 180), (231, 240)],
}


def _jpeg(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> bytes:
    # Smooth content (JPEG-friendly) plus noise, so crops and flips are distinguishable.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _FakeImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for tfds' `imagenet2012` (same name and features), prepared without TF.

    The real builder needs the manually downloaded ILSVRC2012 tars to prepare, so the
    tests prepare this one under the same name and read it through the real code path.
    """

    name = "imagenet2012"
    VERSION = tfds.core.Version("5.1.0")
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return data.imagenet2012_info(self)

    def _split_generators(self, dl_manager: object) -> dict:
        return {split: self._generate_examples(split) for split in IMAGENET_SIZES}

    def _generate_examples(self, split: str):
        rng = np.random.default_rng(len(split))
        for i, (height, width) in enumerate(IMAGENET_SIZES[split]):
            mode = "L" if i == 1 else ("CMYK" if i == 2 else "RGB")  # tfds keeps them as is.
            yield (
                i,
                {
                    "image": _jpeg(rng, height, width, mode),
                    "label": 100 * i + 7,
                    "file_name": f"n0000_{i}.JPEG",
                },
            )


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("fake_imagenet") / "tfds"
    _FakeImagenet(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_imagenet_source(imagenet_dir: Path) -> None:
    source = data.load_imagenet_source("validation", data_dir=imagenet_dir)
    assert len(source) == len(IMAGENET_SIZES["validation"])
    example = source[3]
    assert isinstance(example["image"], bytes) and example["image"][:2] == b"\xff\xd8"
    assert example["label"] == 307
    assert "tensorflow" not in sys.modules


def test_imagenet_train_batches(imagenet_dir: Path) -> None:
    source = data.load_imagenet_source("train", data_dir=imagenet_dir)
    kwargs = {"seed": 3, "epoch": 1, "info": IMAGENET_INFO}
    first = list(data.train_batches_from_source(source, 3, num_workers=2, **kwargs))
    assert len(first) == 2  # 7 examples: remainder dropped.
    for batch in first:
        chex.assert_shape(batch["image"], (3, 224, 224, 3))
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    labels = np.concatenate([b["label"] for b in first])
    assert len(set(labels.tolist())) == 6 and set(labels.tolist()) <= {
        100 * i + 7 for i in range(7)
    }
    # Deterministic, independent of the number of threads; resumable.
    again = list(data.train_batches_from_source(source, 3, num_workers=1, **kwargs))
    chex.assert_trees_all_equal(first, again)
    tail = list(data.train_batches_from_source(source, 3, num_workers=3, start_batch=1, **kwargs))
    chex.assert_trees_all_equal(tail, first[1:])
    other = next(data.train_batches_from_source(source, 3, seed=3, epoch=2, info=IMAGENET_INFO))
    assert not np.array_equal(other["image"], first[0]["image"])
    # augment=False: the evaluation transform, in the shuffled order.
    plain = next(data.train_batches_from_source(source, 3, augment=False, **kwargs))
    np.testing.assert_array_equal(plain["label"], first[0]["label"])
    index = (int(plain["label"][0]) - 7) // 100
    want = imagenet.eval_transform(source[index]["image"], 224, 256)
    np.testing.assert_allclose(plain["image"][0], data.normalize(want, IMAGENET_INFO))


def test_imagenet_iterator_state_round_trip(imagenet_dir: Path) -> None:
    source = data.load_imagenet_source("train", data_dir=imagenet_dir)
    kwargs = {"seed": 5, "epoch": 0, "info": IMAGENET_INFO, "num_workers": 2}
    iterator = data.train_batches_from_source(source, 2, **kwargs)
    head = next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    rest = list(iterator)
    assert len(rest) == 2
    resumed = data.train_batches_from_source(source, 2, **kwargs)
    resumed.set_state(state)
    chex.assert_trees_all_equal(list(resumed), rest)
    chex.assert_trees_all_equal(
        [head, *rest], list(data.train_batches_from_source(source, 2, **kwargs))
    )


def test_imagenet_eval_batches_padding(imagenet_dir: Path) -> None:
    source = data.load_imagenet_source("validation", data_dir=imagenet_dir)
    batches = list(data.eval_batches_from_source(source, 2, info=IMAGENET_INFO, num_workers=2))
    assert len(batches) == 3
    for batch in batches:
        chex.assert_shape(batch["image"], (2, 224, 224, 3))
        chex.assert_shape([batch["label"], batch["mask"]], (2,))
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 1, 1, 0])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, [7, 107, 207, 307, 407, 0])
    np.testing.assert_array_equal(
        batches[-1]["image"][1], data.normalize(np.zeros((224, 224, 3), np.uint8), IMAGENET_INFO)
    )
    # Resize(256) on the shorter side + CenterCrop(224), computed by hand for 300x260.
    image = Image.open(io.BytesIO(source[0]["image"])).convert("RGB")
    resized = image.resize((256, int(256 * 300 / 260)), Image.Resampling.BILINEAR)
    top = round((int(256 * 300 / 260) - 224) / 2)
    want = np.asarray(resized)[top : top + 224, 16:240]
    np.testing.assert_allclose(batches[0]["image"][0], data.normalize(want, IMAGENET_INFO))
    again = list(data.eval_batches_from_source(source, 2, info=IMAGENET_INFO, num_workers=1))
    chex.assert_trees_all_equal(batches, again)


def test_random_resized_crop_box() -> None:
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for _ in range(300):
        height, width = (int(x) for x in rng.integers(40, 400, size=2))
        top, left, h, w = imagenet.random_resized_crop_box(rng, height, width, scale, ratio)
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        assert 0.08 * 0.9 <= h * w / (height * width) <= 1.0
    # Ten misses (a 1000 x 10 strip): the centre crop with the aspect ratio clamped.
    assert imagenet.random_resized_crop_box(rng, 1000, 10, scale, ratio) == (493, 0, 13, 10)
    assert imagenet.random_resized_crop_box(rng, 10, 1000, scale, ratio) == (0, 493, 10, 13)


def test_imagenet_missing_and_tfrecord_only(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load_imagenet_source("train", data_dir=tmp_path)
    message = str(excinfo.value)
    for expected in (
        str(tmp_path / "imagenet2012"),
        "ILSVRC2012_img_train.tar",
        str(tmp_path / "downloads" / "manual"),
        f"tfds build imagenet2012 --file_format=array_record --data_dir={tmp_path}",
    ):
        assert expected in message
    version_dir = _write_tfrecord_only(tmp_path, "imagenet2012", "5.1.0", legacy=False)
    with pytest.raises(data.DatasetNotFoundError, match="tfrecord") as excinfo:
        data.load_imagenet_source("train", data_dir=tmp_path)
    assert str(version_dir) in str(excinfo.value)


def test_source_batches_errors() -> None:
    good = _jpeg(np.random.default_rng(0), 64, 64)
    source = [{"image": good, "label": 1}, {"image": b"not an image", "label": 2}]
    with pytest.raises(Image.UnidentifiedImageError):
        list(data.eval_batches_from_source(source, 2, info=IMAGENET_INFO, num_workers=2))
    arrays = [{"image": np.zeros((50, 60, 3), np.uint8), "label": 0}] * 4  # Decoded arrays.
    batch = next(data.train_batches_from_source(arrays, 2, seed=0, epoch=0, info=IMAGENET_INFO))
    chex.assert_shape(batch["image"], (2, 224, 224, 3))
    with pytest.raises(ValueError, match="batch_size"):
        data.train_batches_from_source(arrays, 5, seed=0, epoch=0, info=IMAGENET_INFO)
    with pytest.raises(ValueError, match="image_shape"):
        data.eval_batches_from_source(arrays, 2, info=INFO)
    with pytest.raises(ValueError, match="scale"):
        data.train_batches_from_source(
            arrays, 2, seed=0, epoch=0, info=IMAGENET_INFO, scale=(0.5, 0.1)
        )
