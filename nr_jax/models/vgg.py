"""VGG with BN for Neural Rejuvenation (official CIFAR `vgg19_bn`, method.md 7.10).

The official CIFAR "VGG-19" keeps the standard VGG-19 channel sequence (20.04M parameters) but only
two max-pools, after the 4th and the 10th conv, so the last maps are 8x8 (2.6 GMACs at 32x32).
BN γ starts at 0.5 (method.md 7.7), the classifier at N(0, 0.01) with zero bias. No unit is fixed:
every conv, stem included, can lose neurons (method.md 2.3).

Beyond BatchNorm (issue 16): the same chain with `norm=None` (conv with bias -> ReLU, no scale γ:
liveness by another criterion, `nr_jax.criteria`: "outgoing" under the `nr_jax.group_lasso`
pressure, or "dormancy") is registered as `cnn_nobn_fmnist` / `cnn_nobn_tiny`, and with GroupNorm
as `cnn_gn_fmnist` (criterion "norm", L1 on the GroupNorm scales).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from nr_jax import layers
from nr_jax.models import register, scaled_width

M = "M"  # max-pool 2x2 in a cfg
VGG19_CIFAR = (64, 64, 128, 128, M, 256, 256, 256, 256, 512, 512, M, 512, 512, 512, 512, 512, 512)
VGG_FMNIST = (16, 16, M, 32, 32, M, 64, 64)
VGG_TINY = (8, M, 16, 16)


class VGG(nn.Module):
    """A plain chain of NR units and max-pools, then the NR classifier.

    Attributes:
      cfg: channel counts of the convs in order, with "M" for a 2x2 max-pool.
      num_classes: classifier outputs.
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      norm: the units' normalisation: "batch" (default), "group", "layer" or None (conv with
        bias, no normalisation; `nr_jax.layers.NRConv`).
      num_groups: GroupNorm's number of groups per unit.
      gamma_init: initial normalisation scale (official VGG: 0.5; unused without one).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      dtype: computation dtype (None: float32).
      conv_weight_grad: kernel-gradient mode of every unit (`nr_jax.layers.NRConv`).
      batch_chunks: whether unit kernel gradients sum over batch chunks (False when the batch is
        sharded over several devices; `nr_jax.layers.NRConv`).
      width_multiplier: every conv's default width `cfg` value is scaled by it and rounded
        (`nr_jax.models.scaled_width`).
    """

    cfg: tuple[Any, ...]
    num_classes: int = 10
    widths: layers.WidthSpec = layers.WidthSpec()
    norm: str | None = "batch"
    num_groups: int = 4
    gamma_init: float = 0.5
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


register("vgg19_cifar")(functools.partial(VGG, VGG19_CIFAR))
register("vgg_fmnist")(functools.partial(VGG, VGG_FMNIST))
register("vgg_tiny")(functools.partial(VGG, VGG_TINY))
# beyond BatchNorm (issue 16): the same chains without normalisation, or with GroupNorm
register("cnn_nobn_fmnist")(functools.partial(VGG, VGG_FMNIST, norm=None, gamma_init=1.0))
register("cnn_nobn_tiny")(functools.partial(VGG, VGG_TINY, norm=None, gamma_init=1.0))
register("cnn_gn_fmnist")(functools.partial(VGG, VGG_FMNIST, norm="group", gamma_init=1.0))
