"""Training with Neural Rejuvenation: state, jitted steps, the NR controller, `train_and_evaluate`.

The outer loop follows the official code (method.md 1.3): utilisation is checked once per epoch,
after training and evaluation; epochs before rejuvenation do not consume the LR schedule (the
official epoch extension), so a run is k search epochs plus the configured E epochs; exactly one
rejuvenation happens, after which λ is `nr.lam_after` (0 by default). The LR is a function of the
epochs since the search ended, computed inside the jitted step from arrays in the state, so
changing it never retraces. One model object, one `tx` and one pair of jitted steps exist per
width configuration: the steps are traced exactly once per width configuration.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nr_jax import data as nr_data
from nr_jax import faults, models
from nr_jax.checkpoint import Checkpointer, CheckpointError
from nr_jax.config import validate
from nr_jax.graph import ChannelGraph, channel_graph
from nr_jax.layers import MASKS, WidthSpec, batch_chunking, set_conv_weight_grad
from nr_jax.liveness import count, liveness, utilization
from nr_jax.schemes import head_logits, nr_loss
from nr_jax.sparsity import get_lambda, l1_bn_scales, set_lambda
from nr_jax.surgery import ALLOCATIONS, _get, rejuvenate, rounded_allocation

Mesh = jax.sharding.Mesh
NamedSharding = jax.sharding.NamedSharding
P = jax.sharding.PartitionSpec

log = logging.getLogger("nr_jax")

SEARCH, REJUVENATED, PLAIN = 0, 1, 2  # NR phase: searching, rejuvenated, no (more) NR
PHASE_NAMES = {SEARCH: "search", REJUVENATED: "rejuvenated", PLAIN: "plain"}


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training; arrays only (one trace per width config).

    Attributes:
      step: optimiser steps taken, int32.
      epoch: epochs completed, int32.
      sched_offset: search epochs that did not consume the LR schedule (k), int32.
      phase: NR phase (SEARCH, REJUVENATED, PLAIN), int32.
      params, batch_stats, masks: the model's variable collections.
      opt_state: the optax state (holds λ in its `L1State`).
      rng: PRNG key.
    """

    step: jax.Array
    epoch: jax.Array
    sched_offset: jax.Array
    phase: jax.Array
    params: Any
    batch_stats: Any
    masks: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats, MASKS: self.masks}


def make_optimizer(
    config: ml_collections.ConfigDict, graph: ChannelGraph
) -> optax.GradientTransformation:
    """The optimiser chain without the learning rate (applied in the step from the schedule).

    SGD as the official `nr.SGD` (method.md 1.4): L1 on BN γ, then weight decay on every parameter,
    then momentum (PyTorch semantics). The chain depends only on the graph's structure.
    """
    parts = []
    if config.nr.enabled:
        parts.append(l1_bn_scales(graph, config.nr.lam))
    if config.optimizer == "sgd":
        parts += [optax.add_decayed_weights(config.weight_decay), optax.trace(config.momentum)]
    elif config.optimizer == "adamw":
        parts += [optax.scale_by_adam(), optax.add_decayed_weights(config.weight_decay)]
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
    return optax.chain(*parts)


def learning_rate(config: ml_collections.ConfigDict, state: TrainState) -> jax.Array:
    """Step decay on the epochs since the search ended (the official epoch extension)."""
    e = (state.epoch - state.sched_offset).astype(jnp.float32)
    drops = sum(jnp.where(e >= m, 1.0, 0.0) for m in config.lr_milestones)
    return jnp.asarray(config.lr, jnp.float32) * jnp.asarray(config.lr_gamma, jnp.float32) ** drops


class Steps:
    """The jitted train and eval steps of one width configuration, with trace counters."""

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        graph: ChannelGraph,
        config: ml_collections.ConfigDict,
        counter: dict[str, int],
        mesh: Mesh | None = None,
    ) -> None:
        self.model, self.tx, self.graph, self.config = model, tx, graph, config
        self.counter = counter
        self.data_sharding = None if mesh is None else NamedSharding(mesh, P("data"))
        self.batch_chunks = mesh is None or mesh.size == 1  # see nr_jax.batch_chunking
        if mesh is None:
            self.train = jax.jit(self._train, donate_argnums=0)
            self.eval = jax.jit(self._eval)
        else:  # data parallel: batch sharded over the mesh, state replicated
            rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            self.train = jax.jit(
                self._train, donate_argnums=0, in_shardings=(rep, data), out_shardings=(rep, rep)
            )
            self.eval = jax.jit(self._eval, in_shardings=(rep, data), out_shardings=rep)

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """This process's rows of the global batch -> one array sharded over the mesh.

        Every process yields the same global batch (the order is a pure function of seed and
        epoch) and contributes its contiguous slice of it, so the same code runs on one host
        or many (`config.distributed`). Without a mesh the batch is returned as it is.
        """
        if self.data_sharding is None:
            return batch
        n, i = jax.process_count(), jax.process_index()

        def local(x: np.ndarray) -> jax.Array:
            rows = x.shape[0] // n
            return jax.make_array_from_process_local_data(
                self.data_sharding, np.asarray(x[i * rows : (i + 1) * rows]), x.shape
            )

        return {k: local(v) for k, v in batch.items()}

    def _train(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        self.counter["train"] = self.counter.get("train", 0) + 1
        model, tx = self.model, self.tx

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            variables = {"params": params, "batch_stats": state.batch_stats, MASKS: state.masks}
            out, upd = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
            return nr_loss(out, batch["label"]), (out, upd)

        with batch_chunking(self.batch_chunks):
            (loss, (out, upd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = learning_rate(self.config, state)
        params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=upd["batch_stats"], opt_state=opt_state
        )
        metrics = {"loss": loss, "lr": lr}
        for name, logits in head_logits(out).items():
            metrics[f"accuracy_{name}"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if self.config.nr.enabled:
            metrics["lambda"] = get_lambda(opt_state)
            live = liveness(new.variables, self.graph)
            metrics["utilization"] = utilization(live, self.graph, self.config.nr.resource).ratio
        return new, metrics

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


def evaluate(steps: Steps, state: TrainState, batches: Iterator[dict]) -> dict[str, float]:
    """Test loss and accuracy (summed logits, and old/new heads after rejuvenation)."""
    totals: dict[str, Any] = {}
    for i, batch in enumerate(batches):
        m = steps.eval(state.variables, steps.global_batch(batch))
        totals = m if not totals else jax.tree.map(jnp.add, totals, m)
        if i == 0:
            faults.point("eval")
    totals = jax.device_get(totals)
    n = float(totals["count"])
    out = {"test_loss": float(totals["loss_sum"]) / n}
    for key, value in totals.items():
        if key.startswith("correct_"):
            out["test_accuracy_" + key[len("correct_") :]] = float(value) / n
    return out


class MetricWriter:
    """Metrics keyed by step to `metrics.jsonl` (and TensorBoard event files when available).

    Only process 0 writes (multi-host runs); the others' writers do nothing.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, resume_step: int = 0) -> None:
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        _truncate_metrics(path, resume_step)  # drop what a killed run logged after its checkpoint
        self._file = open(path, "a")  # noqa: SIM115
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                # purge_step hides the events a killed run logged after its last checkpoint
                self._tb = SummaryWriter(
                    os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:  # pragma: no cover - optional
                log.info("tensorboardX not installed: no TensorBoard event files")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_metrics(path: str, step: int) -> None:
    """Keeps the records of `path` up to `step` (atomically): a resumed run logs the rest again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the kill
            continue
    if len(keep) == len(lines):
        return
    log.info(
        "metrics.jsonl: dropping %d records logged after step %d", len(lines) - len(keep), step
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _py(v: Any) -> Any:
    if isinstance(v, np.ndarray | jax.Array):
        v = np.asarray(v).item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    key: jax.Array,
) -> TrainState:
    """Initial variables and optimiser state."""
    init_key, rng = jax.random.split(key)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, x)
    phase = SEARCH if config.nr.enabled else PLAIN
    scalar = lambda v: jnp.array(v, jnp.int32)  # noqa: E731  (distinct buffers: the step donates)
    return TrainState(
        step=scalar(0),
        epoch=scalar(0),
        sched_offset=scalar(0),
        phase=scalar(phase),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        masks=variables[MASKS],
        opt_state=tx.init(variables["params"]),
        rng=rng,
    )


def _sticky_masks(masks: Any, dead: dict[str, Any]) -> Any:
    """Zeroes the mask of every all-dead unit (sticky: a zero mask stays zero)."""
    masks = flax.core.unfreeze(masks) if isinstance(masks, flax.core.FrozenDict) else masks
    masks = jax.tree.map(lambda x: x, masks)
    for name, is_dead in dead.items():
        if bool(is_dead):
            node = _get(masks, tuple(name.split("/")))
            node["mask"] = jnp.zeros_like(node["mask"])
    return masks


class Trainer:
    """Holds the per-width-configuration objects (model, graph, jitted steps) of one run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        self.config, self.workdir = config, workdir
        self.info = nr_data.DATASET_INFO[config.dataset]
        self.input_shape = (1, *self.info.image_shape)
        self.counter: dict[str, int] = {}
        self.model = models.get(
            config.model,
            num_classes=self.info.num_classes,
            scheme=config.nr.scheme,
            bias_in_both_heads=config.preset == "official",  # method.md 7.6
            dtype=jnp.bfloat16 if config.compute_dtype == "bfloat16" else None,
            **config.model_kwargs,
        )
        self.graph = channel_graph(self.model, self.input_shape)
        self.tx = make_optimizer(config, self.graph)  # built once, reused after rejuvenation
        self.mesh = (
            Mesh(np.array(jax.devices()), ("data",))
            if config.data_parallel and jax.device_count() > 1
            else None
        )
        self.steps = self._steps()
        self.nr: dict[str, Any] = {"search_epochs": 0, "previous_util": 1.0, "history": []}

    def _steps(self) -> Steps:
        return Steps(self.model, self.tx, self.graph, self.config, self.counter, self.mesh)

    def place(self, state: TrainState) -> TrainState:
        """Puts the state where the steps expect it (replicated over the mesh, if any)."""
        if self.mesh is None:
            return state
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def set_widths(self, widths: WidthSpec) -> None:
        self.model = self.model.clone(widths=widths)
        self.graph = channel_graph(self.model, self.input_shape)
        self.steps = self._steps()

    def controller(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        """The once-per-epoch NR decision (method.md 1.3). Returns the state and an event dict."""
        nr = self.config.nr
        event: dict[str, Any] = {}
        if int(state.phase) != SEARCH:
            return state, event
        host = jax.device_get(state.variables)
        live = liveness(
            host,
            self.graph,
            threshold=nr.threshold,
            dead_threshold=nr.dead_threshold,
        )
        util = float(utilization(live, self.graph, nr.resource).ratio)
        state = state.replace(
            masks=_sticky_masks(state.masks, live.dead), sched_offset=state.sched_offset + 1
        )
        self.nr["search_epochs"] += 1
        lam = float(get_lambda(state.opt_state))
        if nr.adaptive:
            lam = lam + nr.lam_step if self.nr["previous_util"] - util < nr.lam_threshold else lam
            state = state.replace(opt_state=set_lambda(state.opt_state, lam))
        self.nr["previous_util"] = util
        event.update(utilization=util, lam=lam)
        timed_out = self.nr["search_epochs"] >= nr.max_search_epochs
        if util > nr.target and not timed_out:
            return state, event
        if util > nr.target:
            log.warning(
                "utilisation %.4f did not reach the target %.3f within %d search epochs: %s",
                util,
                nr.target,
                nr.max_search_epochs,
                nr.on_search_timeout,
            )
            event["search_timeout"] = True
            if nr.on_search_timeout == "stop" or util >= 1.0:
                state = state.replace(
                    phase=jnp.asarray(PLAIN, jnp.int32),
                    opt_state=set_lambda(state.opt_state, nr.lam_after),
                )
                return state, event
        res = rejuvenate(
            key,
            self.model,
            state.variables,
            state.opt_state,
            self.tx,
            self.graph,
            resource=nr.resource,
            allocation=_allocation(self.config),
            min_width=nr.min_width,
            new_gamma=nr.new_gamma,
            threshold=nr.threshold,
            dead_threshold=nr.dead_threshold,
        )
        event["gammas"] = {  # for the |γ| histograms of the run's plots
            u.name.replace("/", "."): np.asarray(_get(host["params"], u.path)["bn"]["scale"])
            for u in self.graph.units
        }
        self.model, self.graph = res.model, res.graph
        self.steps = self._steps()
        v = res.variables
        # official preset: a fresh optimiser (all momentum lost); improved: survivors' moments kept
        opt_state = self.tx.init(v["params"]) if self.config.preset == "official" else res.opt_state
        state = state.replace(
            params=v["params"],
            batch_stats=v["batch_stats"],
            masks=v[MASKS],
            opt_state=set_lambda(opt_state, nr.lam_after),
            phase=jnp.asarray(REJUVENATED, jnp.int32),
        )
        state = self.place(state)
        event["rejuvenation"] = res.report
        if nr.rescale_target > 0 and not nr.compress_only:
            state = self.maybe_rescale(state)  # the one-pass flow
        return state, event

    def maybe_rescale(self, state: TrainState) -> TrainState:
        """Neural rescaling (method.md 4.4), once, after rejuvenation; preserves the function."""
        if self.nr.get("rescaled"):
            return state
        from nr_jax.rescale import rescale

        new = rescale(state.variables, self.graph, self.config.nr.rescale_target)
        self.nr["rescaled"] = True
        log.info("neural rescaling applied (target %g)", self.config.nr.rescale_target)
        state = state.replace(
            params=jax.tree.map(jnp.asarray, new["params"]),
            batch_stats=jax.tree.map(jnp.asarray, new["batch_stats"]),
        )
        return self.place(state)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _check_finite(state: TrainState) -> None:
    """Refuses to go on (and to checkpoint) with NaN or Inf in parameters or BN statistics."""
    if not bool(_all_finite((state.params, state.batch_stats))):
        raise FloatingPointError(
            f"NaN or Inf in the parameters or BN statistics after epoch {int(state.epoch)}; "
            "the last good checkpoint is kept (resume from it with a lower learning rate or λ)."
        )


def _allocation(config: ml_collections.ConfigDict) -> Any:
    """The width rule; rounded rules match the budget in the run's resource (params or flops)."""
    name = allocation_name(config)
    if name.startswith("round"):
        return rounded_allocation(int(name[len("round") :]), resource=config.nr.resource)
    return ALLOCATIONS[name]


def allocation_name(config: ml_collections.ConfigDict) -> str:
    """The width rule in force: `nr.allocation`, or for "auto" the preset's choice."""
    if config.nr.allocation != "auto":
        return config.nr.allocation
    return "round8" if config.preset == "improved" else "sqrt"


def _meta(
    trainer: Trainer,
    state: TrainState,
    history: list[dict],
    position: int = 0,
    partial: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON half of a checkpoint: widths, NR controller, history and the data position.

    `position` is the number of batches of epoch `state.epoch` already trained (0 at an epoch
    boundary) and `partial` the running sums of that epoch's train metrics: the data order is a
    pure function of (seed, epoch), so a run resumes at the very next batch.
    """
    return {
        "widths": trainer.model.widths.to_json(),
        "epoch": int(state.epoch),
        "step": int(state.step),
        "phase": int(state.phase),
        "position": int(position),
        "partial": dict(partial or {}),
        "nr": {k: v for k, v in trainer.nr.items() if k != "history"},
        "history": history,
    }


def _distributed_ready() -> bool:
    try:
        return jax.distributed.is_initialized()
    except AttributeError:  # pragma: no cover - older jax
        return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config.model` on `config.dataset` with Neural Rejuvenation; returns a summary.

    Writes into `workdir`: `metrics.jsonl`, TensorBoard events (`tb/`), checkpoints
    (`checkpoints/`, resumed automatically), `rejuvenation.json` and `summary.json`.
    """
    if config.distributed and not _distributed_ready():
        jax.distributed.initialize()  # coordinator, process count and id from the environment
    validate(config)
    primary = jax.process_index() == 0  # writes the run's files (checkpoints: every process)
    os.makedirs(workdir, exist_ok=True)
    set_conv_weight_grad(config.conv_weight_grad)  # before any step is traced
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t_start = time.time()
    trainer = Trainer(config, workdir)
    key = jax.random.key(config.seed)
    state = trainer.place(
        init_state(trainer.model, trainer.tx, config, trainer.info.image_shape, key)
    )
    data = RunData(config, trainer.info)
    steps_per_epoch = nr_data.steps_per_epoch(data.num_train, config.batch_size)
    history: list[dict] = []
    ckpt = (
        Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
        if config.checkpoint
        else None
    )
    position, partial = 0, {}
    if ckpt is not None and ckpt.latest_step() is not None:
        state, history, position, partial = _resume(trainer, ckpt)
        state = trainer.place(state)
    writer = MetricWriter(workdir, tensorboard=config.tensorboard, resume_step=int(state.step))

    def save_mid_epoch(state: TrainState, position: int, sums: dict[str, float]) -> None:
        _check_finite(state)
        ckpt.save(int(state.step), state, _meta(trainer, state, history, position, sums))

    _log_widths(trainer, "start")
    if int(state.phase) == REJUVENATED and config.nr.rescale_target > 0:
        state = trainer.maybe_rescale(state)  # the second step of the two-step flow

    def total_epochs() -> int:
        return config.epochs + int(state.sched_offset) + (1 if int(state.phase) == SEARCH else 0)

    report = None
    try:
        while int(state.epoch) < total_epochs():
            epoch = int(state.epoch)
            state, train_metrics = _train_epoch(
                trainer,
                state,
                data,
                epoch,
                steps_per_epoch,
                writer,
                total_epochs(),
                start=position,
                sums=partial,
                save=save_mid_epoch if ckpt is not None else None,
            )
            position, partial = 0, {}
            test_metrics = evaluate(
                trainer.steps,
                state,
                data.test_batches(),
            )
            state = state.replace(epoch=state.epoch + 1)
            _check_finite(state)
            state, event = trainer.controller(state, jax.random.fold_in(key, 1_000_003 + epoch))
            record = {
                "epoch": epoch + 1,
                **train_metrics,
                **test_metrics,
                "phase": PHASE_NAMES[int(state.phase)],
            }
            if "utilization" in event:
                record["epoch_utilization"] = event["utilization"]
                record["lambda_next"] = event["lam"]
            if "rejuvenation" in event:
                faults.point("after_rejuvenation")
                report = event["rejuvenation"]
                log.info("%s", report.summary())
                _log_widths(trainer, "after rejuvenation")
                record["rejuvenated"] = True
                if primary:
                    with open(os.path.join(workdir, "rejuvenation.json"), "w") as f:
                        json.dump({"epoch": epoch + 1, **report.as_dict()}, f, indent=1)
                    np.savez(os.path.join(workdir, "gammas_at_rejuvenation.npz"), **event["gammas"])
            history.append(record)
            writer.write(int(state.step), {f"epoch/{k}": v for k, v in record.items()})
            log.info("epoch %d: %s", epoch + 1, _fmt(record))
            if ckpt is not None:
                ckpt.save(int(state.step), state, _meta(trainer, state, history))
            if "rejuvenation" in event and config.nr.compress_only:
                log.info("compress-only: stopping after rejuvenation (resume to continue)")
                break
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()
    faults.point("end")
    summary = _summary(trainer, state, history, report, time.time() - t_start)
    if not primary:
        return summary
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if config.plots:
        from nr_jax.plots import plot_run

        summary["plots"] = plot_run(workdir)
    return summary


class _Limited:
    """The first `n` examples of a random-access source."""

    def __init__(self, source: Any, n: int) -> None:
        self.source, self.n = source, min(n, len(source)) if n else len(source)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


class RunData:
    """The run's training and test batches: in-memory arrays, or (ImageNet) decoded on the fly."""

    def __init__(self, config: ml_collections.ConfigDict, info: Any) -> None:
        self.config, self.info = config, info
        data_dir = config.data_dir or None
        if config.dataset == "imagenet2012":
            self.train = _Limited(
                nr_data.load_imagenet_source("train", data_dir=data_dir), config.train_limit
            )
            self.test = _Limited(
                nr_data.load_imagenet_source("validation", data_dir=data_dir), config.test_limit
            )
            self.num_train = len(self.train)
            return
        self.train = nr_data.load_arrays(
            config.dataset, "train", data_dir=data_dir, limit=config.train_limit or None
        )
        self.test = nr_data.load_arrays(
            config.dataset, "test", data_dir=data_dir, limit=config.test_limit or None
        )
        self.num_train = len(self.train[0])

    def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Epoch `epoch` from its batch `start` on (a pure function of seed and epoch)."""
        c = self.config
        kwargs = {"seed": c.seed, "epoch": epoch, "info": self.info, "augment": c.augment}
        kwargs["start_batch"] = start
        if isinstance(self.train, _Limited):
            return nr_data.train_batches_from_source(self.train, c.batch_size, **kwargs)
        return nr_data.train_batches(*self.train, c.batch_size, **kwargs)

    def test_batches(self) -> Iterator[dict]:
        c = self.config
        if isinstance(self.test, _Limited):
            return nr_data.eval_batches_from_source(self.test, c.eval_batch_size, info=self.info)
        return nr_data.eval_batches(*self.test, c.eval_batch_size, info=self.info)


def _train_epoch(
    trainer: Trainer,
    state: TrainState,
    data: RunData,
    epoch: int,
    steps_per_epoch: int,
    writer: MetricWriter,
    total: int,
    start: int = 0,
    sums: dict[str, float] | None = None,
    save: Any = None,
) -> tuple[TrainState, dict]:
    """One epoch from batch `start` on (`sums`: the metric sums of the batches before it).

    With `save` and `config.checkpoint_every_steps`, `save(state, position, sums)` writes a
    mid-epoch checkpoint every that many steps (the logging window is flushed first).
    """
    config = trainer.config
    every = config.checkpoint_every_steps if save is not None else 0
    batches = nr_data.prefetch(data.train_batches(epoch, start))
    bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{total}", config.progress)
    if bar is not None and start:
        bar.update(start)
    sums = dict(sums or {})
    window: list[dict] = []
    for i, batch in enumerate(batches, start):
        state, metrics = trainer.steps.train(state, trainer.steps.global_batch(batch))
        window.append(metrics)
        checkpoint_now = every and (i + 1) % every == 0 and i + 1 < steps_per_epoch
        if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch or checkpoint_now:
            host = jax.device_get(window)
            mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            if not np.isfinite(mean["loss"]):
                raise FloatingPointError(
                    f"non-finite training loss ({mean['loss']}) at step {int(state.step)}, epoch "
                    f"{epoch + 1}; the last good checkpoint is kept. Lower the learning rate or λ."
                )
            for m in host:
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            writer.write(int(state.step), {f"train/{k}": v for k, v in mean.items()})
            if bar is not None:
                bar.set_postfix(
                    loss=f"{mean['loss']:.3f}",
                    U=f"{mean.get('utilization', float('nan')):.3f}",
                    lam=f"{mean.get('lambda', 0.0):.1e}",
                )
                bar.update(len(window))
            window = []
        if checkpoint_now:
            save(state, i + 1, sums)
        faults.point("train_step")
    if bar is not None:
        bar.close()
    return state, {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _resume(trainer: Trainer, ckpt: Checkpointer) -> tuple[TrainState, list, int, dict]:
    """The newest good checkpoint: state, history, data position and partial epoch sums."""

    def abstract(meta: dict) -> Any:
        widths = WidthSpec.from_json(meta["widths"])
        if widths != trainer.model.widths:
            trainer.set_widths(widths)
        shapes = jax.eval_shape(
            lambda: init_state(
                trainer.model,
                trainer.tx,
                trainer.config,
                trainer.info.image_shape,
                jax.random.key(0),
            )
        )
        return shapes

    try:
        restored, meta, step = ckpt.restore(abstract)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {ckpt}: {e}") from e
    trainer.nr.update(meta["nr"])
    position = int(meta.get("position", 0))
    log.info(
        "resumed from the checkpoint of step %d: epoch %d, batch %d, phase %s",
        step,
        meta["epoch"] + 1,
        position,
        PHASE_NAMES[meta["phase"]],
    )
    return restored, list(meta["history"]), position, dict(meta.get("partial", {}))


def _log_widths(trainer: Trainer, when: str) -> None:
    c = count(trainer.graph)
    log.info("widths at %s: %s", when, trainer.graph.widths)
    log.info(
        "counts at %s: conv weights %d, total params %d, effective params %d, MACs %d "
        "(effective %d)",
        when,
        c.conv,
        c.total,
        c.effective,
        c.macs,
        c.effective_macs,
    )


def _fmt(record: dict[str, Any]) -> str:
    keys = (
        "train_loss",
        "test_accuracy_sum",
        "test_accuracy_old",
        "test_accuracy_new",
        "epoch_utilization",
        "lambda_next",
        "phase",
    )
    return ", ".join(
        f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
        for k in keys
        if k in record
    )


def _summary(
    trainer: Trainer, state: TrainState, history: list[dict], report: Any, wall: float
) -> dict[str, Any]:
    final = history[-1] if history else {}
    summary = {
        "model": trainer.config.model,
        "dataset": trainer.config.dataset,
        "epochs_run": int(state.epoch),
        "search_epochs": int(state.sched_offset),
        "phase": PHASE_NAMES[int(state.phase)],
        "final_test_accuracy": final.get("test_accuracy_sum"),
        "best_test_accuracy": max((h["test_accuracy_sum"] for h in history), default=None),
        "traces": dict(trainer.counter),
        "counts": count(trainer.graph)._asdict(),
        "widths": trainer.graph.widths,
        "wall_time_s": wall,
    }
    rej = next((h for h in history if h.get("rejuvenated")), None)
    if rej is not None:
        summary["rejuvenation_epoch"] = rej["epoch"]
        summary["utilization_at_rejuvenation"] = rej["epoch_utilization"]
    if report is not None:
        summary["rejuvenation"] = report.as_dict()
    return summary
