"""A plain CNN without BatchNorm for Neural Rejuvenation beyond BN scales (issue 16).

The VGG chain of `nr_jax.models.vgg` (3x3 convs and 2x2 max-pools, global average pooling, the NR
classifier), but every unit is conv (with bias) -> ReLU, without normalisation: no unit has a
scale γ, so liveness needs another criterion (`nr_jax.criteria`: "outgoing", the norm of each
channel's outgoing weights, under the `nr_jax.group_lasso` pressure; or "dormancy", ReDo's
activation score). `norm="group"` or `"layer"` gives the same chain with GroupNorm or LayerNorm
(criterion "norm", under the L1 pressure on their scales, `nr_jax.l1_bn_scales`). No unit is
fixed.

Which pressure goes with which model (the library's recommendation; `nr_jax.criteria`):
`cnn_nobn_fmnist` group lasso + "outgoing"; `cnn_gn_fmnist` L1 on the GroupNorm scales +
"norm".
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from nr_jax import layers
from nr_jax.models import register, scaled_width

M = "M"  # max-pool 2x2 in a cfg
CNN_FMNIST = (16, 16, M, 32, 32, M, 64, 64)
CNN_TINY = (8, M, 16, 16)


class CNN(nn.Module):
    """A chain of NR conv units (no BatchNorm by default) and max-pools, then the classifier.

    Attributes:
      cfg: channel counts of the convs in order, with "M" for a 2x2 max-pool.
      num_classes: classifier outputs.
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      norm: the units' normalisation: None (default: conv with bias -> ReLU), "group", "layer"
        or "batch" (`nr_jax.norms.NORMS`).
      num_groups: GroupNorm's number of groups per unit.
      gamma_init: initial normalisation scale (unused without normalisation).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      dtype: computation dtype (None: float32).
      conv_weight_grad: kernel-gradient mode of every unit (`nr_jax.layers.NRConv`).
      batch_chunks: whether unit kernel gradients sum over batch chunks (`nr_jax.layers.NRConv`).
      width_multiplier: every conv's default width is scaled by it and rounded
        (`nr_jax.models.scaled_width`).
    """

    cfg: tuple[Any, ...]
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
        i = 0
        for v in self.cfg:
            if v == M:
                x = layers.max_pool(x, 2)
                continue
            x = layers.conv_unit(
                self.widths,
                f"conv{i}",
                scaled_width(v, self.width_multiplier),
                kernel_size=3,
                norm=self.norm,
                num_groups=self.num_groups,
                gamma_init=self.gamma_init,
                scheme=self.scheme,
                dtype=self.dtype,
                conv_weight_grad=self.conv_weight_grad,
                batch_chunks=self.batch_chunks,
            )(x, train)
            i += 1
        head = layers.classifier_unit(
            self.widths,
            self.num_classes,
            bias_in_both_heads=self.bias_in_both_heads,
            dtype=self.dtype,
        )
        return head(x)


register("cnn_nobn_fmnist")(functools.partial(CNN, CNN_FMNIST))
register("cnn_nobn_tiny")(functools.partial(CNN, CNN_TINY))
register("cnn_gn_fmnist")(functools.partial(CNN, CNN_FMNIST, norm="group"))
