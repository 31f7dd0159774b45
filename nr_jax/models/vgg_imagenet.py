"""ImageNet VGG-16 in the official NR form (`vgg16_nr`, `vgg_ori.py`, method.md 7.13).

The VGG-16 conv stack without its last max-pool (14x14 maps at 224x224), a 14x14 average pool,
then FC6 and FC7 as 1x1-conv NR units (512 -> 4096 -> 4096, each with BN and ReLU, prunable like
every conv here), then the classifier. This is 37.707M parameters and 15.366 GMACs at 224x224
(method.md 5.3): FC6/FC7 act on a 1x1 map, so they cost their weight count in MACs. BN γ starts
at 0.5 (ImageNet VGG, method.md 7.7), the classifier at N(0, 0.01) with zero bias.

Unit names: ``conv0`` ... ``conv12``, ``fc6``, ``fc7``, ``head``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from nr_jax import layers
from nr_jax.models import register, scaled_width

M = "M"  # max-pool 2x2 in a cfg
VGG16_NR = (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512)
VGG_IMAGENET_TINY = (8, M, 16, M, 16)  # 28x28 -> 7x7, then a 7x7 average pool


class VGGImageNet(nn.Module):
    """Conv stack -> average pool -> 1x1-conv FC units -> NR classifier.

    Attributes:
      cfg: channel counts of the convs in order, with "M" for a 2x2 max-pool.
      fc: output channels of the 1x1-conv FC units (named fc6, fc7, ...).
      pool: window (and stride) of the average pool after the conv stack.
      num_classes: classifier outputs.
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      gamma_init: initial BN scale (official ImageNet VGG: 0.5).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      dtype: computation dtype (None: float32).
      conv_weight_grad: kernel-gradient mode of every unit (`nr_jax.layers.NRConv`).
      batch_chunks: whether unit kernel gradients sum over batch chunks (False when the batch is
        sharded over several devices; `nr_jax.layers.NRConv`).
      width_multiplier: every conv and FC unit's default width is scaled by it and rounded
        (`nr_jax.models.scaled_width`).
    """

    cfg: tuple[Any, ...] = VGG16_NR
    fc: tuple[int, ...] = (4096, 4096)
    pool: int = 14
    num_classes: int = 1000
    widths: layers.WidthSpec = layers.WidthSpec()
    gamma_init: float = 0.5
    scheme: str = "removed"
    bias_in_both_heads: bool = False
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    width_multiplier: float = 1.0

    def _unit(self, name: str, features: int, kernel_size: int) -> layers.NRConv:
        return layers.conv_unit(
            self.widths,
            name,
            scaled_width(features, self.width_multiplier),
            kernel_size=kernel_size,
            gamma_init=self.gamma_init,
            scheme=self.scheme,
            dtype=self.dtype,
            conv_weight_grad=self.conv_weight_grad,
            batch_chunks=self.batch_chunks,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: images (B, H, W, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        i = 0
        for v in self.cfg:
            if v == M:
                x = layers.max_pool(x, 2)
                continue
            x = self._unit(f"conv{i}", v, 3)(x, train)
            i += 1
        if x.shape[1] < self.pool or x.shape[2] < self.pool:
            raise ValueError(
                f"VGGImageNet: the conv stack gives {x.shape[1]}x{x.shape[2]} maps, smaller than "
                f"the {self.pool}x{self.pool} average pool; use a larger input or a smaller pool"
            )
        x = layers.avg_pool(x, self.pool)
        for j, v in enumerate(self.fc):
            x = self._unit(f"fc{6 + j}", v, 1)(x, train)
        head = layers.classifier_unit(
            self.widths,
            self.num_classes,
            bias_in_both_heads=self.bias_in_both_heads,
            dtype=self.dtype,
        )
        return head(x)


register("vgg16_imagenet")(VGGImageNet)
register("vgg_imagenet_tiny")(
    functools.partial(VGGImageNet, VGG_IMAGENET_TINY, (32, 32), 7, num_classes=10)
)
