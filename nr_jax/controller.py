"""The NR controller as data: its state is a NamedTuple of arrays, its decision a pure function.

The official code checks the utilisation once per epoch during the search (method.md 1.3): while
U is above the target T_r the search goes on (λ optionally adapted by `adapt_lambda`, the official
ImageNet rule); once U <= T_r the network is rejuvenated, exactly once, and λ becomes
`nr.lam_after`. Beyond the paper, `steer_lambda` adjusts λ within the epoch (`nr.lam_control =
"steps"`, inside the jitted train step) so that the target is reached in a chosen number of
search epochs. A search that reaches `nr.max_search_epochs` above the target either rejuvenates at
the utilisation reached or stops (`nr.on_search_timeout`); at U = 1 there is nothing to reallocate,
so it always stops. Search epochs do not consume the LR schedule (the official epoch extension):
the schedule runs on `epoch - search_epochs`.

`ControllerState` lives in `nr_jax.train.TrainState` (field `controller`), so it is checkpointed
with the rest of the state; λ itself lives only in the optax state (`nr_jax.get_lambda` /
`nr_jax.set_lambda`). `decide` is written in `jax.numpy` without Python branches on values, so it
runs on the host (after an epoch) or inside a jitted step alike:

    ctrl, action = decide(state.controller, util, get_lambda(state.opt_state), config)
    opt_state = set_lambda(state.opt_state, action.lam)
    if action.name == "rejuvenate": ...
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from nr_jax.sparsity import adapt_lambda

SEARCH, REJUVENATED, PLAIN = 0, 1, 2  # NR phase: searching, rejuvenated, no (more) NR
PHASE_NAMES = {SEARCH: "search", REJUVENATED: "rejuvenated", PLAIN: "plain"}
CONTINUE, REJUVENATE, STOP_SEARCH = 0, 1, 2  # what the trainer does after a decision
ACTION_NAMES = {CONTINUE: "continue", REJUVENATE: "rejuvenate", STOP_SEARCH: "stop_search"}


class ControllerState(NamedTuple):
    """The NR controller's state; scalar arrays only, so that changing it never retraces.

    Attributes:
      phase: SEARCH, REJUVENATED or PLAIN, int32.
      search_epochs: decisions taken during the search, all cycles together (k; the LR schedule
        is offset by it), int32.
      previous_utilization: U at the previous decision (1.0 before the first), float32.
      rescaled: whether neural rescaling was applied after rejuvenation, bool.
      cycle: rejuvenations done (`nr.cycles` in all; 0 before the first), int32.
      cycle_search_epochs: search epochs of the current cycle (`nr.max_search_epochs` is per
        cycle), int32.
    """

    phase: jax.Array
    search_epochs: jax.Array
    previous_utilization: jax.Array
    rescaled: jax.Array
    cycle: jax.Array
    cycle_search_epochs: jax.Array


class Action(NamedTuple):
    """The outcome of one decision.

    Attributes:
      kind: CONTINUE, REJUVENATE or STOP_SEARCH, int32 (`name` gives the string).
      lam: λ from now on, float32 (adapted during the search; `nr.lam_after` once it ends).
      timed_out: the search reached `nr.max_search_epochs` with U still above the target, bool.
    """

    kind: jax.Array
    lam: jax.Array
    timed_out: jax.Array

    @property
    def name(self) -> str:
        """The action as a string: "continue", "rejuvenate" or "stop_search" (host side)."""
        return ACTION_NAMES[int(self.kind)]


def init_controller(config: ml_collections.ConfigDict) -> ControllerState:
    """The state before training: searching if `config.nr.enabled`, plain otherwise.

    Every field is a distinct buffer (the train step donates the state).
    """
    return ControllerState(
        phase=jnp.array(SEARCH if config.nr.enabled else PLAIN, jnp.int32),
        search_epochs=jnp.array(0, jnp.int32),
        previous_utilization=jnp.array(1.0, jnp.float32),
        rescaled=jnp.array(False),
        cycle=jnp.array(0, jnp.int32),
        cycle_search_epochs=jnp.array(0, jnp.int32),
    )


def decide(
    state: ControllerState,
    utilization: jax.Array | float,
    lam: jax.Array | float,
    config: ml_collections.ConfigDict,
) -> tuple[ControllerState, Action]:
    """One NR decision at utilisation `utilization` with the current λ `lam` (pure, jit-able).

    Outside the search (phase REJUVENATED or PLAIN) nothing changes: CONTINUE with λ as it is.
    During the search the call counts one search epoch, adapts λ if `config.nr.adaptive`, records
    U, and returns REJUVENATE when U <= `nr.target`; on a timeout above the target REJUVENATE or
    STOP_SEARCH per `nr.on_search_timeout` (always STOP_SEARCH at U >= 1); CONTINUE otherwise.
    The new phase is set here (REJUVENATED or PLAIN); the trainer does the surgery.

    Args:
      state: the controller state.
      utilization: U of the live network, in [0, 1] (a scalar).
      lam: the current sparsity coefficient λ (a scalar).
      config: the run configuration (reads `config.nr`; static, so close over it to jit).

    Returns:
      The new controller state and the `Action`.
    """
    nr = config.nr
    util = jnp.asarray(utilization, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    searching = state.phase == SEARCH
    epochs = state.search_epochs + searching.astype(jnp.int32)
    cycle_epochs = state.cycle_search_epochs + searching.astype(jnp.int32)
    adapted = lam
    if nr.adaptive:
        adapted = adapt_lambda(
            lam,
            state.previous_utilization,
            util,
            step=jnp.float32(nr.lam_step),
            threshold=jnp.float32(nr.lam_threshold),
        )
    reached = searching & (util <= nr.target)
    timed_out = searching & ~reached & (cycle_epochs >= nr.max_search_epochs)
    stop = timed_out & ((nr.on_search_timeout == "stop") | (util >= 1.0))
    rejuvenate = reached | (timed_out & ~stop)
    ends = rejuvenate | stop
    kind = jnp.where(rejuvenate, REJUVENATE, jnp.where(stop, STOP_SEARCH, CONTINUE))
    new_state = ControllerState(
        phase=jnp.where(rejuvenate, REJUVENATED, jnp.where(stop, PLAIN, state.phase)).astype(
            jnp.int32
        ),
        search_epochs=epochs,
        previous_utilization=jnp.where(searching, util, state.previous_utilization),
        rescaled=jnp.asarray(state.rescaled),
        cycle=(state.cycle + rejuvenate.astype(jnp.int32)).astype(jnp.int32),
        cycle_search_epochs=cycle_epochs.astype(jnp.int32),
    )
    new_lam = jnp.where(ends, jnp.float32(nr.lam_after), jnp.where(searching, adapted, lam))
    return new_state, Action(kind=kind.astype(jnp.int32), lam=new_lam, timed_out=timed_out)


def phase_name(state: ControllerState) -> str:
    """The phase as a string: "search", "rejuvenated" or "plain" (host side)."""
    return PHASE_NAMES[int(state.phase)]


def end_of_cycle(
    state: ControllerState, epoch: jax.Array | int, config: ml_collections.ConfigDict
) -> tuple[ControllerState, jax.Array]:
    """After epoch `epoch` (epochs completed): whether a cycle's rejuvenated phase ends here.

    With `nr.cycles = n > 1`, the network rejuvenated by the c-th of n rejuvenations (c < n)
    trains `nr.cycle_epochs` epochs, is then merged back into an ordinary network
    (`nr_jax.merge`, by the caller, who also sets λ back to `nr.lam`) and searched again; the
    last cycle trains the full schedule. Returns the new state (phase SEARCH, the cycle's search
    count and U reset, when the cycle ends) and the decision (a bool scalar). Pure, jit-able.
    """
    nr = config.nr
    since = schedule_epoch(state, epoch, config)
    due = (state.phase == REJUVENATED) & (state.cycle < nr.cycles) & (since >= nr.cycle_epochs)
    new = ControllerState(
        phase=jnp.where(due, SEARCH, state.phase).astype(jnp.int32),
        search_epochs=jnp.asarray(state.search_epochs, jnp.int32),
        previous_utilization=jnp.where(due, 1.0, state.previous_utilization).astype(jnp.float32),
        rescaled=jnp.where(due, False, state.rescaled),
        cycle=jnp.asarray(state.cycle, jnp.int32),
        cycle_search_epochs=jnp.where(due, 0, state.cycle_search_epochs).astype(jnp.int32),
    )
    return new, due


def _merged_phases(state: ControllerState) -> jax.Array:
    """Rejuvenated phases cut short at `nr.cycle_epochs` so far (merges done)."""
    return jnp.where(state.phase == REJUVENATED, jnp.maximum(state.cycle - 1, 0), state.cycle)


def schedule_epoch(
    state: ControllerState, epoch: jax.Array | int, config: ml_collections.ConfigDict
) -> jax.Array:
    """The epoch of the LR schedule: 0 during a search (the official epoch extension: the search
    does not consume the schedule), else the epochs since the schedule last (re)started."""
    merged = _merged_phases(state) * config.nr.cycle_epochs
    since = jnp.asarray(epoch, jnp.int32) - state.search_epochs - merged
    return jnp.where(state.phase == SEARCH, 0, since).astype(jnp.int32)


def total_epochs(
    state: ControllerState, epochs: int, cycle_epochs: int = 0, cycles: int = 1
) -> int:
    """Epochs of the run as known now (host side): the search epochs so far, the rejuvenated
    phases cut short at `cycle_epochs` (one per merge), the `epochs` of the last schedule, and one
    more while a search goes on or is still to come (`cycles` rejuvenations in all)."""
    phase, cycle = int(state.phase), int(state.cycle)
    # the rejuvenated phase now running or next to come is cut short unless it is the last
    coming = {SEARCH: cycle + 1, REJUVENATED: cycle}.get(phase)
    merged = int(_merged_phases(state)) + (1 if coming is not None and coming < cycles else 0)
    to_come = phase == SEARCH or (phase == REJUVENATED and cycle < cycles)
    return epochs + int(state.search_epochs) + merged * cycle_epochs + (1 if to_come else 0)


def steer_lambda(
    lam: jax.Array,
    utilization: jax.Array,
    search_step: jax.Array,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
) -> jax.Array:
    """The within-epoch λ controller (beyond the paper; `nr.lam_control = "steps"`; pure, jit-able).

    The utilisation is steered along a straight line from 1 (step 0) to the target `nr.target`
    (after `nr.lam_control_epochs` epochs of `steps_per_epoch` steps), flat at the target after
    that: at every `nr.lam_control_every`-th search step, λ is multiplied by
    `exp(nr.lam_control_gain * (U - U_goal) / (1 - nr.target))` (raised while the search lags
    the line, lowered while it runs ahead of it) and clipped to
    `[nr.lam / nr.lam_control_range, nr.lam * nr.lam_control_range]`: the upper bound caps the
    L1 step per step (lr * λ / (1 - momentum)), so a slow search cannot push λ into the regime
    where the survivors collapse. Between those steps λ is returned unchanged. The epoch-end
    decision (`decide`) is unchanged: it rejuvenates once U <= the target.

    Args:
      lam: the current λ (a scalar).
      utilization: U after this step (a scalar).
      search_step: optimiser steps taken in the search, this one included (a scalar int).
      config: the run configuration (static).
      steps_per_epoch: training steps per epoch (static).
    """
    nr = config.nr
    if steps_per_epoch < 1:
        raise ValueError(f"steer_lambda needs steps_per_epoch >= 1, got {steps_per_epoch}")
    step = jnp.asarray(search_step, jnp.float32)
    progress = jnp.minimum(step / float(nr.lam_control_epochs * steps_per_epoch), 1.0)
    goal = 1.0 - (1.0 - nr.target) * progress
    error = (jnp.asarray(utilization, jnp.float32) - goal) / (1.0 - nr.target)
    steered = jnp.asarray(lam, jnp.float32) * jnp.exp(nr.lam_control_gain * error)
    bounds = (nr.lam / nr.lam_control_range, nr.lam * nr.lam_control_range)
    steered = jnp.clip(steered, *bounds).astype(jnp.float32)
    act = jnp.asarray(search_step, jnp.int32) % nr.lam_control_every == 0
    return jnp.where(act, steered, jnp.asarray(lam, jnp.float32))
