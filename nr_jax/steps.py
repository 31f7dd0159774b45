"""The training state, the complete optimiser and the jitted steps of one width configuration.

`TrainState` holds every array that changes during training (a `flax.struct.PyTreeNode`, arrays
only), the NR controller's state among them. `make_optimizer` returns one complete optax
optimiser (the run's sparsity pressure, weight decay, momentum, learning rate: PyTorch's order);
the LR is an injected hyperparameter in its state (`set_learning_rate`) and λ lives in its
`L1State`, so changing either never retraces. `Steps` jits `train_step(state, batch) -> (state,
metrics)` (donated) and the eval step once per width configuration, with trace counters; the
step's `utilization` metric is read with the run's liveness criterion (`nr_jax.run_liveness`).
A network without BatchNorm has an empty `batch_stats` collection ({}), which every step keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nr_jax.controller import (
    SEARCH,
    ControllerState,
    init_controller,
    schedule_epoch,
    steer_lambda,
)
from nr_jax.criteria import Criterion, activity_of, is_unit_call
from nr_jax.graph import ChannelGraph
from nr_jax.heads import head_logits, nr_loss
from nr_jax.layers import BN_MOMENTUM, MASKS
from nr_jax.live import utilization
from nr_jax.run_liveness import pressure_name, run_criterion
from nr_jax.sparsity import get_lambda, set_lambda
from nr_jax.sparsity import resolve as resolve_pressure

Mesh = jax.sharding.Mesh
NamedSharding = jax.sharding.NamedSharding
P = jax.sharding.PartitionSpec


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; arrays only (one trace per width config).

    Attributes:
      step: optimiser steps taken, int32.
      epoch: epochs completed, int32.
      params, batch_stats, masks: the model's variable collections (`batch_stats` {} for a
        network without BatchNorm).
      opt_state: the optax state (holds λ in its `L1State` and the LR in its hyperparameters).
      controller: the NR controller's state (phase, search epochs, ...), `ControllerState`.
      rng: PRNG key.
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    masks: Any
    opt_state: Any
    controller: ControllerState
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables; without BatchNorm no (empty) `batch_stats` collection."""
        if not self.batch_stats:
            return {"params": self.params, MASKS: self.masks}
        return {"params": self.params, "batch_stats": self.batch_stats, MASKS: self.masks}


def make_optimizer(
    config: ml_collections.ConfigDict, graph: ChannelGraph
) -> optax.GradientTransformation:
    """The complete optimiser; a custom loop can use it as it is (`optax.apply_updates`).

    SGD as the official `nr.SGD` (method.md 1.4): the sparsity pressure (`nr.pressure`, resolved
    by `nr_jax.run_liveness.pressure_name`: L1 on BN γ for BatchNorm networks), then weight decay
    on every parameter, then momentum, then the learning rate (PyTorch semantics). The LR is an
    injected hyperparameter (`set_learning_rate`), λ lives in the pressure's `L1State`
    (`nr_jax.set_lambda`, whichever pressure, "none" included). The chain depends only on the
    graph's structure, so it serves before and after rejuvenation.
    """
    parts = []
    if config.nr.enabled:
        parts.append(resolve_pressure(pressure_name(config, graph), graph, config.nr.lam))
    if config.optimizer == "sgd":
        parts += [optax.add_decayed_weights(config.weight_decay), optax.trace(config.momentum)]
    elif config.optimizer == "adamw":
        parts += [optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay)]
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
    lr = optax.inject_hyperparams(optax.scale_by_learning_rate, hyperparam_dtype=jnp.float32)
    return optax.chain(*parts, lr(learning_rate=config.lr))


def learning_rate(config: ml_collections.ConfigDict, state: TrainState) -> jax.Array:
    """Step decay on the epochs since the search ended (the official epoch extension).

    The search epochs (`state.controller.search_epochs`) do not consume the schedule; with
    several cycles it restarts at each rejuvenation (`nr_jax.controller.schedule_epoch`).
    """
    e = schedule_epoch(state.controller, state.epoch, config).astype(jnp.float32)
    drops = sum(jnp.where(e >= m, 1.0, 0.0) for m in config.lr_milestones)
    return jnp.asarray(config.lr, jnp.float32) * jnp.asarray(config.lr_gamma, jnp.float32) ** drops


def set_learning_rate(opt_state: Any, lr: float | jax.Array) -> Any:
    """Returns `opt_state` with its injected `learning_rate` set to `lr` (pure; float32)."""
    if optax.tree_utils.tree_get(opt_state, "learning_rate") is None:
        raise ValueError("set_learning_rate: expected the state of make_optimizer(...)'s chain")
    return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.array(lr, jnp.float32))


def get_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate the next `tx.update` applies."""
    return optax.tree_utils.tree_get(opt_state, "learning_rate")


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    key: jax.Array,
) -> TrainState:
    """Initial variables, optimiser state and controller state (distinct buffers: the step
    donates the state)."""
    init_key, rng = jax.random.split(key)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, x)
    return TrainState(
        step=jnp.array(0, jnp.int32),
        epoch=jnp.array(0, jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        masks=variables[MASKS],
        opt_state=tx.init(variables["params"]),
        controller=init_controller(config),
        rng=rng,
    )


class Steps:
    """The jitted train and eval steps of one width configuration, with trace counters.

    With a `mesh` (a 1-D "data" mesh of all devices, of all processes in a multi-process job) the
    batch is sharded over it and the state replicated: every device holds the whole state and
    the gradients are all-reduced once per step (XLA's data parallelism). Replicated, not sharded:
    the states are small (parameters and momentum in float32: a CIFAR VGG-19 0.16 GB, a
    ResNet-50 0.2 GB), and the host-side NR decision and surgery, once per epoch, need the whole
    arrays on every process anyway: of a replicated array `jax.device_get` reads a local copy,
    and every process computes the same new state from the same key (`nr_jax.multihost`).
    Sharding the state (FSDP) would add an all-gather of every layer to each step, for memory
    these models do not need.

    `steps_per_epoch` is needed by the within-epoch λ controller only (`nr.lam_control =
    "steps"`: `nr_jax.controller.steer_lambda`, applied inside the train step during the search).
    `criterion` is the run's liveness criterion (default: `nr_jax.run_liveness.run_criterion`);
    one that needs activity ("dormancy") reads the training batch's own, from the step's forward
    pass (before the update), while the others read the variables after it.
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        graph: ChannelGraph,
        config: ml_collections.ConfigDict,
        counter: dict[str, int],
        mesh: Mesh | None = None,
        steps_per_epoch: int = 0,
        criterion: Criterion | None = None,
    ) -> None:
        self.model, self.tx, self.graph, self.config = model, tx, graph, config
        self.criterion = run_criterion(config, graph) if criterion is None else criterion
        self.counter, self.steps_per_epoch = counter, steps_per_epoch
        self.data_sharding = None if mesh is None else NamedSharding(mesh, P("data"))
        if mesh is None:
            self.train = jax.jit(self._train, donate_argnums=0)
            self.eval = jax.jit(self._eval)
        else:  # data parallel: batch sharded over the mesh, state replicated
            rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            self.train = jax.jit(
                self._train, donate_argnums=0, in_shardings=(rep, data), out_shardings=(rep, rep)
            )
            self.eval = jax.jit(self._eval, in_shardings=(rep, data), out_shardings=rep)
        self.batch_statistics = jax.jit(self._batch_statistics)

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """The global batch (host arrays) -> one array per key, sharded over the mesh.

        Every process yields the same global batch (the order is a pure function of seed and
        epoch) and puts on each of its devices that device's rows of it (whatever the order of
        the mesh's devices), so the same code runs on one host or many (`config.distributed`).
        Without a mesh the batch is returned as it is.
        """
        if self.data_sharding is None:
            return batch

        def shard(x: np.ndarray) -> jax.Array:
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.data_sharding, lambda i: x[i])

        return {k: shard(v) for k, v in batch.items()}

    def _train(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        self.counter["train"] = self.counter.get("train", 0) + 1
        model, tx, nr = self.model, self.tx, self.config.nr
        # the dormancy criterion reads the batch's activity: every unit's output captured
        capture = nr.enabled and self.criterion.needs_activity
        extra = {"capture_intermediates": is_unit_call} if capture else {}
        mutable = ["batch_stats", "intermediates"] if capture else ["batch_stats"]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            variables = {"params": params, "batch_stats": state.batch_stats, MASKS: state.masks}
            out, upd = model.apply(variables, batch["image"], train=True, mutable=mutable, **extra)
            return nr_loss(out, batch["label"]), (out, upd)

        (loss, (out, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=upd.get("batch_stats", {}),
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "lr": get_learning_rate(state.opt_state)}
        for name, logits in head_logits(out).items():
            metrics[f"accuracy_{name}"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if nr.enabled:
            act = activity_of(upd["intermediates"]) if capture else None
            live = self.criterion(new.variables, self.graph, act)
            util = utilization(live, self.graph, nr.resource).ratio
            lam = get_lambda(opt_state)
            if nr.lam_control == "steps":
                # steps of this cycle's search: whole search epochs, then this epoch's steps
                spe, ctrl = self.steps_per_epoch, state.controller
                search_step = ctrl.cycle_search_epochs * spe + (new.step - state.epoch * spe)
                steered = steer_lambda(lam, util, search_step, self.config, spe)
                lam = jnp.where(state.controller.phase == SEARCH, steered, lam)
                new = new.replace(opt_state=set_lambda(opt_state, lam))
            metrics["lambda"], metrics["utilization"] = lam, util
        return new, metrics

    def _batch_statistics(self, state: TrainState, batch: dict[str, jax.Array]) -> Any:
        """The BN statistics of one training batch (train-mode forward pass, nothing updated);
        {} for a network without BatchNorm."""
        self.counter["batch_statistics"] = self.counter.get("batch_statistics", 0) + 1
        zero = jax.tree.map(jnp.zeros_like, state.batch_stats)
        variables = {"params": state.params, "batch_stats": zero, MASKS: state.masks}
        _, upd = self.model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
        # from zero running statistics one update leaves (1 - momentum) x the batch's
        return jax.tree.map(lambda s: s / (1.0 - BN_MOMENTUM), upd.get("batch_stats", {}))

    def _eval(self, variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.counter["eval"] = self.counter.get("eval", 0) + 1
        out = self.model.apply(variables, batch["image"], train=False)
        mask = batch["mask"]
        metrics = {
            "loss_sum": nr_loss(out, batch["label"], mask) * jnp.sum(mask),
            "count": jnp.sum(mask),
        }
        for name, logits in head_logits(out).items():
            correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
            metrics[f"correct_{name}"] = jnp.sum(correct * mask)
        return metrics


def evaluate(
    steps: Steps,
    state: TrainState,
    batches: Iterator[dict],
    on_batch: Any = None,
    prefix: str = "test",
) -> dict[str, float]:
    """Loss and accuracy over `batches` (summed logits, and old/new heads after rejuvenation).

    Returns `{prefix}_loss` and `{prefix}_accuracy_{head}` (e.g. `test_accuracy_sum`; `prefix`
    "val" for the validation split). `on_batch(index)`, if given, is called after each batch
    (`Callbacks.on_eval_batch`).
    """
    totals: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        m = steps.eval(state.variables, steps.global_batch(batch))
        totals = m if not totals else jax.tree.map(jnp.add, totals, m)
        if on_batch is not None:
            on_batch(i)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    out = {f"{prefix}_loss": float(totals["loss_sum"]) / n}
    for key, value in totals.items():
        if key.startswith("correct_"):
            out[f"{prefix}_accuracy_" + key[len("correct_") :]] = float(value) / n
    return out


def evaluate_epoch(
    steps: Steps,
    state: TrainState,
    data: Any,
    epoch: int,
    final: bool,
    best: dict[str, Any],
    on_batch: Any = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The evaluation of epoch `epoch` (1-based): the metrics of its record and the new `best`.

    Without a validation split (`data.num_val` 0) the record gets the test metrics, every epoch,
    and `best` stays as it is. With one, the record gets the validation metrics (`val_loss`,
    `val_accuracy_*`), and the test metrics only when `final` (the run's last epoch). The test set
    is also evaluated when the epoch reaches a new best `val_accuracy_sum` (strictly above the
    previous best, so ties keep the earlier epoch); those figures go into the returned best entry
    `{"epoch": epoch, val_*, test_*}`, never into the record, and replace the previous best's.

    Args:
      steps: the jitted steps of the current width configuration.
      state: the state after the epoch's training.
      data: the run's `nr_jax.data.RunData` (`num_val`, `val_batches`, `test_batches`).
      epoch: the epoch's number, 1-based (as in its record).
      final: whether this is the run's last epoch.
      best: the best-validation entry so far ({} before the first epoch).
      on_batch: `Callbacks.on_eval_batch`, called after each batch of every evaluation.
    """
    if not data.num_val:
        return evaluate(steps, state, data.test_batches(), on_batch), best
    record = evaluate(steps, state, data.val_batches(), on_batch, prefix="val")
    test = None
    if not best or record["val_accuracy_sum"] > best["val_accuracy_sum"]:
        test = evaluate(steps, state, data.test_batches(), on_batch)
        best = {"epoch": epoch, **record, **test}
    if final:
        record.update(test or evaluate(steps, state, data.test_batches(), on_batch))
    return record, best


def recompute_batch_stats(steps: Steps, state: TrainState, batches: Iterator[dict]) -> TrainState:
    """`state` with BN running statistics replaced by the mean over `batches` of each training
    batch's statistics (precise BN); parameters untouched. For the eval-lag check of the search
    (`nr.recompute_bn_batches`): the running averages lag γ while the L1 pressure shrinks it.

    Raises:
      ValueError: the network has no BatchNorm (no statistics to recompute), or no batches.
    """
    if not state.batch_stats:
        raise ValueError("recompute_batch_stats: the network has no BatchNorm statistics")
    total, n = None, 0
    for batch in batches:
        stats = steps.batch_statistics(state, steps.global_batch(batch))
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        n += 1
    if total is None:
        raise ValueError("recompute_batch_stats: no batches")
    return state.replace(batch_stats=jax.tree.map(lambda s: s / n, total))


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def check_finite(state: TrainState) -> None:
    """Refuses to go on (and to checkpoint) with NaN or Inf in parameters or BN statistics (none
    without BatchNorm)."""
    if not bool(_all_finite((state.params, state.batch_stats))):
        raise FloatingPointError(
            f"NaN or Inf in the parameters or BN statistics after epoch {int(state.epoch)}; "
            "the last good checkpoint is kept (resume from it with a lower learning rate or λ)."
        )
