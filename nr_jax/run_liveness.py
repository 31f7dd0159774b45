"""The run's liveness criterion and sparsity pressure, from its config (issue 16).

`config.nr.criterion` and `config.nr.pressure` name them (`nr_jax.criteria.resolve`,
`nr_jax.sparsity.resolve`); "auto" is `nr_jax.criteria.suggest`'s choice for the model's
normalisation, so a BatchNorm network keeps the official rule ("bn", L1 on γ) bit for bit.
`run_criterion` resolves the names and refuses, with the one-line `ConfigError`, what the model
cannot serve: the BN rule or the L1 pressure on units without the scale they read, and the
BN-only switches (neural rescaling, recomputed BN statistics) on a network without BatchNorm.
The trainer calls it before any compute; the jitted step and the epoch end then use the one
criterion it returns (`measure` at the epoch end), and the surgery takes their liveness.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from nr_jax import criteria
from nr_jax.config import refuse
from nr_jax.graph import ChannelGraph
from nr_jax.live import Liveness
from nr_jax.sparsity import PRESSURES

__all__ = ["criterion_name", "images_activity", "measure", "pressure_name", "run_criterion"]


def criterion_name(config: ml_collections.ConfigDict, graph: ChannelGraph) -> str:
    """`config.nr.criterion`, or for "auto" `nr_jax.criteria.suggest(graph)`'s criterion
    ("bn" for BatchNorm networks, "norm" for GroupNorm / LayerNorm ones, else "outgoing")."""
    name = config.nr.criterion
    return criteria.suggest(graph)[0] if name == "auto" else name


def pressure_name(config: ml_collections.ConfigDict, graph: ChannelGraph) -> str:
    """`config.nr.pressure`, or for "auto" `nr_jax.criteria.suggest(graph)`'s pressure ("l1"
    for networks with a normalisation scale in every unit, else "group_lasso")."""
    name = config.nr.pressure
    return criteria.suggest(graph)[1] if name == "auto" else name


def run_criterion(config: ml_collections.ConfigDict, graph: ChannelGraph) -> criteria.Criterion:
    """The run's liveness criterion, after checking that the model can serve the config.

    Raises:
      ConfigError: an unknown `nr.criterion` or `nr.pressure`; "bn" with units without
        BatchNorm, "norm" or the "l1" pressure with units without a normalisation scale;
        `nr.rescale_target` or `nr.recompute_bn_batches` (both move or read BN statistics) on a
        network without BatchNorm in every unit. Each names the field and what is allowed.
    """
    nr, model = config.nr, config.model
    crit, press = criterion_name(config, graph), pressure_name(config, graph)
    if crit not in criteria.CRITERIA:
        refuse("nr.criterion", nr.criterion, f"'auto' or one of {sorted(criteria.CRITERIA)}")
    if press not in PRESSURES:
        refuse("nr.pressure", nr.pressure, f"'auto' or one of {list(PRESSURES)}")
    norms = {u.norm for u in graph.units}
    if crit == "bn" and norms != {"batch"}:
        allowed = f"'norm', 'outgoing', 'dormancy' or 'auto' for {model!r} (units without BN)"
        refuse("nr.criterion", crit, allowed)
    if crit == "norm" and None in norms:
        allowed = f"'outgoing', 'dormancy' or 'auto' for {model!r} (units without a scale)"
        refuse("nr.criterion", crit, allowed)
    if press == "l1" and any(u.norm is None for u in graph.prunable):
        allowed = f"'group_lasso', 'none' or 'auto' for {model!r} (units without a scale)"
        refuse("nr.pressure", press, allowed)
    if norms != {"batch"}:
        for field in ("rescale_target", "recompute_bn_batches"):
            if nr[field]:
                allowed = f"0 for {model!r} (it needs BatchNorm in every unit)"
                refuse(f"nr.{field}", nr[field], allowed)
    return criteria.resolve(
        crit, threshold=nr.threshold, dead_threshold=nr.dead_threshold, tau=nr.dormancy_tau
    )


def images_activity(
    model: nn.Module, variables: Any, images: np.ndarray, batch_size: int
) -> dict[str, np.ndarray]:
    """Every unit's mean |activation| per output channel over `images` (eval mode), on the host.

    The images go through the model `batch_size` at a time (`nr_jax.criteria.activity`, one
    compile per width configuration and chunk shape); the chunks' means are weighted by their
    sizes, so the result is the mean over all images whatever `batch_size` is.

    Args:
      model: the network. variables: its variables (host or device arrays).
      images: float32 (N, H, W, C), preprocessed as for evaluation; N >= 1.
      batch_size: images per forward pass (>= 1).

    Returns:
      unit name -> float32 (D_out,) numpy array.
    """
    n = len(images)
    if n < 1 or batch_size < 1:
        raise ValueError(f"images_activity: need >= 1 image and batch_size, got {n}, {batch_size}")
    total: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        act = jax.device_get(criteria.activity(model, variables, chunk))
        for name, a in act.items():
            total[name] = total.get(name, 0.0) + np.asarray(a, np.float64) * len(chunk)
    return {name: (t / n).astype(np.float32) for name, t in total.items()}


def measure(
    criterion: criteria.Criterion,
    variables: Any,
    graph: ChannelGraph,
    model: nn.Module | None = None,
    images: np.ndarray | None = None,
    batch_size: int = 500,
) -> Liveness:
    """The liveness of the network by `criterion`, on the host (numpy), e.g. at the epoch end.

    A criterion that needs activity (`needs_activity`: "dormancy") reads it over `images`
    (`images_activity`, with `model` and `batch_size`); the others read the variables only.

    Raises:
      ValueError: the criterion needs activity and `model` or `images` is missing.
    """
    host = jax.device_get(variables)
    activity = None
    if criterion.needs_activity:
        if model is None or images is None:
            raise ValueError(
                f"the {type(criterion).__name__} criterion needs the model and activity images "
                "(nr_jax.train.Trainer.use_data(..., activity_images=...))"
            )
        activity = images_activity(model, host, images, batch_size)
    return jax.tree.map(np.asarray, criterion(host, graph, activity))
