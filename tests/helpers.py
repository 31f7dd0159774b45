"""Small models and trees shared by the tests (built outside nr_jax/models on purpose)."""

from __future__ import annotations

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
    """A copy of `variables` with the normalisation scales of the named units replaced (BN
    "bn", or GroupNorm / LayerNorm "norm")."""
    params = jax.tree.map(lambda x: x, variables["params"])
    for name, g in gammas.items():
        norm = "bn" if "bn" in params[name] else "norm"
        params[name][norm]["scale"] = jnp.asarray(g, jnp.float32)
    return {**variables, "params": params}


def random_gammas(variables: dict, graph: nr_jax.ChannelGraph, seed: int, dead_frac: float = 0.5):
    """Random γ (any normalisation scale) with about `dead_frac` of each prunable unit's
    channels at ~0 (dead)."""
    rng = np.random.default_rng(seed)
    gammas = {}
    for u in graph.prunable:
        g = rng.uniform(0.2, 1.0, u.out_channels)
        dead = rng.random(u.out_channels) < dead_frac
        dead[rng.integers(u.out_channels)] = False  # keep at least one live channel
        g[dead] = rng.uniform(0, 1e-4, dead.sum())
        gammas[u.name] = g.astype(np.float32)
    return set_gammas(variables, gammas), gammas


def shrink_outgoing(
    variables: dict, graph: nr_jax.ChannelGraph, seed: int, dead_frac: float = 0.5
) -> dict:
    """`random_gammas` for units without a scale: about `dead_frac` of each prunable unit's
    channels get their outgoing weights (every consumer row reading them) scaled by 1e-5, dead
    for the "outgoing" criterion (at least one channel per unit stays live)."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(jax.tree.map(np.array, variables["params"]))
    dead = {}
    for u in graph.prunable:
        d = rng.random(u.out_channels) < dead_frac
        d[rng.integers(u.out_channels)] = False
        dead[u.name] = d
    for v in graph.all_units:
        k, offset = flat[(*v.path, "kernel")], 0
        for producers, start, stop in v.inputs:
            for p in producers & set(dead):
                rows = offset + np.flatnonzero(dead[p][start:stop])
                k[..., rows, :] *= np.float32(1e-5)
            offset += stop - start
    return {**variables, "params": flax.traverse_util.unflatten_dict(flat)}


def mask_dead(variables: dict, live: nr_jax.Liveness) -> dict:
    """Multiplies every unit's channel mask by its live outputs: the dead channels output zero
    (the reference for function preservation, for units with or without normalisation)."""
    masks = jax.tree.map(np.array, variables[nr_jax.MASKS])
    flat = flax.traverse_util.flatten_dict(masks)
    for name, m in live.out.items():
        path = (*name.split("/"), "mask")
        flat[path] = flat[path] * np.asarray(m, np.float32)
    return {**variables, nr_jax.MASKS: flax.traverse_util.unflatten_dict(flat)}


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


# ---------------------------------------------------------------------------------------------
# Host-side trees: variables and optimiser states without compiling anything
# ---------------------------------------------------------------------------------------------


def sgd_chain(graph: nr_jax.ChannelGraph, lam: float = 1e-4):
    """The official NR optimiser: L1 on the prunable γ, weight decay, SGD with momentum."""
    return optax.chain(
        nr_jax.l1_bn_scales(graph, lam),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.1, momentum=0.9),
    )


def host_variables(graph: nr_jax.ChannelGraph, seed: int = 0) -> dict:
    """Random numpy variables of the graph's shapes: `model.init` without its (slow) compile.

    Kernels N(0, 2/fan_out); BN β, running mean and head bias N(0, 0.1²); running variance
    U(0.5, 1.5); γ and masks 1.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        coll, last = path[0].key, path[-1].key
        if coll == nr_jax.MASKS or last == "scale":
            return np.ones(s.shape, s.dtype)
        if last == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if last == "kernel":
            std = math.sqrt(2.0 / (math.prod(s.shape[:-2]) * s.shape[-1]))
            return (std * rng.standard_normal(s.shape)).astype(s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, graph.variable_shapes)


def warm_state(tx, params, seed: int = 0, lam: float = 1e-4):
    """A host state of `tx` for `params`: random moments, every scalar (λ, counters) `lam`."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (
            rng.standard_normal(s.shape).astype(s.dtype) if s.ndim else np.full((), lam, s.dtype)
        ),
        jax.eval_shape(tx.init, params),
    )


def kernel_moments(opt_state, unit: nr_jax.Unit) -> dict:
    """Every optimiser-state leaf shaped like `unit`'s kernel, by key path (momentum, Adam ν...)."""
    suffix = (*unit.path, "kernel")
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    found = {}
    for path, leaf in leaves:
        keys = tuple(getattr(k, "key", None) for k in path[-len(suffix) :])
        if keys == suffix:
            found[path] = leaf
    return found


def kept_outputs(live: nr_jax.Liveness, graph: nr_jax.ChannelGraph, name: str) -> np.ndarray:
    """Output channels that survive rejuvenation (method.md 3.3), as a 0/1 mask.

    A unit keeps its live outputs; a unit tied into a residual stream keeps every channel that is
    live in some unit of its stream (the stream has one width), even when it is dead itself.
    """
    u = graph[name]
    if u.tie is None:
        return np.asarray(live.out[name])
    return np.any([np.asarray(live.out[n]) for n in graph.ties[u.tie]], axis=0)


def gammas_at_utilization(
    variables, graph, target: float, seed: int = 0, iters: int = 12, criterion: str = "bn"
):
    """`random_gammas` with the dead fraction bisected so that U is just under `target`;
    `shrink_outgoing` instead for the "outgoing" criterion.

    Returns (U, variables).
    """
    live_of = nr_jax.criteria.resolve(criterion)

    def at(frac):
        if criterion == "outgoing":
            v = jax.device_get(shrink_outgoing(variables, graph, seed, frac))
        else:
            v = jax.device_get(random_gammas(variables, graph, seed, frac)[0])
        return float(nr_jax.utilization(live_of(v, graph), graph).ratio), v

    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if at(mid)[0] > target:
            lo = mid
        else:
            hi = mid
    return at(hi)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def synthetic_batch(seed: int, n: int = 8, hw: int = 28, classes: int = 10) -> dict:
    """A Fashion-MNIST-shaped batch of noise: image (n, hw, hw, 1), label (n,), mask (n,)."""
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, hw, hw, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
        "mask": jnp.ones((n,), jnp.float32),
    }


def one_sgd_step(model: nn.Module, tx, variables: dict, x: jax.Array, labels: jax.Array):
    """One jitted training step of `model` with `tx` on (x, labels).

    Returns (variables, opt_state, loss) after the step, BN statistics updated.
    """

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(params):
            out, upd = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return nr_jax.nr_loss(out, labels), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {**variables, **upd, "params": params}, opt_state, loss

    return step(variables, tx.init(variables["params"]))
