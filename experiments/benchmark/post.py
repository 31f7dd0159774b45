"""4. Post-rejuvenation cost: the rejuvenated network's step time per scheme against the dense
network of the same allocated widths; the model families of the step benchmarks."""

from __future__ import annotations

from experiments.benchmark.common import (
    FLAGS,
    force_rejuvenation,
    interleaved,
    make_trainer,
    synthetic_batch,
)
from nr_jax import data as nr_data

# (model, dataset, batch or None for --batch): the CPU-sized families, and VGG-19 at CIFAR size,
# whose widths (64-512) are the paper's
POST_FAMILIES = (
    ("vgg_fmnist", "fashion_mnist", None),
    ("resnet_fmnist", "fashion_mnist", None),
    ("vgg19_cifar", "cifar10", 16),  # batch 32 with --full
)


def paper_scale_reps(batch_size: int | None, reps: int, steps: int) -> tuple[int, int]:
    """Repetitions and steps per repetition: fewer for VGG-19's slow steps (a fixed batch)."""
    return (reps, steps) if batch_size is None else (3, 2)


def paper_scale() -> bool:
    """--paper_scale, which defaults to --full."""
    return FLAGS.paper_scale if FLAGS.paper_scale is not None else FLAGS.full


def post_families() -> list[tuple[str, str, int | None]]:
    """The CPU-sized families; VGG-19 too with --paper_scale (default: with --full)."""
    paper = paper_scale()
    return [
        (m, d, 32 if b and FLAGS.full else b) for m, d, b in POST_FAMILIES if paper or b is None
    ]


def post_rejuvenation_cost(reps: int, steps: int) -> dict:
    """Step time after rejuvenation at U about 0.25, per scheme, against the dense network.

    The four-convolution attention is timed with --full, and for ResNet-50 (--imagenet_post);
    VGG-19 runs the removed and dense schemes only (its steps are slow).
    """
    out = {}
    families = post_families()
    if FLAGS.imagenet_post:
        families = [("resnet50", "imagenet2012", 8)]
    for model, dataset, batch_size in families:
        info = nr_data.DATASET_INFO[dataset]
        batch = synthetic_batch(batch_size or FLAGS.batch, info.image_shape[0], info.image_shape[2])
        schemes = ["removed", "attention", "dense"]
        if FLAGS.full or model == "resnet50":
            schemes.insert(2, "attention4")
        if model == "vgg19_cifar":
            schemes = ["removed", "dense"]
        cands, reports = {}, {}
        for scheme in schemes:
            trainer, state = make_trainer(model, True, scheme, dataset, batch_size)
            # ImageNet's target is U 0.5: a quarter of the channels dead
            dead = 0.25 if model == "resnet50" else 0.5
            state, reports[scheme] = force_rejuvenation(trainer, state, dead)
            cands[scheme] = (trainer.steps.train, state)
        report = reports["removed"]
        n_reps, n_steps = paper_scale_reps(batch_size, reps, steps)
        times = interleaved(cands, batch, n_reps, n_steps)
        c = report.counts_after
        v = {
            "batch": batch_size or FLAGS.batch,
            "utilization": report.utilization,
            "ms_per_step": {k: 1e3 * t for k, t in times.items()},
            "removed_vs_dense": times["removed"] / times["dense"],
            "effective_macs_ratio": c.effective_macs / c.macs,
            "macs_dense": c.macs,
            "macs_removed": c.effective_macs,
        }
        if "attention" in times:
            v["attention_vs_dense"] = times["attention"] / times["dense"]
            v["attention_vs_removed"] = times["attention"] / times["removed"]
        if "attention4" in times:
            v["attention4_vs_attention"] = times["attention4"] / times["attention"]
        out[model] = v
    return out
