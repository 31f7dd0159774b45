"""The data of one training run: its train and test splits and their grain iterators."""

from __future__ import annotations

from typing import Any

import grain
import ml_collections

from nr_jax.data import cache, imagenet, pipeline, registry, source_pipeline


class RunData:
    """The run's training and test batches: in-memory arrays, or (ImageNet) decoded on the fly.

    Attributes:
        config: The run's config (``dataset``, ``data_dir``, ``train_limit``, ``test_limit``,
            ``batch_size``, ``eval_batch_size``, ``seed``, ``augment``).
        info: The dataset's ``DatasetInfo``.
        num_train: Training examples (after ``train_limit``).
        steps_per_epoch: Full training batches per epoch.
    """

    def __init__(self, config: ml_collections.ConfigDict, info: registry.DatasetInfo) -> None:
        self.config, self.info = config, info
        data_dir = config.data_dir or None
        self.streamed = config.dataset == registry.IMAGENET_NAME
        if self.streamed:
            self.train: Any = _first(
                imagenet.load_imagenet_source("train", data_dir=data_dir), config.train_limit
            )
            self.test: Any = _first(
                imagenet.load_imagenet_source("validation", data_dir=data_dir), config.test_limit
            )
        else:
            load = {"data_dir": data_dir, "name": config.dataset}
            self.train = cache.load_arrays(split="train", limit=config.train_limit or None, **load)
            self.test = cache.load_arrays(split="test", limit=config.test_limit or None, **load)
        self.num_train = len(self.train) if self.streamed else len(self.train[1])
        self.steps_per_epoch = pipeline.steps_per_epoch(self.num_train, config.batch_size)

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
        c = self.config
        if self.streamed:
            return source_pipeline.eval_batches_from_source(
                self.test, c.eval_batch_size, info=self.info
            )
        return pipeline.eval_batches(*self.test, c.eval_batch_size, info=self.info)


def _first(source: Any, limit: int) -> grain.MapDataset:
    """The first ``limit`` examples of a random-access source (all of them for 0)."""
    ds = grain.MapDataset.source(source)
    return ds[: min(limit, len(ds))] if limit else ds
