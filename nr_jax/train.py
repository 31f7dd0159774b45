"""Training with Neural Rejuvenation: the run loop `train_and_evaluate`.

The outer loop follows the official code (method.md 1.3): utilisation is checked once per epoch,
after training and evaluation, by the pure `nr_jax.controller.decide`, whose state lives in
`TrainState.controller`; epochs before rejuvenation do not consume the LR schedule (the official
epoch extension), so a run is k search epochs plus the configured E epochs; exactly one
rejuvenation happens, after which λ is `nr.lam_after` (0 by default). The LR of every epoch is set
in the optimiser state at its start. The per-width-configuration objects (model, graph, jitted
steps) and the epoch-end NR work are the `nr_jax.trainer.Trainer`'s; this module re-exports it
and the names of `nr_jax.steps` that callers import from here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nr_jax import data as nr_data
from nr_jax import multihost
from nr_jax.callbacks import Callbacks
from nr_jax.checkpoint import Checkpointer
from nr_jax.config import ConfigError, validate
from nr_jax.controller import REJUVENATED, SEARCH, phase_name, total_epochs
from nr_jax.metrics import (
    REJUVENATIONS,
    MetricWriter,
    format_record,
    log_widths,
    read_rejuvenations,
    summarize,
)
from nr_jax.rejuvenation import allocation_name
from nr_jax.run_state import check_resumable, checkpoint_meta, restore_run
from nr_jax.steps import (
    Steps,
    TrainState,
    check_finite,
    evaluate,
    evaluate_epoch,
    get_learning_rate,
    init_state,
    learning_rate,
    make_optimizer,
    recompute_batch_stats,
    set_learning_rate,
)
from nr_jax.trainer import Trainer

__all__ = [
    "Steps",
    "TrainState",
    "Trainer",
    "allocation_name",
    "check_finite",
    "evaluate",
    "get_learning_rate",
    "init_state",
    "learning_rate",
    "make_optimizer",
    "set_learning_rate",
    "train_and_evaluate",
]

log = logging.getLogger("nr_jax")


def run_epochs(state: TrainState, config: ml_collections.ConfigDict) -> int:
    """The run's epochs as known now (`nr_jax.controller.total_epochs` with the run's cycles)."""
    nr = config.nr
    return total_epochs(state.controller, config.epochs, nr.cycle_epochs, nr.cycles)


@dataclasses.dataclass
class _Run:
    """The objects of one `train_and_evaluate` call."""

    config: ml_collections.ConfigDict
    workdir: str
    trainer: Trainer
    data: Any
    writer: MetricWriter
    ckpt: Checkpointer | None
    callbacks: Callbacks
    key: jax.Array
    history: list[dict]
    report: Any = None  # the rejuvenation report, when this process rejuvenated
    best: dict = dataclasses.field(default_factory=dict)  # the best-validation entry


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, callbacks: Callbacks | None = None
) -> dict[str, Any]:
    """Trains `config.model` on `config.dataset` with Neural Rejuvenation; returns a summary.

    Writes into `workdir`: `metrics.jsonl`, TensorBoard events (`tb/`), checkpoints
    (`checkpoints/`, resumed automatically), `rejuvenation.json` (the last rejuvenation),
    `rejuvenations.json` (every one, with its cycle) and `summary.json`.
    `callbacks` (`nr_jax.callbacks.Callbacks`) are called at fixed points of the run.
    """
    multihost.start(config)  # several processes: one jax.distributed job, before any device
    validate(config)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    t_start = time.time()
    run, state, position, partial, data_state = _open(config, workdir, callbacks or Callbacks())
    try:
        while int(state.epoch) < run_epochs(state, config):
            state, stop = _epoch(run, state, position, partial, data_state)
            position, partial, data_state = 0, {}, None
            if stop:
                log.info("compress-only: stopping after rejuvenation (resume to continue)")
                break
    finally:
        run.writer.close()
        if run.ckpt is not None:
            run.ckpt.close()
    if run.callbacks.at_end is not None:
        run.callbacks.at_end()
    return _finish(run, state, time.time() - t_start)


def _open(
    config: ml_collections.ConfigDict, workdir: str, callbacks: Callbacks
) -> tuple[_Run, TrainState, int, dict, dict | None]:
    """The run's objects and its state: fresh, or resumed from the newest good checkpoint."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir!r} is a file: expected a directory (made if missing)")
    trainer = Trainer(config, workdir)  # resolves every name: nothing is written before
    ckpt = (
        Checkpointer(
            os.path.join(workdir, "checkpoints"),
            max_to_keep=config.keep_checkpoints,
            on_save=callbacks.on_checkpoint,
        )
        if config.checkpoint
        else None
    )
    try:
        if ckpt is not None:
            check_resumable(trainer, ckpt)  # another model's checkpoint: refused, none written
        data = nr_data.RunData(config, trainer.info)  # a missing dataset: refused before compute
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    images = None  # the dormancy criterion's epoch-end batch: the first training images
    if config.nr.enabled and trainer.criterion.needs_activity:
        images = data.first_images(config.nr.activity_images)
    trainer.use_data(data.steps_per_epoch, images)
    os.makedirs(workdir, exist_ok=True)
    key = jax.random.key(config.seed)
    state = trainer.place(
        init_state(trainer.model, trainer.tx, config, trainer.info.image_shape, key)
    )
    history, position, partial, data_state, best = [], 0, {}, None, {}
    if ckpt is not None and ckpt.latest_step() is not None:
        state, history, position, partial, data_state, best = restore_run(trainer, ckpt)
        state = trainer.place(state)
    writer = MetricWriter(workdir, tensorboard=config.tensorboard, resume_step=int(state.step))
    run = _Run(config, workdir, trainer, data, writer, ckpt, callbacks, key, history, best=best)
    log_widths(trainer.graph, "start")
    if int(state.controller.phase) == REJUVENATED and config.nr.rescale_target > 0:
        state = trainer.maybe_rescale(state)  # the second step of the two-step flow
    return run, state, position, partial, data_state


def _epoch(
    run: _Run, state: TrainState, position: int, partial: dict, data_state: dict | None = None
) -> tuple[TrainState, bool]:
    """Trains and evaluates epoch `state.epoch`, then the NR decision, the record, a checkpoint.

    Returns the state and whether the run stops here (compress-only, after rejuvenation).
    """
    trainer, epoch = run.trainer, int(state.epoch)
    state, train_metrics = _train_epoch(run, state, epoch, position, partial, data_state)
    # validation runs evaluate the test set at the final and the best-validation epochs only
    final = int(state.controller.phase) != SEARCH and epoch + 1 >= run_epochs(state, run.config)
    eval_metrics, run.best = evaluate_epoch(
        trainer.steps, state, run.data, epoch + 1, final, run.best, run.callbacks.on_eval_batch
    )
    n_bn = run.config.nr.recompute_bn_batches
    if n_bn and run.data.num_val and int(state.controller.phase) == SEARCH:
        batches = itertools.islice(run.data.train_iterator(epoch), n_bn)
        precise = recompute_batch_stats(trainer.steps, state, batches)
        bn_metrics = evaluate(trainer.steps, precise, run.data.val_batches(), prefix="val_bn")
        eval_metrics.update(bn_metrics)
    state = state.replace(epoch=state.epoch + 1)
    check_finite(state)
    state, event = trainer.epoch_end(state, jax.random.fold_in(run.key, 1_000_003 + epoch))
    record = {"epoch": epoch + 1, **train_metrics, **eval_metrics}
    record["phase"] = phase_name(state.controller)
    if "utilization" in event:
        record["epoch_utilization"] = event["utilization"]
        record["lambda_next"] = event["lam"]
    if "merged" in event:  # a cycle ended: an ordinary network, searched again
        record["merged"] = event["merged"]
        log_widths(trainer.graph, f"after merging cycle {event['merged']}")
    if "rejuvenation" in event:
        record["rejuvenated"] = True
        _rejuvenated(run, epoch, event)
    run.history.append(record)
    run.writer.write(int(state.step), {f"epoch/{k}": v for k, v in record.items()})
    log.info("epoch %d: %s", epoch + 1, format_record(record))
    if run.ckpt is not None:
        run.ckpt.save(
            int(state.step), state, checkpoint_meta(trainer, state, run.history, best=run.best)
        )
    return state, "rejuvenation" in event and run.config.nr.compress_only


def _rejuvenated(run: _Run, epoch: int, event: dict[str, Any]) -> None:
    """After the rejuvenation of epoch `epoch`: the callback, logs, `rejuvenation.json`, γ."""
    if run.callbacks.after_rejuvenation is not None:
        run.callbacks.after_rejuvenation()
    run.report = event["rejuvenation"]
    log.info("%s", run.report.summary())
    log_widths(run.trainer.graph, "after rejuvenation")
    if jax.process_index() == 0:
        entry = {"epoch": epoch + 1, **run.report.as_dict()}
        with open(os.path.join(run.workdir, "rejuvenation.json"), "w") as f:
            json.dump(entry, f, indent=1)
        # one entry per rejuvenation (cycle); entries from epochs a resume is redoing are replaced
        earlier = [r for r in read_rejuvenations(run.workdir) if r["epoch"] < entry["epoch"]]
        with open(os.path.join(run.workdir, REJUVENATIONS), "w") as f:
            json.dump([*earlier, {"cycle": len(earlier) + 1, **entry}], f, indent=1)
        if event["gammas"]:  # none for units without a normalisation scale
            np.savez(os.path.join(run.workdir, "gammas_at_rejuvenation.npz"), **event["gammas"])


def _finish(run: _Run, state: TrainState, wall: float) -> dict[str, Any]:
    """The summary, written to `summary.json` (with the plots) by process 0."""
    trainer = run.trainer
    extra = {
        "epochs_run": int(state.epoch),
        "search_epochs": int(state.controller.search_epochs),
        "phase": phase_name(state.controller),
        "traces": dict(trainer.counter),
        "wall_time_s": wall,
    }
    if run.best:
        extra["best_validation"] = run.best  # its test figures appear nowhere else
    summary = summarize(run.config, trainer.graph, run.history, extra)
    if run.report is not None:
        summary["rejuvenation"] = run.report.as_dict()
    if jax.process_index() != 0:
        return summary
    if run.config.nr.cycles > 1:
        summary["rejuvenations"] = read_rejuvenations(run.workdir)
    with open(os.path.join(run.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if run.config.plots:
        from nr_jax.plots import plot_run

        summary["plots"] = plot_run(run.workdir)
    return summary


def _train_epoch(
    run: _Run,
    state: TrainState,
    epoch: int,
    start: int = 0,
    sums: dict[str, float] | None = None,
    data_state: dict[str, Any] | None = None,
) -> tuple[TrainState, dict]:
    """One epoch from batch `start` on (`sums`: the metric sums of the batches before it,
    `data_state`: the saved grain iterator state at it, None at the epoch's start), at the LR of
    the epoch; a mid-epoch checkpoint every `config.checkpoint_every_steps` steps."""
    config, trainer, data = run.config, run.trainer, run.data
    steps_per_epoch = data.steps_per_epoch
    every = config.checkpoint_every_steps if run.ckpt is not None else 0
    state = state.replace(
        opt_state=set_learning_rate(state.opt_state, learning_rate(config, state))
    )
    batches = data.train_iterator(epoch, data_state)
    total = run_epochs(state, config)
    bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{total}", config.progress, start)
    sums, window, step = dict(sums or {}), [], int(state.step)
    for i, batch in enumerate(batches, start):
        state, metrics = trainer.steps.train(state, trainer.steps.global_batch(batch))
        window.append(metrics)
        checkpoint_now = every and (i + 1) % every == 0 and i + 1 < steps_per_epoch
        if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch or checkpoint_now:
            _flush(run, state, window, sums, bar)
            window = []
        if checkpoint_now:
            check_finite(state)
            meta = checkpoint_meta(
                trainer, state, run.history, i + 1, sums, batches.get_state(), run.best
            )
            run.ckpt.save(int(state.step), state, meta)
        step += 1
        if run.callbacks.on_train_step is not None:
            run.callbacks.on_train_step(step)
    batches.close()
    if bar is not None:
        bar.close()
    return state, {f"train_{k}": v / steps_per_epoch for k, v in sums.items()}


def _flush(run: _Run, state: TrainState, window: list[dict], sums: dict, bar: Any) -> None:
    """Logs the mean of the window's step metrics and adds them to the epoch's `sums`."""
    host = jax.device_get(window)
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    if not np.isfinite(mean["loss"]):
        raise FloatingPointError(
            f"non-finite training loss ({mean['loss']}) at step {int(state.step)}, epoch "
            f"{int(state.epoch) + 1}; the last good checkpoint is kept. Lower the learning rate "
            "or λ."
        )
    for m in host:
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    run.writer.write(int(state.step), {f"train/{k}": v for k, v in mean.items()})
    if bar is not None:
        bar.set_postfix(
            loss=f"{mean['loss']:.3f}",
            U=f"{mean.get('utilization', float('nan')):.3f}",
            lam=f"{mean.get('lambda', 0.0):.1e}",
        )
        bar.update(len(window))


def _progress(total: int, desc: str, enabled: bool, start: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    if start:
        bar.update(start)
    return bar
