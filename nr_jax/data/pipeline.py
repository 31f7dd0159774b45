"""grain input pipelines over in-memory arrays: shuffled train batches and padded eval batches.

An epoch is a ``grain.MapDataset`` of *batches*: batch ``k`` gathers the ``k``-th window of the
permutation ``np.random.default_rng([seed, epoch]).permutation(N)``; augmentation (random crop
after zero padding, horizontal flip) is a grain ``RandomMap`` over the batch whose generator
grain derives from ``(epoch_seed(seed, epoch), k)``; normalisation is a ``Map``. So an epoch is a
pure function of ``(seed, epoch)``, and the iterator's ``get_state()`` (``{"next_index": k}``)
restored with ``set_state`` resumes it bit-identically at batch ``k``.

Why the permutation is drawn with numpy, not ``MapDataset.shuffle``: grain's shuffle maps every
element through ``index_shuffle`` and its stats, about 17-30 us per example on this project's
2-core CI machine, which capped a Fashion-MNIST epoch at ~21k images/s; one vectorised
permutation plus a gather per batch runs at ~480k images/s (measured with batches of 64 on
20,000 images). Per-example sources (ImageNet, ``imagenet.py``) use grain's shuffle.

In-memory batches are computed on the consuming thread by default (``num_threads=0``): grain
recommends it for data already in memory (no GIL contention; threads measured 0.5-0.7x here),
and JAX's asynchronous dispatch already overlaps the next batch with the running step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import grain
import numpy as np

from nr_jax.data import registry

# the array transforms; `normalize`, `to_float` and `crop_and_flip` re-exported (public here before)
from nr_jax.data.batch_transforms import (  # noqa: F401
    Batch,
    CropAndFlip,
    GatherBatch,
    PaddedBatch,
    ToFloat,
    augment_padding,
    crop_and_flip,
    normalize,
    to_float,
)


def check_int(value: Any, what: str, minimum: int | None = None) -> int:
    """``value`` as an int; TypeError for non-ints (bools included), ValueError below minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}; got {value}")
    return int(value)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 32-bit grain seed from ``(seed, epoch, stream)``, via ``np.random.SeedSequence``."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def read_options(num_threads: int, buffer: int) -> grain.ReadOptions:
    """grain ``ReadOptions``: ``num_threads`` workers and ``buffer`` elements ahead (0: inline)."""
    num_threads = check_int(num_threads, "num_threads", minimum=0)
    return grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=buffer if num_threads else 0
    )


def check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks uint8 ``(N, H, W, C)`` images and integer ``(N,)`` labels."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"images must be uint8 (N, H, W, C); got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {images.shape[0]} (from images); "
            f"got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}")
    return images, labels


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches per epoch (the ragged remainder is dropped).

    Args:
        num_examples: Examples in the split.
        batch_size: Examples per batch, ``1 <= batch_size <= num_examples``.

    Returns:
        ``num_examples // batch_size``.

    Raises:
        ValueError: ``batch_size <= 0`` or ``batch_size > num_examples``.
    """
    num_examples = check_int(num_examples, "num_examples", minimum=0)
    batch_size = check_int(batch_size, "batch_size")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    if batch_size > num_examples:
        raise ValueError(
            f"batch_size ({batch_size}) must not exceed num_examples ({num_examples}): "
            "an epoch would contain no full batch"
        )
    return num_examples // batch_size


def _check_train(
    images: np.ndarray, labels: np.ndarray, batch_size: int, info: registry.DatasetInfo | None
) -> tuple[np.ndarray, np.ndarray, int]:
    images, labels = check_arrays(images, labels)
    num_batches = steps_per_epoch(images.shape[0], batch_size)
    if info is not None and tuple(info.image_shape) != images.shape[1:]:
        raise ValueError(
            f"images have shape {images.shape[1:]} per example but info.image_shape is "
            f"{info.image_shape}"
        )
    return images, labels, num_batches


def train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: bool = False,
    info: registry.DatasetInfo | None = None,
    num_threads: int = 0,
) -> grain.IterDataset:
    """One shuffled epoch of fixed-shape training batches, as a grain ``IterDataset``.

    Args and batches as ``train_batches`` (which iterates it).
    """
    images, labels, num_batches = _check_train(images, labels, batch_size, info)
    seed = check_int(seed, "seed", minimum=0)
    epoch = check_int(epoch, "epoch", minimum=0)
    order = np.random.default_rng([seed, epoch]).permutation(images.shape[0])
    ds = grain.MapDataset.range(num_batches).map(GatherBatch(images, labels, order, batch_size))
    if augment:
        pad = augment_padding(*images.shape[1:3])
        ds = ds.random_map(CropAndFlip(pad), seed=epoch_seed(seed, epoch))
    ds = ds.map(ToFloat(info))
    return ds.to_iter_dataset(read_options(num_threads, buffer=max(2, num_threads)))


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: bool = False,
    info: registry.DatasetInfo | None = None,
    start_batch: int = 0,
    num_threads: int = 0,
) -> grain.DatasetIterator:
    """Iterates one shuffled epoch of fixed-shape training batches (grain).

    The order is ``np.random.default_rng([seed, epoch]).permutation(N)`` and batch ``k`` is
    augmented with grain's generator for ``(epoch_seed(seed, epoch), k)``, so an epoch is a
    pure function of ``(seed, epoch)``. ``get_state()`` / ``set_state(state)`` of the returned
    iterator save and restore the position (a JSON-serialisable dict).

    Args:
        images: uint8 ``(N, H, W, C)``.
        labels: integer ``(N,)``.
        batch_size: ``B``; the ragged remainder ``N % B`` is dropped.
        seed: Non-negative run seed.
        epoch: Non-negative epoch index.
        augment: Random crop after zero padding (2 px; 4 px for images >= 32x32) and
            random horizontal flip, vectorised over the batch.
        info: If given, images are normalised with ``normalize(.., info)``; otherwise
            they are scaled to ``[0, 1]``.
        start_batch: Index of the first batch to yield, in ``[0, steps_per_epoch]``.
        num_threads: grain worker threads computing batches ahead (0: on the consumer).

    Returns:
        A grain iterator of ``{"image": float32 (B, H, W, C), "label": int32 (B,)}``.

    Raises:
        TypeError: Bad dtypes or non-int ``seed``/``epoch``/``start_batch``.
        ValueError: Mismatched lengths, bad ``batch_size`` or ``start_batch`` range.
    """
    ds = train_dataset(
        images, labels, batch_size, seed=seed, epoch=epoch, augment=augment, info=info,
        num_threads=num_threads,
    )  # fmt: skip
    return start_at(ds, start_batch, steps_per_epoch(len(labels), batch_size))


def start_at(ds: grain.IterDataset, start_batch: int, num_batches: int) -> grain.DatasetIterator:
    """``iter(ds)`` positioned at batch ``start_batch`` (in ``[0, num_batches]``)."""
    start_batch = check_int(start_batch, "start_batch", minimum=0)
    if start_batch > num_batches:
        raise ValueError(
            f"start_batch must be in [0, {num_batches}] (steps per epoch); got {start_batch}"
        )
    iterator = iter(ds)
    if start_batch:
        grain.experimental.set_next_index(iterator, start_batch)
    return iterator


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    info: registry.DatasetInfo | None = None,
    num_threads: int = 0,
) -> grain.DatasetIterator:
    """Iterates every example once, in order, in fixed-shape batches with a mask (grain).

    Args:
        images: uint8 ``(N, H, W, C)``.
        labels: integer ``(N,)``.
        batch_size: ``B`` (> 0; may exceed ``N``).
        info: If given, images are normalised with ``normalize``; otherwise scaled
            to ``[0, 1]``.
        num_threads: grain worker threads computing batches ahead (0: on the consumer).

    Returns:
        A grain iterator of ``{"image": float32 (B, H, W, C), "label": int32 (B,),
        "mask": float32 (B,)}``. The last batch is zero-padded to ``B`` examples; ``mask``
        is 1 for real examples and 0 for padding, so ``sum(mask)`` over all batches is ``N``.

    Raises:
        TypeError: Bad dtypes or non-int ``batch_size``.
        ValueError: Mismatched lengths, empty input or ``batch_size <= 0``.
    """
    images, labels = check_arrays(images, labels)
    batch_size = check_int(batch_size, "batch_size")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0; got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("eval_batches needs at least one example; got N = 0")
    num_batches = math.ceil(images.shape[0] / batch_size)
    ds = grain.MapDataset.range(num_batches).map(PaddedBatch(images, labels, batch_size))
    ds = ds.map(ToFloat(info))
    return iter(ds.to_iter_dataset(read_options(num_threads, buffer=max(2, num_threads))))


class _Counted:
    """A plain iterator with the ``get_state`` grain's thread prefetch records per element."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterator, self._consumed = iter(iterable), 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        item = next(self._iterator)
        self._consumed += 1
        return item

    def get_state(self) -> dict[str, int]:
        return {"consumed": self._consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        raise TypeError(f"a plain iterator cannot be repositioned (asked for {state!r})")


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Produces items of ``iterator`` ahead of the consumer on grain's prefetch thread.

    The pipelines of this package already compute ahead when given worker threads; this
    adds one background thread (``grain.experimental.ThreadPrefetchDatasetIterator``) in
    front of any iterator, keeping a grain iterator's ``get_state`` / ``set_state``.

    Args:
        iterator: Any iterable, e.g. ``train_batches(...)``.
        size: Maximum number of items buffered ahead (>= 1).

    Returns:
        An iterator over the same items in the same order. An exception raised by
        ``iterator`` is re-raised from ``next()`` at the point where it occurred.
        ``close()`` stops the thread.

    Raises:
        TypeError / ValueError: ``size`` is not an int >= 1.
    """
    size = check_int(size, "size", minimum=1)
    if not hasattr(iterator, "get_state"):
        iterator = _Counted(iterator)
    return grain.experimental.ThreadPrefetchDatasetIterator(iterator, size)
