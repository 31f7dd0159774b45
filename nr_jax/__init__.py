"""nr_jax: Neural Rejuvenation (Qiao et al., CVPR 2019) in JAX/Flax.

The public API: build a model (`nr_jax.models.get`), derive its channel graph
(`channel_graph`), watch it (`liveness`, `utilization`, the `l1_bn_scales` optax transform) and
rejuvenate it (`rejuvenate`), training the mix of old and new neurons with `nr_loss` / `predict`.
`nr_jax.train.train_and_evaluate(config, workdir)` runs the whole method.
"""

from nr_jax import criteria, models
from nr_jax.allocation import (
    ALLOCATIONS,
    Allocation,
    allocated_resource,
    integer_allocation,
    rounded_allocation,
    sqrt_allocation,
)
from nr_jax.compact import export, export_inference
from nr_jax.graph import ChannelGraph, Unit, channel_graph
from nr_jax.heads import head_logits, nr_loss, predict
from nr_jax.layers import (
    MASKS,
    NRClassifier,
    NRConv,
    NRDense,
    UnitWidth,
    WidthSpec,
    batch_chunking,
    classifier_unit,
    conv_unit,
    dense_unit,
    set_conv_weight_grad,
)
from nr_jax.live import Counts, Liveness, Utilization, count, liveness, utilization
from nr_jax.merging import Merged, merge
from nr_jax.planning import Plan, UnitPlan, plan
from nr_jax.slimming import prune
from nr_jax.sparsity import (
    L1State,
    adapt_lambda,
    get_lambda,
    group_lasso,
    l1_bn_scales,
    set_lambda,
)
from nr_jax.surgery import Rejuvenation, RejuvenationReport, apply_plan, rejuvenate

__version__ = "0.1.0"

# Submodules loaded on first attribute access, so `import nr_jax` stays light: after
# `import nr_jax`, `nr_jax.train.train_and_evaluate(...)` works without importing it first.
_LAZY_SUBMODULES = (
    "callbacks",
    "checkpoint",
    "config",
    "controller",
    "data",
    "metrics",
    "plots",
    "rejuvenation",
    "rescale",
    "run_liveness",
    "steps",
    "train",
    "trainer",
)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"nr_jax.{name}")
    raise AttributeError(f"module 'nr_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "ALLOCATIONS",
    "MASKS",
    "ChannelGraph",
    "Counts",
    "L1State",
    "Liveness",
    "NRClassifier",
    "NRConv",
    "NRDense",
    "Rejuvenation",
    "RejuvenationReport",
    "Unit",
    "UnitWidth",
    "Utilization",
    "WidthSpec",
    "adapt_lambda",
    "channel_graph",
    "classifier_unit",
    "conv_unit",
    "count",
    "criteria",
    "dense_unit",
    "export",
    "export_inference",
    "get_lambda",
    "group_lasso",
    "head_logits",
    "allocated_resource",
    "batch_chunking",
    "integer_allocation",
    "l1_bn_scales",
    "liveness",
    "merge",
    "Merged",
    "prune",
    "models",
    "nr_loss",
    "Plan",
    "UnitPlan",
    "plan",
    "apply_plan",
    "Allocation",
    "predict",
    "rejuvenate",
    "rounded_allocation",
    "set_conv_weight_grad",
    "set_lambda",
    "sqrt_allocation",
    "utilization",
]
