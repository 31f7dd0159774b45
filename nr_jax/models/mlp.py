"""An MLP for Neural Rejuvenation: dense units (MLP hidden neurons) go through the same graph.

The image is flattened (`nr_jax.layers.flatten`), then hidden `NRDense` units (dense with bias ->
ReLU, no normalisation by default), then the NR classifier, which reads the last hidden layer's
neurons directly. Rejuvenation drops dead neurons and widens every hidden layer by the same rule
as conv units; the classifier gets the two heads. The first hidden layer reads the image, whose
features never grow: its new neurons read every pixel.

Which pressure goes with which model (the library's recommendation; `nr_jax.criteria`):
`mlp_fmnist` no pressure and "dormancy" (ReDo's score: neurons that go dormant in ordinary
training are rejuvenated), or the group lasso (`nr_jax.group_lasso`) with "outgoing".
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from nr_jax import layers
from nr_jax.models import register, scaled_width

MLP_FMNIST = (256, 128)
MLP_TINY = (16, 8)


class MLP(nn.Module):
    """Flatten -> hidden `NRDense` units -> the NR classifier.

    Attributes:
      hidden: the hidden layers' widths in order.
      num_classes: classifier outputs.
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      norm: the hidden units' normalisation: None (default: dense with bias -> ReLU), "layer",
        "group" or "batch" (`nr_jax.norms.NORMS`).
      num_groups: GroupNorm's number of groups per unit.
      gamma_init: initial normalisation scale (unused without normalisation).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      dtype: computation dtype (None: float32).
      conv_weight_grad, batch_chunks: accepted like every family's (the trainer sets them);
        unused, an MLP has no convolution.
      width_multiplier: every hidden layer's default width is scaled by it and rounded
        (`nr_jax.models.scaled_width`).
    """

    hidden: tuple[int, ...]
    num_classes: int = 10
    widths: layers.WidthSpec = layers.WidthSpec()
    norm: str | None = None
    num_groups: int = 4
    gamma_init: float = 1.0
    scheme: str = "removed"
    bias_in_both_heads: bool = False
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    width_multiplier: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: images (B, H, W, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        x = layers.flatten(x)
        for i, features in enumerate(self.hidden):
            x = layers.dense_unit(
                self.widths,
                f"dense{i}",
                scaled_width(features, self.width_multiplier),
                norm=self.norm,
                num_groups=self.num_groups,
                gamma_init=self.gamma_init,
                scheme=self.scheme,
                dtype=self.dtype,
                conv_weight_grad=self.conv_weight_grad,
                batch_chunks=self.batch_chunks,
            )(x, train)
        head = layers.classifier_unit(
            self.widths,
            self.num_classes,
            bias_in_both_heads=self.bias_in_both_heads,
            dtype=self.dtype,
        )
        return head(x)


register("mlp_fmnist")(functools.partial(MLP, MLP_FMNIST))
register("mlp_tiny")(functools.partial(MLP, MLP_TINY))
