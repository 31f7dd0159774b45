"""`Trainer`: one run's per-width-configuration objects and its once-per-epoch NR work.

One model object, one channel graph and one pair of jitted steps (`nr_jax.steps.Steps`) exist per
width configuration, so the steps are traced exactly once per width configuration; the optimiser
is built once and reused after rejuvenation. The liveness criterion and the sparsity pressure are
the run's (`nr.criterion`, `nr.pressure`: `nr_jax.run_liveness`), resolved when the `Trainer` is
built. The run loop that drives it is `nr_jax.train.train_and_evaluate`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nr_jax import data as nr_data
from nr_jax import models, multihost
from nr_jax.controller import REJUVENATED
from nr_jax.graph import channel_graph
from nr_jax.layers import WidthSpec
from nr_jax.rejuvenation import allocation_rule, cycle_epoch_end, rescale_state, search_epoch_end
from nr_jax.run_liveness import run_criterion
from nr_jax.steps import Steps, TrainState, make_optimizer

__all__ = ["Trainer"]

Mesh = jax.sharding.Mesh
NamedSharding = jax.sharding.NamedSharding
P = jax.sharding.PartitionSpec


class Trainer:
    """Holds the per-width-configuration objects (model, graph, jitted steps) of one run, and
    its liveness criterion (`criterion`) with, for one that needs activity ("dormancy"), the
    fixed batch of training images it reads at the epoch end (`activity_images`, `use_data`)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        self.config, self.workdir = config, workdir
        # names are resolved (ConfigError for unknown ones) before anything is computed
        self.info = nr_data.dataset_info(config.dataset)
        self.input_shape = (1, *self.info.image_shape)
        self.counter: dict[str, int] = {}
        self.mesh = (
            Mesh(np.array(jax.devices()), ("data",))
            if config.data_parallel and jax.device_count() > 1
            else None
        )
        self.model = models.get(
            config.model,
            num_classes=self.info.num_classes,
            scheme=config.nr.scheme,
            bias_in_both_heads=config.preset == "official",  # method.md 7.6
            dtype=jnp.bfloat16 if config.compute_dtype == "bfloat16" else None,
            conv_weight_grad=config.conv_weight_grad,
            # batch chunks of a batch sharded over several devices would live on different ones
            batch_chunks=self.mesh is None or self.mesh.size == 1,
            model_kwargs=config.model_kwargs,  # refused if unknown or set by the run
        )
        allocation_rule(config)  # refuses an unknown nr.allocation now, before any compute
        self.graph = channel_graph(self.model, self.input_shape)
        # nr.criterion / nr.pressure resolved (and refused where the model cannot serve them)
        self.criterion = run_criterion(config, self.graph)
        self.tx = make_optimizer(config, self.graph)  # built once, reused after rejuvenation
        self.steps_per_epoch = 0  # known once the data is: `use_data`
        self.activity_images: np.ndarray | None = None
        self.steps = self._steps()

    def _steps(self) -> Steps:
        return Steps(
            self.model,
            self.tx,
            self.graph,
            self.config,
            self.counter,
            self.mesh,
            steps_per_epoch=self.steps_per_epoch,
            criterion=self.criterion,
        )

    def use_data(self, steps_per_epoch: int, activity_images: np.ndarray | None = None) -> None:
        """Sets the run's steps per epoch (the within-epoch λ controller's clock) and the images
        the "dormancy" criterion reads at the epoch end (float32 (N, H, W, C), evaluation
        preprocessing; `nr_jax.data.RunData.first_images`)."""
        self.steps_per_epoch = steps_per_epoch
        self.activity_images = activity_images
        self.steps = self._steps()

    def place(self, state: TrainState) -> TrainState:
        """Puts the state where the steps expect it (replicated over the mesh, if any, on the
        devices of every process: `nr_jax.multihost.replicate`)."""
        if self.mesh is None:
            return state
        return multihost.replicate(state, NamedSharding(self.mesh, P()))

    def set_widths(self, widths: WidthSpec) -> None:
        self.model = self.model.clone(widths=widths)
        self.graph = channel_graph(self.model, self.input_shape)
        self.steps = self._steps()

    def epoch_end(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        """The once-per-epoch NR decision (method.md 1.3) and what it asks for.

        `nr_jax.rejuvenation.search_epoch_end`; after a rejuvenation the new width
        configuration's steps, and neural rescaling in the one-pass flow. Returns the state and
        the event dict (`utilization`, `lam`, `search_timeout`, `rejuvenation`, `gammas`).
        """
        nr = self.config.nr
        if int(state.controller.phase) == REJUVENATED and nr.cycles > 1:
            state, event, merged = cycle_epoch_end(
                state, self.model, self.graph, self.tx, self.config
            )
            if merged is not None:  # an ordinary network again: its own steps
                self.model, self.graph = merged.model, merged.graph
                self.steps = self._steps()
            return self.place(state), event
        state, event, res = search_epoch_end(
            *(state, self.model, self.graph, self.tx, self.config, key),
            criterion=self.criterion,
            images=self.activity_images,
        )
        if res is not None:
            self.model, self.graph = res.model, res.graph
            self.steps = self._steps()
            if nr.rescale_target > 0 and not nr.compress_only:
                state = rescale_state(state, self.graph, self.config)  # the one-pass flow
        return self.place(state), event

    def maybe_rescale(self, state: TrainState) -> TrainState:
        """Neural rescaling (method.md 4.4), once, after rejuvenation; preserves the function."""
        return self.place(rescale_state(state, self.graph, self.config))
