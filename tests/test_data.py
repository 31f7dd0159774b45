"""Tests for nr_jax.data: tfds builder on fake IDX files, .npz cache and batching."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import struct
import sys
import threading
from pathlib import Path

import chex
import numpy as np
import pytest

from nr_jax import data

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
    monkeypatch.setattr(data, "_read_idx", fail)
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


def test_prefetch_close_stops_thread() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    iterator = data.prefetch(endless(), size=1)
    assert next(iterator) == 0
    iterator.close()  # type: ignore[attr-defined]
    iterator._thread.join(timeout=2.0)  # type: ignore[attr-defined]
    assert not iterator._thread.is_alive()  # type: ignore[attr-defined]
    assert all(t.daemon for t in threading.enumerate() if t.name == "nr_jax-prefetch")


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
    raw = data._read_idx(REAL_DIR / "t10k-images-idx3-ubyte.gz", 2051)
    np.testing.assert_array_equal(images[..., 0], raw)
    assert "tensorflow" not in sys.modules
