"""`export_inference`: the exported network as a serialised `jax.export` artefact.

The jitted inference function with its weights as constants and a symbolic batch dimension
(`jax.export.symbolic_shape("b, H, W, C")`): `jax.export.deserialize(blob).call(x)` runs it,
without nr_jax or Flax, at any batch size. Serialisation needs the flatbuffers package.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nr_jax.compact.network import ExportedNet

__all__ = ["export_inference"]


def export_inference(
    model: ExportedNet, variables: Any, example_shape: tuple[int, ...], *, batch: str = "b"
) -> bytes:
    """The exported network's inference function, serialised by `jax.export`, weights inside.

    Args:
      model, variables: what `export` returned.
      example_shape: (B, H, W, C) of an input batch; B becomes the symbolic dimension `batch`,
        H, W and C stay fixed (`jax.export.symbolic_shape(f"{batch}, H, W, C")`).
      batch: the name of the symbolic batch dimension.

    Returns:
      The bytes of `jax.export.export(...).serialize()`: `jax.export.deserialize(blob).call(x)`
      gives the logits (B, K) for float32 images x of any batch size B >= 1.
    """
    if not isinstance(model, ExportedNet):
        raise TypeError(
            f"export_inference: expected the ExportedNet that nr_jax.export returns, got "
            f"{type(model).__name__} (call nr_jax.export(model, variables) first)"
        )
    if len(example_shape) != 4:
        raise ValueError(
            f"export_inference: example_shape must be (B, H, W, C), not {example_shape}"
        )
    _, h, w, c = (int(d) for d in example_shape)
    shape = jax.export.symbolic_shape(f"{batch}, {h}, {w}, {c}")
    fn = jax.jit(lambda x: model.apply(variables, x))
    exported = jax.export.export(fn)(jax.ShapeDtypeStruct(shape, jnp.float32))
    return bytes(exported.serialize())
