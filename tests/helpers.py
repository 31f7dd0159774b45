"""Small models and trees shared by the tests (built outside nr_jax/models on purpose)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import nr_jax
from nr_jax import layers


class ThreeUnitNet(nn.Module):
    """A researcher's own model: conv3x3 (C->4), max-pool, conv3x3 (4->4), conv1x1 (4->2), head."""

    num_classes: int = 3
    widths: layers.WidthSpec = layers.WidthSpec()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = layers.conv_unit(self.widths, "a", 4, kernel_size=3)(x, train)
        x = layers.max_pool(x, 2)
        x = layers.conv_unit(self.widths, "b", 4, kernel_size=3)(x, train)
        x = layers.conv_unit(self.widths, "c", 2, kernel_size=1)(x, train)
        return layers.classifier_unit(self.widths, self.num_classes)(x)


def set_gammas(variables: dict, gammas: dict[str, list[float]]) -> dict:
    """A copy of `variables` with the BN scales of the named units replaced."""
    params = jax.tree.map(lambda x: x, variables["params"])
    for name, g in gammas.items():
        params[name]["bn"]["scale"] = jnp.asarray(g, jnp.float32)
    return {**variables, "params": params}


def random_gammas(variables: dict, graph: nr_jax.ChannelGraph, seed: int, dead_frac: float = 0.5):
    """Random γ with about `dead_frac` of each prunable unit's channels at ~0 (dead)."""
    rng = np.random.default_rng(seed)
    gammas = {}
    for u in graph.prunable:
        g = rng.uniform(0.2, 1.0, u.out_channels)
        dead = rng.random(u.out_channels) < dead_frac
        dead[rng.integers(u.out_channels)] = False  # keep at least one live channel
        g[dead] = rng.uniform(0, 1e-4, dead.sum())
        gammas[u.name] = g.astype(np.float32)
    return set_gammas(variables, gammas), gammas


def zero_dead(variables: dict, live: nr_jax.Liveness) -> dict:
    """Sets γ and β of dead channels to zero (the reference for function preservation)."""
    params = jax.tree.map(lambda x: x, variables["params"])
    for name, m in live.out.items():
        m = jnp.asarray(m, jnp.float32)
        bn = params[name]["bn"]
        bn["scale"], bn["bias"] = bn["scale"] * m, bn["bias"] * m
    return {**variables, "params": params}


@functools.cache
def _jitted(model: nn.Module, what: str):
    if what == "init":
        return jax.jit(lambda k, x: model.init(k, x, train=False))
    if what == "train":
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def init(model: nn.Module, key: jax.Array, x: jax.Array) -> dict:
    """`model.init(key, x, train=False)`, jitted once per model (eager init compiles every op)."""
    return _jitted(model, "init")(key, x)


def apply(model: nn.Module, variables: dict, x: jax.Array, train: bool = False):
    """Jitted `model.apply`; with train=True returns (out, batch_stats update)."""
    return _jitted(model, "train" if train else "eval")(variables, x)
