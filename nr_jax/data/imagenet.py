"""ImageNet-style sources: tfds datasets decoded per example, on grain's worker threads.

``load_imagenet_source`` returns the random-access ``as_data_source()`` of tfds
``imagenet2012`` prepared in array_record (images left JPEG-encoded). The pipelines are grain
datasets over it: ``shuffle`` seeded from ``(seed, epoch)``, a per-example transform
(torchvision's ``RandomResizedCrop(224)`` + flip for training, ``Resize(256)`` +
``CenterCrop(224)`` for evaluation, then ``normalize``), decoded on ``num_workers`` grain
threads (Pillow and numpy release the GIL), batched, and one batch-ahead prefetch thread, so
that batching also overlaps the train step. The example order and each example's augmentation
depend only on ``(seed, epoch)``, never on the number of workers.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from nr_jax.data import batch_transforms, paths, prepared, registry

_IMAGENET_DOWNLOAD_URL = "https://image-net.org/download-images"
_BILINEAR = Image.Resampling.BILINEAR


def _not_found_message(found: prepared.Prepared) -> str:
    if found.unreadable:
        return found.tfrecord_message()
    message = (
        f"tfds dataset {found.name!r} is not prepared in {prepared.ARRAY_RECORD} format under "
        f"{found.dataset_dir} (looked for <version>/dataset_info.json there; the tfds "
        f"data dir comes from data_dir= or ${paths.DATA_DIR_ENV}, default "
        f"{paths.DEFAULT_DATA_DIR}). "
    )
    if found.name != registry.IMAGENET_NAME:
        return message + f"Prepare it with `{found.build_command()}` where TensorFlow is installed."
    return message + (
        "ImageNet needs a manual download: get ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from {_IMAGENET_DOWNLOAD_URL} (registration required), "
        f"put them in {found.root / 'downloads' / 'manual'}, then run "
        f"`{found.build_command()}` where TensorFlow is installed (the tfds "
        "command-line tool imports it; nr_jax only reads the result)."
    )


def load_image_source(
    name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None
) -> Sequence[dict[str, Any]]:
    """Random-access source over a tfds image dataset prepared in array_record.

    Reads ``<data_dir>/<name>/<highest version>`` with ``tfds.builder_from_directory``
    (without importing its builder code) and returns ``as_data_source(split)`` with the
    ``image`` feature left encoded (``tfds.decode.SkipDecoding``), so that the pipelines
    decode and resize each image once, on their worker threads.

    Args:
        name: tfds dataset name, e.g. ``"imagenet2012"``; any dataset with an ``image``
            and an integer ``label`` feature works.
        split: tfds split, e.g. ``"train"``, ``"validation"`` or ``"train[:1%]"``.
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or ``~/tensorflow_datasets``.

    Returns:
        A sequence (``len``, ``[i]``, ``__getitems__``) of dicts whose ``image`` is the
        encoded bytes (JPEG for ImageNet) and ``label`` an int.

    Raises:
        DatasetNotFoundError: Not prepared there, or prepared only as tfrecord (which
            cannot be read without TensorFlow); the message says how to fix it.
    """
    found = prepared.find_prepared(paths.resolve_data_dir(data_dir), name)
    if found.readable is None:
        raise paths.DatasetNotFoundError(_not_found_message(found))
    return prepared.official_builder(found).as_data_source(
        split=split,
        decoders={"image": tfds.decode.SkipDecoding()},
        file_format=prepared.ARRAY_RECORD,
    )


def imagenet2012_info(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetInfo:
    """The ``DatasetInfo`` of tfds' ``imagenet2012`` (image, label, file_name), for local builders.

    A builder named ``imagenet2012`` (version 5.1.0) that returns this from ``_info`` and is
    prepared in array_record reads exactly like the official dataset through
    ``load_imagenet_source``: a subset of one's own, or the fabricated files of the tests.
    """
    return tfds.core.DatasetInfo(
        builder=builder,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text(),
            }
        ),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )


def load_imagenet_source(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    name: str = registry.IMAGENET_NAME,
) -> Sequence[dict[str, Any]]:
    """Random-access source over tfds ``imagenet2012`` prepared in array_record.

    See ``load_image_source``. The real dataset must be prepared (from the manually
    downloaded ILSVRC2012 tars) with ``tfds build imagenet2012 --file_format=array_record``.

    Args:
        split: ``"train"`` or ``"validation"`` (or a tfds slice of them).
        data_dir: tfds data dir; defaults to ``$NR_JAX_DATA_DIR`` or ``~/tensorflow_datasets``.
        name: tfds dataset name (for copies prepared under another name).

    Returns:
        Sequence of ``{"image": JPEG bytes, "label": int, "file_name": bytes}``.

    Raises:
        DatasetNotFoundError: Not prepared in array_record under ``data_dir``.
    """
    return load_image_source(name, split, data_dir=data_dir)


def open_rgb(value: Any) -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...) or a uint8 ``(H, W[, C])`` array -> RGB PIL image."""
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        image = Image.fromarray(
            value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value
        )
    else:
        raise TypeError(
            "expected an encoded image (bytes) or a uint8 (H, W[, C]) array; got "
            f"{type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', '')}"
        )
    # Grey-scale, CMYK, palette and RGBA images all become RGB.
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as ``torchvision.transforms.RandomResizedCrop.get_params``.

    Ten tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); then the
    central crop with the aspect ratio clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_transform(value: Any, size: int, resize_size: int) -> np.ndarray:
    """Resize(resize_size) (shorter side, bilinear) + CenterCrop(size), as torchvision."""
    image = open_rgb(value)
    width, height = image.size
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    image = image.resize((new_w, new_h), _BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _example(image: np.ndarray, label: Any, info: registry.DatasetInfo) -> dict[str, Any]:
    if image.shape != tuple(info.image_shape) or image.dtype != np.uint8:
        raise ValueError(
            f"transform returned {image.dtype} {image.shape}; expected uint8 {info.image_shape}"
        )
    return {"image": batch_transforms.normalize(image, info), "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """RandomResizedCrop(S, scale, ratio) (bilinear) + RandomHorizontalFlip() + normalize."""

    info: registry.DatasetInfo
    scale: tuple[float, float]
    ratio: tuple[float, float]

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = open_rgb(element["image"])
        size = self.info.image_shape[0]
        top, left, h, w = random_resized_crop_box(
            rng, image.height, image.width, self.scale, self.ratio
        )
        image = image.crop((left, top, left + w, top + h)).resize((size, size), _BILINEAR)
        out = np.asarray(image)
        return _example(out[:, ::-1] if rng.random() < 0.5 else out, element["label"], self.info)


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Resize(resize_size) + CenterCrop(S) + normalize; with a mask entry of 1."""

    info: registry.DatasetInfo
    resize_size: int
    with_mask: bool = False

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = eval_transform(element["image"], self.info.image_shape[0], self.resize_size)
        example = _example(image, element["label"], self.info)
        return {**example, "mask": np.float32(1.0)} if self.with_mask else example
