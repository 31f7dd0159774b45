"""The sizes of the accelerator check: `GPU` (the real check) and `CPU_SMOKE` (its reduced CPU
mode, run by the tests so that the script cannot rot).

The smoke mode uses one model and batch (vgg_tiny, 4) wherever it can, so that, with its
persistent compilation cache, sections reuse each other's compilations. Budgets are seconds per
section, in priority order; time a section leaves unused goes to the next
ones (`runner.run_sections`). The GPU budgets add up to the default overall deadline (280 s), so
that the whole command, with the wheel installation and jax's start, ends in under 5 minutes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SECTIONS = ("tests", "compiles", "throughput", "post", "eval_short", "export")

# Tests that run on any backend and matter most there: one device (no 4-device mesh), no real
# dataset, no CPU-only kernel path (`conv_weight_grad="auto"` is XLA's convolution off the CPU;
# the shifted-matmul gradient is compared with it explicitly). About 45 small compilations.
GPU_TESTS = (
    "tests/test_train.py::test_one_trace_per_width_configuration",
    "tests/test_train.py::test_bfloat16_compute_keeps_float32_state",
    "tests/test_layers.py::test_model_gradients_equal_in_every_mode",
    "tests/test_layers.py::test_kernel_gradient_bfloat16",
    "tests/test_liveness.py::test_liveness_jit_and_eager_agree_on_random_gammas",
    "tests/test_sparsity.py::test_adds_exactly_lambda_sign_gamma_to_prunable_scales",
    "tests/test_surgery.py::test_survivor_path_reproduces_old_network",
    "tests/test_families.py::test_train_steps_with_one_rejuvenation",
)

Family = tuple[str, str, int]  # (model, dataset, batch)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What each section runs and how long it may take.

    Attributes:
      name: "gpu" or "cpu_smoke".
      budgets: seconds per section (`SECTIONS`).
      max_seconds: upper bounds per section that slack from earlier sections cannot raise.
      tests: pytest node ids of the `tests` section.
      pytest_warnings: the `-W` filter passed to pytest ("" keeps the project's "error"; on the
        GPU machine other library versions may warn, which the check reports instead).
      compile_family: (model, dataset, batch) of the `compiles` section.
      peak_sizes, peak_reps: n of the n x n bfloat16 matmuls of the peak, and repetitions.
      throughput: the (model, dataset, batch) families of the `throughput` section, timed in
        every dtype of `dtypes`, in order (the order is the priority when time runs out).
      dtypes: compute dtypes (`config.compute_dtype`).
      reps, steps: timed repetitions and steps per repetition of the step timings.
      post_family: (model, dataset, batch) of the `post` section.
      post_schemes: schemes timed after the rejuvenation, dense last.
      dead_frac: share of every unit's channels whose γ is set to 0 before the rejuvenation
        (0.5 gives U about 0.25: parameters go with the product of in and out channels).
      eval_model, eval_width, eval_batch, eval_test_batch, eval_epochs, eval_search_epochs,
        eval_milestones, eval_lam: the short evaluation: model, width multiplier, training and
        evaluation batch, E, the fixed number k of search epochs, LR milestones (epochs after
        the search), λ.
      eval_images: (train, test) images used: the first of the subset file (or of synthetic
        images, `--cpu_smoke` without a file).
      export_family: (model, dataset, batch) of the `export` section.
    """

    name: str
    budgets: Mapping[str, float]
    max_seconds: Mapping[str, float]
    tests: tuple[str, ...]
    pytest_warnings: str
    compile_family: Family
    peak_sizes: tuple[int, ...]
    peak_reps: int
    throughput: tuple[Family, ...]
    dtypes: tuple[str, ...]
    reps: int
    steps: int
    post_family: Family
    post_schemes: tuple[str, ...]
    dead_frac: float
    eval_model: str
    eval_width: float
    eval_batch: int
    eval_test_batch: int
    eval_epochs: int
    eval_search_epochs: int
    eval_milestones: tuple[int, ...]
    eval_lam: float
    eval_images: tuple[int, int]
    export_family: Family


GPU = Setting(
    name="gpu",
    budgets={
        "tests": 45,
        "compiles": 20,
        "throughput": 100,
        "post": 45,
        "eval_short": 55,
        "export": 15,
    },
    max_seconds={"eval_short": 120},  # the evaluation issue's "at most 2 minutes"
    tests=GPU_TESTS,
    pytest_warnings="default",
    compile_family=("vgg_fmnist", "fashion_mnist", 64),
    peak_sizes=(8192,),
    peak_reps=10,
    # ResNet-50 first: its bfloat16 rate is the goal (2,500 images/s or more)
    throughput=(("resnet50", "imagenet2012", 256), ("vgg19_cifar", "cifar10", 256)),
    dtypes=("bfloat16", "float32"),
    reps=5,
    steps=5,
    post_family=("vgg19_cifar", "cifar10", 128),
    post_schemes=("removed", "attention", "dense"),
    dead_frac=0.5,
    eval_model="vgg_fmnist",
    eval_width=1.5,  # the evaluation table's width (experiments/configs/eval_table.py)
    eval_batch=64,
    eval_test_batch=500,
    eval_epochs=5,
    eval_search_epochs=3,
    eval_milestones=(3, 4),
    eval_lam=1e-3,  # the table's λ
    eval_images=(10_000, 2_000),
    export_family=("vgg19_cifar", "cifar10", 128),
)

CPU_SMOKE = Setting(
    name="cpu_smoke",
    # seconds per section when run alone on two idle cores: 5-20; the budgets leave room for a
    # loaded machine (a timeout fails tests/test_accelerator_check.py)
    budgets=dict.fromkeys(SECTIONS, 90.0),
    max_seconds={},
    tests=("tests/test_sparsity.py::test_the_hand_built_graph",),
    pytest_warnings="",
    compile_family=("vgg_tiny", "fashion_mnist", 4),
    peak_sizes=(128,),
    peak_reps=2,
    throughput=(("vgg_tiny", "fashion_mnist", 4),),
    dtypes=("float32",),  # bfloat16 compiles slowly on a CPU; the GPU times both
    reps=2,
    steps=1,
    post_family=("vgg_tiny", "fashion_mnist", 4),
    post_schemes=("removed", "dense"),
    dead_frac=0.5,
    eval_model="vgg_tiny",
    eval_width=1.0,
    eval_batch=4,  # the shapes of the other sections: their compilations are reused (cache)
    eval_test_batch=4,
    eval_epochs=1,
    eval_search_epochs=1,
    eval_milestones=(1,),
    eval_lam=5e-2,
    eval_images=(128, 64),
    export_family=("vgg_tiny", "fashion_mnist", 4),
)
