"""The data of one training run: its train, validation and test splits and their iterators.

The validation split (``config.val_size`` images, 0 = none) is held out of the training split by
``validation_split``: a permutation of the whole split from the fixed seed ``VAL_SEED``, so the
held-out images depend on neither ``config.seed`` nor ``config.train_limit``; ``train_limit``
then takes the first N of the remaining images, in stored order. They are never trained on.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from nr_jax.config import refuse
from nr_jax.data import cache, imagenet, pipeline, registry, source_pipeline

VAL_SEED = 20190616  # fixed on purpose: one validation split for every seed and train_limit


def validation_split(num: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the validation and training examples of a training split of ``num`` examples.

    Args:
        num: Examples in the whole training split.
        val_size: Examples to hold out (0: none).

    Returns:
        ``(val, train)``: disjoint sorted int64 index arrays covering ``range(num)``; ``val``
        holds the first ``val_size`` entries of ``default_rng(VAL_SEED).permutation(num)``.

    Raises:
        ConfigError: ``val_size`` outside ``[0, num)`` (at least one training example remains).
    """
    if not 0 <= val_size < num:
        refuse("val_size", val_size, f"an integer in [0, {num}) for {num} training examples")
    val = np.sort(np.random.default_rng(VAL_SEED).permutation(num)[:val_size])
    keep = np.ones(num, bool)
    keep[val] = False
    return val, np.flatnonzero(keep)


def _limit(indices: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` of ``indices`` (all for 0); refuses more than there are."""
    if limit > len(indices):
        refuse(
            "train_limit",
            limit,
            f"at most the {len(indices)} training examples left after the validation split",
        )
    return indices[:limit] if limit else indices


class _Rows:
    """The rows ``indices`` of a random-access source, as a random-access source."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]


class RunData:
    """The run's training, validation and test batches: in-memory arrays, or (ImageNet) decoded
    on the fly.

    Attributes:
        config: The run's config (``dataset``, ``data_dir``, ``val_size``, ``train_limit``,
            ``test_limit``, ``batch_size``, ``eval_batch_size``, ``seed``, ``augment``).
        info: The dataset's ``DatasetInfo``.
        num_train: Training examples (after the validation split and ``train_limit``).
        num_val: Validation examples (``config.val_size``; 0 = no validation split).
        val_indices, train_indices: With a validation split, the indices into the whole training
            split of the validation and the training examples (``validation_split``, then
            ``train_limit``); None without one.
        steps_per_epoch: Full training batches per epoch.
    """

    def __init__(self, config: ml_collections.ConfigDict, info: registry.DatasetInfo) -> None:
        self.config, self.info = config, info
        self.streamed = config.dataset == registry.IMAGENET_NAME
        self.num_val = int(config.val_size)
        self.val: Any = None
        self.val_indices = self.train_indices = None
        if self.streamed:
            self._load_streamed()
        else:
            self._load_arrays()
        self.num_train = len(self.train) if self.streamed else len(self.train[1])
        self.steps_per_epoch = pipeline.steps_per_epoch(self.num_train, config.batch_size)

    def _load_streamed(self) -> None:
        c, data_dir = self.config, self.config.data_dir or None
        train = imagenet.load_imagenet_source("train", data_dir=data_dir)
        if self.num_val:
            val, rest = validation_split(len(train), self.num_val)
            self.val_indices, self.train_indices = val, _limit(rest, c.train_limit)
            self.val = grain.MapDataset.source(_Rows(train, val))
            self.train = grain.MapDataset.source(_Rows(train, self.train_indices))
        else:
            self.train = _first(train, c.train_limit)
        self.test = _first(
            imagenet.load_imagenet_source("validation", data_dir=data_dir), c.test_limit
        )

    def _load_arrays(self) -> None:
        c = self.config
        load = {"data_dir": c.data_dir or None, "name": c.dataset}
        if self.num_val:
            images, labels = cache.load_arrays(split="train", **load)
            val, rest = validation_split(len(labels), self.num_val)
            self.val_indices, self.train_indices = val, _limit(rest, c.train_limit)
            train = self.train_indices
            self.train, self.val = (images[train], labels[train]), (images[val], labels[val])
        else:
            self.train = cache.load_arrays(split="train", limit=c.train_limit or None, **load)
        self.test = cache.load_arrays(split="test", limit=c.test_limit or None, **load)

    def train_iterator(
        self, epoch: int, state: dict[str, Any] | None = None
    ) -> grain.DatasetIterator:
        """Epoch ``epoch``: from its start, or from a saved ``get_state()`` of its iterator.

        The batches are a pure function of ``(config.seed, epoch)``; ``state`` (JSON, as saved
        in a mid-epoch checkpoint) positions the iterator at the very next batch.
        """
        c = self.config
        kwargs = {"seed": c.seed, "epoch": epoch, "info": self.info, "augment": c.augment}
        if self.streamed:
            iterator = source_pipeline.train_batches_from_source(self.train, c.batch_size, **kwargs)
        else:
            iterator = pipeline.train_batches(*self.train, c.batch_size, **kwargs)
        if state:
            iterator.set_state(state)
        return iterator

    def test_batches(self) -> grain.DatasetIterator:
        """The test split once, in order, padded to ``config.eval_batch_size`` with a mask."""
        return self._eval_batches(self.test)

    def val_batches(self) -> grain.DatasetIterator:
        """The validation split once, in order, padded as ``test_batches``.

        Raises:
            ValueError: The run has no validation split (``config.val_size`` = 0).
        """
        if not self.num_val:
            raise ValueError("val_batches: this run has no validation split (config.val_size = 0)")
        return self._eval_batches(self.val)

    def first_images(self, n: int) -> np.ndarray:
        """The first ``min(n, num_train)`` training images, preprocessed as for evaluation.

        A fixed batch (stored order, after the validation split and ``train_limit``), e.g. for
        the activity the "dormancy" liveness criterion reads at every epoch end
        (``config.nr.activity_images``).

        Returns:
            float32 ``(min(n, num_train), H, W, C)``.
        """
        n = min(int(n), self.num_train)
        if n < 1:
            raise ValueError(f"first_images: need n >= 1 and training images, got n = {n}")
        if not self.streamed:
            return pipeline.to_float(self.train[0][:n], self.info)
        batches = source_pipeline.eval_batches_from_source(self.train[:n], n, info=self.info)
        return np.asarray(next(iter(batches))["image"])[:n]

    def _eval_batches(self, split: Any) -> grain.DatasetIterator:
        c = self.config
        if self.streamed:
            return source_pipeline.eval_batches_from_source(
                split, c.eval_batch_size, info=self.info
            )
        return pipeline.eval_batches(*split, c.eval_batch_size, info=self.info)


def _first(source: Any, limit: int) -> grain.MapDataset:
    """The first ``limit`` examples of a random-access source (all of them for 0)."""
    ds = grain.MapDataset.source(source)
    return ds[: min(limit, len(ds))] if limit else ds
