"""6. Input pipeline throughput (Fashion-MNIST in-memory arrays) against the step's consumption."""

from __future__ import annotations

import time

import numpy as np

from experiments.benchmark.common import FLAGS
from nr_jax import data as nr_data


def input_pipeline(step_images_per_s: float | None) -> dict:
    images = np.random.default_rng(0).integers(0, 255, (20_000, 28, 28, 1), dtype=np.uint8)
    labels = np.zeros(20_000, np.int32)
    info = nr_data.DATASET_INFO["fashion_mnist"]
    out = {}
    for augment in (False, True):
        t = time.perf_counter()
        n = 0
        for b in nr_data.prefetch(
            nr_data.train_batches(
                images, labels, FLAGS.batch, seed=0, epoch=0, augment=augment, info=info
            )
        ):
            n += len(b["label"])
        rate = n / (time.perf_counter() - t)
        out[f"augment={augment}"] = {
            "images_per_s": rate,
            "vs_step": rate / step_images_per_s if step_images_per_s else None,
        }
    return out
