"""8. Image pipelines on fabricated CIFAR-10 and ImageNet files in their real formats, with and
without `prefetch`, against the train step's consumption."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from experiments.benchmark.common import FLAGS, make_trainer, time_steps
from nr_jax import data as nr_data

_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_IMAGENET_SIZES = (
    (375, 500),
    (500, 375),
    (333, 500),
    (500, 333),
    (400, 500),
    (375, 375),
    (281, 500),
    (500, 400),
)
IMAGENET_BATCH = 32
H100_RESNET50_IMAGES_PER_S = 2500  # what one H100 consumes training ResNet-50 (not measured here)


def _fabricate_cifar10(source: Path, per_file: int) -> None:
    """Writes `cifar-10-python.tar.gz` as its authors distribute it (uint8 CHW pickle rows)."""
    rng = np.random.default_rng(0)
    folder = source / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in _CIFAR_FILES:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, per_file)],
            b"filenames": [f"img_{i}.png".encode() for i in range(per_file)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with tarfile.open(source / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    shutil.rmtree(folder)


def _natural_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth random field plus noise at JPEG quality 90: about 100 KB at 500x375, near the
    mean ImageNet training file (about 110 KB), so decoding costs about what it costs there."""
    low = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(base + rng.normal(0.0, 24.0, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _FabricatedImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for tfds' `imagenet2012` (same name, version and features), prepared without
    TensorFlow; its records cycle through a pool of distinct JPEGs of ImageNet-like sizes."""

    name = nr_data.IMAGENET_NAME
    VERSION = tfds.core.Version("5.1.0")
    code_path = epath.Path(__file__)
    NUM: ClassVar[dict[str, int]] = {"train": 256, "validation": 64}
    POOL = 32

    def _info(self) -> tfds.core.DatasetInfo:
        return nr_data.imagenet2012_info(self)

    def _split_generators(self, dl_manager: object) -> dict:
        return {split: self._generate_examples(split) for split in self.NUM}

    def _generate_examples(self, split: str) -> Iterable[tuple[int, dict]]:
        rng = np.random.default_rng(len(split))
        sizes = itertools.cycle(_IMAGENET_SIZES)
        pool = [_natural_jpeg(rng, *next(sizes)) for _ in range(self.POOL)]
        for i in range(self.NUM[split]):
            yield i, {"image": pool[i % self.POOL], "label": i % 1000, "file_name": f"{i}.JPEG"}


def _count(batch: dict) -> int:
    return int(np.sum(batch["mask"])) if "mask" in batch else len(batch["label"])


def _pipeline_rates(configs: dict[str, Callable[[int], Iterable[dict]]], reps: int) -> dict:
    """Median images/s of each iterator factory (called with the epoch), repetitions
    interleaved after one untimed pass of each."""
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(reps + 1):
        for k, make in configs.items():
            t = time.perf_counter()
            n = sum(_count(b) for b in make(rep))
            if rep:
                rates[k].append(n / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def _fed_rates(
    trainer: Any,
    state: Any,
    make: Callable[[int], Iterable[dict]],
    steps: int,
    reps: int,
) -> dict:
    """Images/s of the train step alone (one batch kept on the device) and fed by `make` with
    and without `prefetch`; repetitions interleaved."""
    holder = {"state": state}
    fixed = jax.device_put(next(iter(make(0))))

    def run(batches: Iterable[dict]) -> float:
        t = time.perf_counter()
        n = 0
        for batch in itertools.islice(batches, steps):
            holder["state"], metrics = trainer.steps.train(holder["state"], batch)
            n += _count(batch)
        jax.block_until_ready(metrics)
        return n / (time.perf_counter() - t)

    def prefetched(epoch: int) -> float:
        batches = nr_data.prefetch(make(epoch))
        try:
            return run(batches)
        finally:
            batches.close()

    modes = {
        "step_alone": lambda epoch: run(itertools.repeat(fixed)),
        "fed_no_prefetch": lambda epoch: run(make(epoch)),
        "fed_prefetch": prefetched,
    }
    run(itertools.repeat(fixed, 2))  # compile + warm up
    rates: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(reps):
        for k, mode in modes.items():
            rates[k].append(mode(rep + 1))
    return {k: statistics.median(v) for k, v in rates.items()}


def image_pipelines(reps: int, steps: int) -> dict:
    out: dict[str, Any] = {"host_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="nr_jax_bench_") as tmp:
        root = Path(tmp)
        # CIFAR-10: python-pickle archive -> local tfds builder (array_record) -> .npz cache.
        per_file = 2000 if FLAGS.full else 1000
        _fabricate_cifar10(root / "cifar_src", per_file)
        t = time.perf_counter()
        images, labels = nr_data.load_arrays(
            "cifar10", "train", data_dir=root / "tfds", source_dir=root / "cifar_src"
        )
        first_load = time.perf_counter() - t
        t = time.perf_counter()
        images, labels = nr_data.load_arrays("cifar10", "train", data_dir=root / "tfds")
        cached_load = time.perf_counter() - t
        info = nr_data.DATASET_INFO["cifar10"]

        def cifar(epoch: int, batch: int = FLAGS.batch) -> Iterable[dict]:
            return nr_data.train_batches(
                images, labels, batch, seed=0, epoch=epoch, augment=True, info=info
            )

        rates = _pipeline_rates(
            {"no_prefetch": cifar, "prefetch": lambda e: nr_data.prefetch(cifar(e))}, reps
        )
        trainer, state = make_trainer("resnet_tiny_cifar", dataset="cifar10")
        fed = _fed_rates(trainer, state, cifar, steps=steps, reps=max(3, reps // 2))
        out["cifar10"] = {
            "examples": len(labels),
            "first_load_s": first_load,
            "cached_load_s": cached_load,
            "images_per_s": rates,
            "step_model": f"resnet_tiny_cifar, NR on, batch {FLAGS.batch}",
            "step_images_per_s": fed,
            "vs_step": {k: v / fed["step_alone"] for k, v in rates.items()},
        }

        # ImageNet: tfds `imagenet2012` in array_record with the JPEGs left encoded.
        num_train = 512 if FLAGS.full else 256
        _FabricatedImagenet.NUM = {"train": num_train, "validation": 128}
        data_dir = root / "imagenet"
        t = time.perf_counter()
        _FabricatedImagenet(
            data_dir=os.fspath(data_dir), file_format="array_record"
        ).download_and_prepare()
        prepare_s = time.perf_counter() - t
        src = nr_data.load_imagenet_source("train", data_dir=data_dir)
        val = nr_data.load_imagenet_source("validation", data_dir=data_dir)
        info = nr_data.DATASET_INFO[nr_data.IMAGENET_NAME]
        jpeg_kb = statistics.mean(len(src[i]["image"]) for i in range(_FabricatedImagenet.POOL))

        def imagenet(
            workers: int | None = None, prefetched: bool = False, evaluation: bool = False
        ) -> Callable[[int], Iterable[dict]]:
            def make(epoch: int) -> Iterable[dict]:
                if not evaluation:
                    it = nr_data.train_batches_from_source(
                        src, IMAGENET_BATCH, seed=0, epoch=epoch, info=info, num_workers=workers
                    )
                else:
                    it = nr_data.eval_batches_from_source(
                        val, IMAGENET_BATCH, info=info, num_workers=workers
                    )
                return nr_data.prefetch(it) if prefetched else it

            return make

        workers = max(1, os.cpu_count() or 1)  # the iterators' default num_workers
        rates = _pipeline_rates(
            {
                f"train_{workers}_threads": imagenet(),
                f"train_{workers}_threads_prefetch": imagenet(prefetched=True),
                "train_1_thread": imagenet(workers=1),
                f"eval_{workers}_threads": imagenet(evaluation=True),
                f"eval_{workers}_threads_prefetch": imagenet(prefetched=True, evaluation=True),
            },
            max(2, reps // 2),
        )
        per_core = rates["train_1_thread"]
        imagenet_out: dict[str, Any] = {
            "examples": {"train": num_train, "validation": 128},
            "prepare_s": prepare_s,
            "mean_jpeg_kb": jpeg_kb / 1e3,
            "images_per_s": rates,
            "train_images_per_s_per_core": per_core,
            "h100_resnet50_images_per_s": H100_RESNET50_IMAGES_PER_S,
            "cores_for_h100_resnet50": H100_RESNET50_IMAGES_PER_S / per_core,
        }
        if FLAGS.imagenet_step or (FLAGS.imagenet_step is None and FLAGS.full):
            batch = next(
                iter(nr_data.train_batches_from_source(src, 8, seed=0, epoch=0, info=info))
            )
            t = time.perf_counter()
            trainer, state = make_trainer("resnet18", dataset=nr_data.IMAGENET_NAME, batch=8)
            state, _ = time_steps(trainer.steps.train, state, batch, 1)  # compile + first step
            setup_s = time.perf_counter() - t
            dts = []
            for _ in range(3 if FLAGS.full else 1):
                state, dt = time_steps(trainer.steps.train, state, batch, 1)
                dts.append(dt)
            step_rate = 8 / statistics.median(dts)
            imagenet_out |= {
                "step_model": "resnet18, NR on, batch 8, 224x224",
                "step_setup_s": setup_s,
                "step_images_per_s": step_rate,
                "vs_step": {k: v / step_rate for k, v in rates.items()},
            }
        out["imagenet"] = imagenet_out
    return out
