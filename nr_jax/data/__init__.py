"""Host-side datasets without TensorFlow: tfds sources, a ``.npz`` cache and grain pipelines.

Modules, one idea each:

* ``paths``: the tfds data dir and raw-source dirs (the only environment reads of nr_jax).
* ``formats``: raw files: gzip IDX (Fashion-MNIST), safe CIFAR pickles, PNG encoding.
* ``prepared``: official tfds datasets prepared in array_record (a tfrecord-only one cannot be
  read without TensorFlow; the error says how to convert it).
* ``builders``: the TensorFlow-free local tfds builders (raw files -> array_record).
* ``registry``: ``DATASET_INFO``, the dataset sources, ``prepare_dataset``.
* ``cache``: ``load_arrays``: a whole split decoded once into a ``.npz`` cache.
* ``pipeline``: grain pipelines over arrays (shuffle from ``(seed, epoch)``, padded eval batches)
  and ``prefetch``; ``batch_transforms``: their per-batch steps (gather, CIFAR crop + flip, padding,
  normalisation).
* ``imagenet`` / ``source_pipeline``: ImageNet sources, torchvision-equivalent transforms and
  their grain pipelines (multi-threaded decoding).
* ``run``: ``RunData``, a run's train iterator (resumable from its saved state) and test batches.

Every pipeline returns a grain ``DatasetIterator`` of dicts of numpy arrays whose
``get_state()`` is JSON-serialisable; ``set_state`` resumes an epoch bit-identically.
"""

from nr_jax.data.batch_transforms import normalize
from nr_jax.data.builders import Cifar10Local, Cifar100Local, FashionMnistLocal, LocalBuilder
from nr_jax.data.cache import load_arrays
from nr_jax.data.formats import CIFAR10_CLASS_NAMES, FASHION_MNIST_CLASS_NAMES
from nr_jax.data.imagenet import imagenet2012_info, load_image_source, load_imagenet_source
from nr_jax.data.paths import (
    CIFAR_DIR_ENV,
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    DatasetNotFoundError,
    resolve_data_dir,
)
from nr_jax.data.pipeline import (
    eval_batches,
    prefetch,
    steps_per_epoch,
    train_batches,
    train_dataset,
)
from nr_jax.data.registry import (
    DATASET_INFO,
    IMAGENET_NAME,
    DatasetInfo,
    dataset_info,
    known_datasets,
    prepare_dataset,
)
from nr_jax.data.run import RunData
from nr_jax.data.source_pipeline import eval_batches_from_source, train_batches_from_source

__all__ = [
    "CIFAR10_CLASS_NAMES",
    "CIFAR_DIR_ENV",
    "DATASET_INFO",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DIR_ENV",
    "IMAGENET_NAME",
    "Cifar100Local",
    "Cifar10Local",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FashionMnistLocal",
    "LocalBuilder",
    "RunData",
    "dataset_info",
    "eval_batches",
    "eval_batches_from_source",
    "imagenet2012_info",
    "known_datasets",
    "load_arrays",
    "load_image_source",
    "load_imagenet_source",
    "normalize",
    "prefetch",
    "prepare_dataset",
    "resolve_data_dir",
    "steps_per_epoch",
    "train_batches",
    "train_batches_from_source",
    "train_dataset",
]
