"""Array transforms of the in-memory pipelines: gather, crop + flip, pad, normalise.

The per-batch steps of `nr_jax.data.pipeline`, as grain transforms over numpy batches: batch
index ``k`` -> the uint8 images and int32 labels of window ``k`` of the epoch's order
(`GatherBatch`) or of the data in order, zero-padded with a mask (`PaddedBatch`); the CIFAR-style
random crop after zero padding and horizontal flip, vectorised over the batch (`CropAndFlip`,
`crop_and_flip`); uint8 pixels to normalised float32 (`ToFloat`, `normalize`). `normalize` also
serves the per-example ImageNet transforms (`nr_jax.data.imagenet`).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from nr_jax.data import registry

Batch = dict[str, np.ndarray]


def normalize(images_uint8: np.ndarray, info: registry.DatasetInfo) -> np.ndarray:
    """Scales uint8 pixels to ``(x / 255 - mean) / std`` per channel.

    Args:
        images_uint8: uint8 array ``(..., C)``, e.g. ``(B, H, W, C)``.
        info: Supplies per-channel ``mean`` and ``std`` (length ``C``).

    Returns:
        float32 array with the same shape.

    Raises:
        TypeError: ``images_uint8`` is not a uint8 array.
        ValueError: The channel count does not match ``info``.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 images; got dtype {images_uint8.dtype}")
    channels = len(info.mean)
    if images_uint8.ndim == 0 or images_uint8.shape[-1] != channels:
        raise ValueError(
            f"expected images (..., {channels}) to match info.mean/std; "
            f"got shape {images_uint8.shape}"
        )
    std = np.asarray(info.std, dtype=np.float32)
    out = images_uint8.astype(np.float32)
    out *= np.float32(1.0 / 255.0) / std
    out -= np.asarray(info.mean, dtype=np.float32) / std
    return out


def to_float(images: np.ndarray, info: registry.DatasetInfo | None) -> np.ndarray:
    """``normalize(images, info)``, or ``images / 255`` without ``info``."""
    if info is not None:
        return normalize(images, info)
    out = images.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def augment_padding(height: int, width: int) -> int:
    """Zero padding of the random crop: 4 px for images >= 32x32 (CIFAR), else 2 px."""
    return 4 if min(height, width) >= 32 else 2


def crop_and_flip(
    batch: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
    """Random crop after zero padding, then optional horizontal flip, in one gather.

    Args:
        batch: uint8 ``(B, H, W, C)``.
        offsets: int ``(B, 2)`` top/left crop offsets in ``[0, 2 * pad]``.
        flips: bool ``(B,)``; True flips that image left-right.
        pad: Zero padding on each side.

    Returns:
        uint8 ``(B, H, W, C)``.
    """
    num, height, width, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(height)  # (B, H)
    cols = offsets[:, 1, None] + np.arange(width)  # (B, W)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(num)[:, None, None], rows[:, :, None], cols[:, None, :]]


@dataclasses.dataclass(frozen=True, eq=False)
class GatherBatch(grain.transforms.Map):
    """Batch index ``k`` -> the uint8 images and int32 labels of window ``k`` of ``order``."""

    images: np.ndarray
    labels: np.ndarray
    order: np.ndarray
    batch_size: int

    def map(self, element: int) -> Batch:
        chosen = self.order[element * self.batch_size : (element + 1) * self.batch_size]
        return {"image": self.images[chosen], "label": self.labels[chosen].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class CropAndFlip(grain.transforms.RandomMap):
    """CIFAR-style augmentation of a uint8 batch: random crop after ``pad`` px, random flip."""

    pad: int

    def random_map(self, element: Batch, rng: np.random.Generator) -> Batch:
        num = element["image"].shape[0]
        offsets = rng.integers(0, 2 * self.pad + 1, size=(num, 2))
        flips = rng.random(num) < 0.5
        return {**element, "image": crop_and_flip(element["image"], offsets, flips, self.pad)}


@dataclasses.dataclass(frozen=True)
class ToFloat(grain.transforms.Map):
    """uint8 batch images -> float32 (``to_float``: normalised with ``info``, else / 255)."""

    info: registry.DatasetInfo | None

    def map(self, element: Batch) -> Batch:
        return {**element, "image": to_float(element["image"], self.info)}


@dataclasses.dataclass(frozen=True, eq=False)
class PaddedBatch(grain.transforms.Map):
    """Batch index ``k`` -> examples ``[k B, (k + 1) B)`` in order, zero-padded, with a mask."""

    images: np.ndarray
    labels: np.ndarray
    batch_size: int

    def map(self, element: int) -> Batch:
        window = slice(element * self.batch_size, (element + 1) * self.batch_size)
        images, labels = self.images[window], self.labels[window].astype(np.int32)
        real, missing = images.shape[0], self.batch_size - images.shape[0]
        mask = np.zeros((self.batch_size,), np.float32)
        mask[:real] = 1.0
        if missing:
            images = np.concatenate([images, np.zeros((missing, *images.shape[1:]), np.uint8)])
            labels = np.concatenate([labels, np.zeros((missing,), np.int32)])
        return {"image": images, "label": labels, "mask": mask}
