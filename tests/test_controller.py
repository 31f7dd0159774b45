"""The NR controller on its own: every branch of `decide`, no model needed."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from nr_jax import controller
from nr_jax.config import base_config
from nr_jax.controller import (
    CONTINUE,
    PLAIN,
    REJUVENATE,
    REJUVENATED,
    SEARCH,
    STOP_SEARCH,
    ControllerState,
    decide,
    init_controller,
)
from nr_jax.sparsity import adapt_lambda


def config(**nr):
    c = base_config()
    c.nr.target = 0.5
    c.nr.lam = 1e-3
    c.nr.lam_after = 0.0
    c.nr.max_search_epochs = 3
    c.nr.update(nr)
    return c


def state(
    phase=SEARCH, search_epochs=0, previous=1.0, rescaled=False, cycle=None, cycle_search=None
):
    return ControllerState(
        phase=jnp.int32(phase),
        search_epochs=jnp.int32(search_epochs),
        previous_utilization=jnp.float32(previous),
        rescaled=jnp.asarray(rescaled),
        cycle=jnp.int32(cycle if cycle is not None else (0 if phase == SEARCH else 1)),
        cycle_search_epochs=jnp.int32(search_epochs if cycle_search is None else cycle_search),
    )


class DecideTest(chex.TestCase):
    """Each case runs jitted (as inside a train step) and eagerly (on the host after an epoch)."""

    def decide(self, s, util, lam, c):
        new, action = self.variant(functools.partial(decide, config=c))(s, util, lam)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, s)
        chex.assert_shape(action, ((), (), ()))
        return jax.device_get(new), jax.device_get(action)

    @chex.variants(with_jit=True, without_jit=True)
    def test_above_target_continues_and_counts_a_search_epoch(self):
        new, action = self.decide(state(search_epochs=1), 0.8, 1e-3, config())
        assert int(action.kind) == CONTINUE and not bool(action.timed_out)
        assert int(new.phase) == SEARCH and int(new.search_epochs) == 2
        assert float(new.previous_utilization) == np.float32(0.8)
        assert float(action.lam) == np.float32(1e-3)  # not adaptive: λ as it is

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.3, 0.5)  # below the target, and exactly at it
    def test_at_or_below_target_rejuvenates(self, util):
        new, action = self.decide(state(), util, 1e-3, config(lam_after=2e-5))
        assert int(action.kind) == REJUVENATE and not bool(action.timed_out)
        assert int(new.phase) == REJUVENATED and int(new.search_epochs) == 1
        assert float(action.lam) == np.float32(2e-5)  # nr.lam_after from now on
        assert float(new.previous_utilization) == np.float32(util)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.995, True), (0.95, False))  # U fell by 0.005 < 0.01; by 0.05
    def test_adaptive_lambda_follows_adapt_lambda(self, util, increases):
        c = config(adaptive=True, lam_step=5e-5, lam_threshold=0.01)
        _, action = self.decide(state(), util, 1e-3, c)
        assert int(action.kind) == CONTINUE
        want = adapt_lambda(1e-3, 1.0, util, step=5e-5, threshold=0.01)
        assert want == (1e-3 + 5e-5 if increases else 1e-3)
        np.testing.assert_allclose(float(action.lam), want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_adaptive_lambda_compares_with_the_previous_decision(self):
        c = config(adaptive=True, lam_step=5e-5, lam_threshold=0.01, max_search_epochs=10)
        s, lam = state(), 1e-3
        for util, want in ((0.9, 1e-3), (0.895, 1.05e-3), (0.7, 1.05e-3)):
            s, action = self.decide(s, util, lam, c)
            lam = action.lam
            np.testing.assert_allclose(float(lam), want, rtol=1e-6)
        assert int(s.search_epochs) == 3 and float(s.previous_utilization) == np.float32(0.7)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("rejuvenate", REJUVENATE, REJUVENATED), ("stop", STOP_SEARCH, PLAIN))
    def test_timeout_outcomes(self, outcome, kind, phase):
        c = config(on_search_timeout=outcome, lam_after=0.0)
        new, action = self.decide(state(search_epochs=2), 0.8, 1e-3, c)  # the 3rd of 3 epochs
        assert bool(action.timed_out) and int(action.kind) == kind
        assert int(new.phase) == phase and int(new.search_epochs) == 3
        assert float(action.lam) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_timeout_at_full_utilisation_stops_even_when_asked_to_rejuvenate(self):
        c = config(on_search_timeout="rejuvenate")
        new, action = self.decide(state(search_epochs=2), 1.0, 1e-3, c)
        assert bool(action.timed_out) and int(action.kind) == STOP_SEARCH
        assert int(new.phase) == PLAIN

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_utilisation_before_the_timeout_continues(self):
        new, action = self.decide(state(), 1.0, 1e-3, config())
        assert int(action.kind) == CONTINUE and not bool(action.timed_out)
        assert int(new.phase) == SEARCH

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(REJUVENATED, PLAIN)
    def test_other_phases_change_nothing(self, phase):
        c = config(adaptive=True)  # neither λ nor the counters move outside the search
        s = state(phase=phase, search_epochs=2, previous=0.4, rescaled=True)
        new, action = self.decide(s, 0.1, 0.0, c)
        chex.assert_trees_all_equal(new, jax.device_get(s))
        assert int(action.kind) == CONTINUE and not bool(action.timed_out)
        assert float(action.lam) == 0.0


def test_init_controller():
    assert int(init_controller(config()).phase) == SEARCH
    off = base_config()
    off.nr.enabled = False
    s = init_controller(off)
    assert int(s.phase) == PLAIN and int(s.search_epochs) == 0
    assert float(s.previous_utilization) == 1.0 and not bool(s.rescaled)
    leaves = jax.tree.leaves(s)  # the train step donates the state: no shared buffers
    assert len({id(x) for x in leaves}) == len(leaves)


def test_action_name_phase_name_and_total_epochs():
    _, action = decide(state(), 0.2, 1e-3, config())
    assert action.name == "rejuvenate"
    assert controller.phase_name(state(PLAIN)) == "plain"
    assert controller.total_epochs(state(SEARCH, 2), 10) == 13  # one more while searching
    assert controller.total_epochs(state(REJUVENATED, 3), 10) == 13


def test_decide_inside_a_jitted_step_with_traced_utilisation():
    """λ may be adjusted at any step: `decide` traces once and runs on device values."""
    c = config(adaptive=True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, u, lam):
        return decide(s, u, lam, c)

    s, kinds = state(), []
    for u in (0.99, 0.8, 0.2):
        s, action = step(s, jnp.float32(u), jnp.float32(1e-3))
        kinds.append(int(action.kind))
    assert kinds == [CONTINUE, CONTINUE, REJUVENATE]
    assert int(s.phase) == REJUVENATED and int(s.search_epochs) == 3


# ---------------------------------------------------------------- the within-epoch λ controller


def steering(**nr):
    return config(lam_control="steps", lam_control_every=10, lam_control_epochs=2, **nr)


def test_steer_lambda_follows_the_line_from_one_to_the_target():
    c, spe = steering(), 100  # the line: U_goal = 1 - 0.5 * step / 200
    steer = functools.partial(controller.steer_lambda, config=c, steps_per_epoch=spe)
    lam = jnp.float32(1e-3)
    # on the line: unchanged; behind it: raised by exp(gain * lag / (1 - T)); ahead: lowered
    np.testing.assert_allclose(steer(lam, jnp.float32(0.75), 100), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(steer(lam, jnp.float32(0.85), 100), 1e-3 * np.exp(0.2), rtol=1e-5)
    np.testing.assert_allclose(steer(lam, jnp.float32(0.65), 100), 1e-3 * np.exp(-0.2), rtol=1e-5)
    # past the chosen epochs the goal stays at the target
    np.testing.assert_allclose(steer(lam, jnp.float32(0.55), 1000), 1e-3 * np.exp(0.1), rtol=1e-5)
    # only every lam_control_every-th step acts
    assert float(steer(lam, jnp.float32(0.95), 105)) == np.float32(1e-3)


def test_steer_lambda_stays_within_its_range_and_jits():
    c = steering(lam_control_range=2.0, lam_control_gain=50.0)
    steer = jax.jit(functools.partial(controller.steer_lambda, config=c, steps_per_epoch=100))
    high = steer(jnp.float32(1e-3), jnp.float32(1.0), jnp.int32(190))
    low = steer(jnp.float32(1e-3), jnp.float32(0.0), jnp.int32(190))
    np.testing.assert_allclose([high, low], [2e-3, 5e-4], rtol=1e-6)


def test_steer_lambda_needs_the_epoch_length():
    with np.testing.assert_raises(ValueError):
        controller.steer_lambda(1e-3, 0.5, 10, steering(), steps_per_epoch=0)


# ---------------------------------------------------------------- repeated rejuvenation (cycles)


def cycles_config(cycles=2, cycle_epochs=3):
    c = config()
    c.nr.cycles, c.nr.cycle_epochs = cycles, cycle_epochs
    return c


def test_a_cycle_ends_after_its_epochs_and_the_last_runs_the_schedule():
    c, E = cycles_config(), 10  # two rejuvenations, 3 epochs after the first
    s = state(search_epochs=2, cycle=0)  # searching, two search epochs so far
    assert controller.total_epochs(s, E, 3, 2) == E + 2 + 3 + 1
    s, action = decide(s, 0.4, 1e-3, c)  # the 3rd search epoch reaches the target
    assert int(action.kind) == REJUVENATE and int(s.cycle) == 1 and int(s.phase) == REJUVENATED
    assert controller.total_epochs(s, E, 3, 2) == E + 3 + 3 + 1  # a search is still to come
    for epoch, ends in ((4, False), (5, False), (6, True)):  # epochs completed
        assert int(controller.schedule_epoch(s, epoch - 1, c)) == epoch - 1 - 3
        new, due = controller.end_of_cycle(s, epoch, c)
        assert bool(due) == ends
    s = new
    assert int(s.phase) == SEARCH and int(s.cycle_search_epochs) == 0
    assert float(s.previous_utilization) == 1.0
    assert int(controller.schedule_epoch(s, 6, c)) == 0  # the search does not consume it
    s, action = decide(s, 0.45, 1e-3, c)  # the next search: one epoch
    assert int(action.kind) == REJUVENATE and int(s.cycle) == 2 and int(s.search_epochs) == 4
    assert int(controller.schedule_epoch(s, 7, c)) == 0  # the schedule restarts
    assert int(controller.schedule_epoch(s, 12, c)) == 5
    assert controller.total_epochs(s, E, 3, 2) == E + 4 + 3  # the last cycle: E epochs
    _, due = controller.end_of_cycle(s, 100, c)
    assert not bool(due)


def test_the_search_timeout_counts_per_cycle():
    c = cycles_config()
    s = state(search_epochs=5, cycle=1, cycle_search=1)  # 5 search epochs in all, 1 in this cycle
    _, action = decide(s, 0.8, 1e-3, c)
    assert not bool(action.timed_out)  # max_search_epochs 3 is per cycle


def test_one_cycle_is_the_paper_schedule():
    c = cycles_config(cycles=1, cycle_epochs=0)
    s = state(phase=REJUVENATED, search_epochs=4, cycle=1)
    assert int(controller.schedule_epoch(s, 9, c)) == 5
    assert controller.total_epochs(s, 10) == 14
    _, due = controller.end_of_cycle(s, 9, c)
    assert not bool(due)
