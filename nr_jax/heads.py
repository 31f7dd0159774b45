"""Training the mix of old and new neurons: the two-logit loss and the summed prediction.

After rejuvenation the classifier returns two logits per example, z_old from the survivor
channels and z_new from the new ones, shape (B, 2, K) (method.md 4.3). The training loss is the sum
of two cross-entropies; the prediction is z_old + z_new. Before rejuvenation the classifier returns
(B, K) and both functions reduce to the ordinary ones, so a training loop never branches on the
phase.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _check(out: Array, labels: Array) -> None:
    if out.ndim not in (2, 3):
        raise ValueError(f"expected logits (B, K) or (B, 2, K), got shape {out.shape}")
    if labels.shape != out.shape[:1]:
        raise ValueError(f"labels must have shape {out.shape[:1]}, got {labels.shape}")


def nr_loss(out: Array, labels: Array, weights: Array | None = None) -> Array:
    """Mean softmax cross-entropy, summed over the logit heads (method.md 4.3).

    Args:
      out: logits (B, K) before rejuvenation, or (B, 2, K) after it.
      labels: integer class labels (B,).
      weights: optional per-example weights (B,) (e.g. 0 on padding); the mean is weighted.

    Returns:
      Scalar loss: CE(out) before rejuvenation; CE(z_old) + CE(z_new) after it.
    """
    _check(out, labels)
    heads = out if out.ndim == 3 else out[:, None, :]
    labels_b = jnp.broadcast_to(labels[:, None], heads.shape[:2])
    ce = optax.softmax_cross_entropy_with_integer_labels(heads.astype(jnp.float32), labels_b)
    if weights is None:
        return jnp.sum(jnp.mean(ce, axis=0))
    w = weights.astype(jnp.float32)[:, None]
    return jnp.sum(jnp.sum(ce * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0))


def predict(out: Array) -> Array:
    """Evaluation logits (B, K): `out` itself before rejuvenation, z_old + z_new after it."""
    if out.ndim == 3:
        return jnp.sum(out, axis=1)
    if out.ndim != 2:
        raise ValueError(f"expected logits (B, K) or (B, 2, K), got shape {out.shape}")
    return out


def head_logits(out: Array) -> dict[str, Array]:
    """Named logits for metrics: {"sum"} before rejuvenation, {"old", "new", "sum"} after it."""
    if out.ndim == 3:
        return {"old": out[:, 0], "new": out[:, 1], "sum": jnp.sum(out, axis=1)}
    return {"sum": out}
