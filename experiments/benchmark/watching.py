"""1. Watching overhead: the NR train step against the same model without NR and a plain Flax
VGG of the same shapes."""

from __future__ import annotations

import statistics
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments.benchmark.common import FLAGS, interleaved_times, make_trainer, synthetic_batch


class PlainVGG(nn.Module):
    """A plain Flax VGG with the shapes of `vgg_fmnist` (no masks, no NR)."""

    cfg: tuple = (16, 16, "M", 32, 32, "M", 64, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(v, (3, 3), padding=1, use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def plain_step(batch: dict) -> tuple[Any, Any]:
    model = PlainVGG()
    variables = jax.jit(lambda k: model.init(k, batch["image"][:1], train=False))(jax.random.key(0))
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = (variables, tx.init(variables["params"]))

    @jax.jit
    def step(state: Any, batch: dict) -> tuple[Any, Any]:
        variables, opt_state = state

        def loss_fn(params: Any) -> Any:
            out, upd = model.apply(
                {**variables, "params": params}, batch["image"], mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(out, batch["label"]).mean()
            return loss, upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return ({**variables, **upd, "params": params}, opt_state), {"loss": loss}

    return step, state


def watching_overhead(reps: int, steps: int) -> dict:
    """NR step against the same model without NR (and a plain Flax VGG).

    The machine's speed drifts by several percent over a minute, more than the overhead to be
    measured, so every repetition times the candidates back to back (order reversed every other
    repetition) and the overhead is the median of the per-repetition ratios.
    """
    batch = synthetic_batch(FLAGS.batch)
    out = {}
    for model in ("vgg_fmnist", "resnet_fmnist"):
        t_nr, s_nr = make_trainer(model, nr=True)
        t_off, s_off = make_trainer(model, nr=False)
        cands = {"nr": (t_nr.steps.train, s_nr), "no_nr": (t_off.steps.train, s_off)}
        if model == "vgg_fmnist":
            cands["plain_flax"] = plain_step(batch)
        times = interleaved_times(cands, batch, reps, steps, alternate=True)
        ratios = {
            k: [x / y for x, y in zip(times["nr"], times[k], strict=True)]
            for k in cands
            if k != "nr"
        }
        out[model] = {
            "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "repetitions": reps,
            "overhead_vs_no_nr": statistics.median(ratios["no_nr"]) - 1,
            "overhead_vs_no_nr_quartiles": [q - 1 for q in statistics.quantiles(ratios["no_nr"])],
            **(
                {"overhead_vs_plain_flax": statistics.median(ratios["plain_flax"]) - 1}
                if "plain_flax" in ratios
                else {}
            ),
        }
    return out
