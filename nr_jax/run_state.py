"""What a run's checkpoint holds beyond the `TrainState`, and how a run resumes from it.

The JSON half of every checkpoint (`nr_jax.checkpoint.Checkpointer`'s meta): the model it belongs
to, the widths that rebuild it, the epoch history, the data position (batches trained, the grain
iterator's state, the partial metric sums) and the best-validation entry. `check_resumable` reads
only that JSON, so a checkpoint of another model is refused before any compute; `restore_run`
rebuilds the abstract state for the stored widths and restores the newest good checkpoint.
`trainer` below is the run's `nr_jax.train.Trainer` (model, graph, tx, config, info, workdir).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import ml_collections

from nr_jax.checkpoint import Checkpointer, CheckpointError
from nr_jax.config import ConfigError
from nr_jax.controller import phase_name
from nr_jax.layers import WidthSpec
from nr_jax.steps import TrainState, init_state

__all__ = ["check_resumable", "checkpoint_meta", "model_identity", "restore_run"]

log = logging.getLogger("nr_jax")


def checkpoint_meta(
    trainer: Any,
    state: TrainState,
    history: list[dict],
    position: int = 0,
    partial: dict[str, float] | None = None,
    data_state: dict[str, Any] | None = None,
    best: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON half of a checkpoint: widths, history, the data position and the best entry.

    `position` is the number of batches of epoch `state.epoch` already trained (0 at an epoch
    boundary), `partial` the running sums of that epoch's train metrics and `data_state` the
    grain iterator's `get_state()` (None at an epoch boundary): the data order is a pure
    function of (seed, epoch), so a run resumes bit-identically at the very next batch. The NR
    controller's state is in the checkpointed `TrainState`; its phase is repeated here for people.
    `best` is the best-validation entry (`nr_jax.steps.evaluate_epoch`; {} without validation).
    """
    return {
        "model": model_identity(trainer.config),
        "widths": trainer.model.widths.to_json(),
        "epoch": int(state.epoch),
        "step": int(state.step),
        "phase": phase_name(state.controller),
        "position": int(position),
        "partial": dict(partial or {}),
        "data_state": data_state,
        "history": history,
        "best": dict(best or {}),
    }


def model_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint's arrays belong to (recorded in its meta): model, dataset, model_kwargs."""
    kwargs = json.loads(json.dumps(config.model_kwargs.to_dict(), default=str))  # tuples: lists
    return {"model": config.model, "dataset": config.dataset, "model_kwargs": kwargs}


def check_resumable(trainer: Any, ckpt: Checkpointer) -> None:
    """Refuses (`ConfigError`) to resume a checkpoint of another model, naming what it holds and
    what the config asks for; reads the JSON meta only (before any compute, nothing written).

    Checkpoints without the `model` entry (older runs) are compared by their units' names.
    """
    step = ckpt.latest_step()
    if step is None:
        return
    meta, asked = ckpt.read_meta(step), model_identity(trainer.config)
    found = meta.get("model")
    if found is None:
        known = {u.name for u in trainer.graph.all_units}
        extra = sorted(set(WidthSpec.from_json(meta["widths"]).as_dict()) - known)
        if not extra:
            return
        found = f"a model with the units {extra[:3]} (not units of {trainer.config.model!r})"
    elif found == asked:
        return
    raise ConfigError(
        f"workdir {trainer.workdir!r} holds a checkpoint (step {step}) of {found}, but the config "
        f"asks for {asked}: resume it with the config it was made with, or use another workdir"
    )


def restore_run(trainer: Any, ckpt: Checkpointer) -> tuple[TrainState, list, int, dict, Any, dict]:
    """The newest good checkpoint: state, history, data position, partial sums, data state and
    the best-validation entry."""

    def abstract(meta: dict) -> Any:
        widths = WidthSpec.from_json(meta["widths"])
        if widths != trainer.model.widths:
            trainer.set_widths(widths)
        t, key = trainer, jax.random.key(0)
        shapes = jax.eval_shape(
            lambda: init_state(t.model, t.tx, t.config, t.info.image_shape, key)
        )
        if t.mesh is None:
            return shapes
        # restored straight into the replicated arrays the steps take, on every process's devices
        rep = jax.sharding.NamedSharding(t.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)

    try:
        restored, meta, step = ckpt.restore(abstract)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {ckpt}: {e}") from e
    position = int(meta.get("position", 0))
    log.info(
        "resumed from the checkpoint of step %d: epoch %d, batch %d, phase %s",
        step,
        meta["epoch"] + 1,
        position,
        phase_name(restored.controller),
    )
    partial, data_state = dict(meta.get("partial", {})), meta.get("data_state")
    best = dict(meta.get("best") or {})
    return restored, list(meta["history"]), position, partial, data_state, best
