"""DenseNet for Neural Rejuvenation, post-activation as the official NR code (method.md 7.11/7.12).

Every convolution is an NR unit conv -> BN -> ReLU, so each conv owns a BN γ, and none is fixed:
the stem, both convs of every dense layer and every transition conv can lose neurons (method.md
2.3). Layout:

* CIFAR DenseNet-BC (``stem="cifar"``): 3x3 stem conv 3 -> 2k; dense layer = 1x1 conv (4k) ->
  3x3 conv (k); transition = 1x1 conv (compression 0.5, floor) -> 2x2 average pool; no BN-ReLU
  before the classifier (global average pooling -> dense). Depth 100 has 16 dense layers per
  block: k = 40 gives 8.269M (C10) / 8.372M (C100) parameters and 3.194 GMACs at 32x32 (5.3).
* ImageNet DenseNet-121 (``stem="imagenet"``): 7x7/2 stem conv (64) -> 3x3/2 max pool (pad 1),
  blocks (6, 12, 24, 16), k = 32, bottleneck 4k: 7.916M parameters, 2.833 GMACs at 224x224.

BN γ starts at 1.0 and the classifier at N(0, 0.01) with zero bias (method.md 7.7).

Concatenations (method.md 7.5): the model keeps the list of feature tensors of the current block
(the stem or transition output first, then every dense layer's 3x3 output, in order) and builds
each consumer's input with one `layers.concat` call over that list. After rejuvenation every
producer's output is laid out [survivors, new] and the consumer must see [survivors of every
producer, new channels of every producer]; `layers.concat(features, splits=...)` does exactly that
with each producer's survivor count (`out_split` of its `UnitWidth`). Input widths are never
stored: a unit's D_in is the channel count of the concatenation it receives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from nr_jax import layers
from nr_jax.models import register, scaled_width

STEMS = ("cifar", "imagenet")


class DenseNet(nn.Module):
    """A post-activation DenseNet(-BC) built flat from NR units.

    Unit names: ``stem``; ``b{block}l{layer}_conv1`` (1x1 bottleneck) and ``b{block}l{layer}_conv2``
    (3x3 growth conv), both 1-based; ``t{block}`` (the transition after block ``block``); ``head``.

    Attributes:
      blocks: dense layers per block.
      growth: growth rate k (output channels of every 3x3 conv).
      num_classes: classifier outputs.
      stem_features: output channels of the stem (None: 2k, the DenseNet-BC rule).
      bn_size: bottleneck width factor (1x1 conv outputs bn_size * k channels).
      compression: transition output = floor(compression * input channels).
      stem: "cifar" (3x3 stride-1 conv) or "imagenet" (7x7/2 conv then 3x3/2 max pool).
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      gamma_init: initial BN scale (official DenseNet: 1.0).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      dtype: computation dtype (None: float32).
      conv_weight_grad: kernel-gradient mode of every unit (`nr_jax.layers.NRConv`).
      batch_chunks: whether unit kernel gradients sum over batch chunks (False when the batch is
        sharded over several devices; `nr_jax.layers.NRConv`).
      width_multiplier: the stem, bottleneck and growth widths are scaled by it and rounded
        (`nr_jax.models.scaled_width`); a transition keeps `compression` of the channels it
        receives.
    """

    blocks: tuple[int, ...]
    growth: int
    num_classes: int = 10
    stem_features: int | None = None
    bn_size: int = 4
    compression: float = 0.5
    stem: str = "cifar"
    widths: layers.WidthSpec = layers.WidthSpec()
    gamma_init: float = 1.0
    scheme: str = "removed"
    bias_in_both_heads: bool = False
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    width_multiplier: float = 1.0

    def _unit(self, name: str, features: int, kernel_size: int, strides: int = 1) -> layers.NRConv:
        return layers.conv_unit(
            self.widths,
            name,
            features,
            kernel_size=kernel_size,
            strides=strides,
            gamma_init=self.gamma_init,
            scheme=self.scheme,
            dtype=self.dtype,
            conv_weight_grad=self.conv_weight_grad,
            batch_chunks=self.batch_chunks,
        )

    def _concat(self, features: Sequence[jax.Array], names: Sequence[str]) -> jax.Array:
        """One concatenation of a block's features, in the [survivors, new] layout after NR."""
        splits = [self.widths.get(n, 0).out_split for n in names]
        if all(s is None for s in splits):
            return layers.concat(features)
        if any(s is None for s in splits):
            missing = [n for n, s in zip(names, splits, strict=True) if s is None]
            raise ValueError(
                f"DenseNet: the widths give split points for some producers of a concatenation "
                f"but not for {missing}; a rejuvenated WidthSpec must cover every unit"
            )
        return layers.concat(features, splits=splits)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: images (B, H, W, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        if self.stem not in STEMS:
            raise ValueError(f"DenseNet: stem must be one of {STEMS}, got {self.stem!r}")
        if not self.blocks or any(n < 1 for n in self.blocks):
            raise ValueError(f"DenseNet: blocks must be positive layer counts, got {self.blocks}")
        m = self.width_multiplier
        k, bottleneck = scaled_width(self.growth, m), scaled_width(self.bn_size * self.growth, m)
        channels = scaled_width(self.stem_features or 2 * self.growth, m)  # nominal (pre-NR) count
        if self.stem == "cifar":
            x = self._unit("stem", channels, 3)(x, train)
        else:
            x = self._unit("stem", channels, 7, strides=2)(x, train)
            x = layers.max_pool(x, 3, 2, padding=((1, 1), (1, 1)))
        features, names = [x], ["stem"]
        for b, n_layers in enumerate(self.blocks, start=1):
            for i in range(1, n_layers + 1):
                h = self._concat(features, names)
                h = self._unit(f"b{b}l{i}_conv1", bottleneck, 1)(h, train)
                h = self._unit(f"b{b}l{i}_conv2", k, 3)(h, train)
                features.append(h)
                names.append(f"b{b}l{i}_conv2")
                channels += k
            h = self._concat(features, names)
            if b == len(self.blocks):
                break
            channels = int(math.floor(channels * self.compression))
            x = self._unit(f"t{b}", channels, 1)(h, train)
            x = layers.avg_pool(x, 2)
            features, names = [x], [f"t{b}"]
        head = layers.classifier_unit(
            self.widths,
            self.num_classes,
            bias_in_both_heads=self.bias_in_both_heads,
            dtype=self.dtype,
        )
        return head(h)


def densenet_bc(depth: int, growth: int, **kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-BC of `depth` = 6n + 4 (n dense layers per block, 3 blocks)."""
    if (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    return DenseNet(blocks=(n, n, n), growth=growth, **kwargs)


register("densenet_bc100_k40_cifar")(functools.partial(densenet_bc, 100, 40))
register("densenet_bc100_k12_cifar")(functools.partial(densenet_bc, 100, 12))
register("densenet121")(
    functools.partial(DenseNet, (6, 12, 24, 16), 32, num_classes=1000, stem="imagenet")
)
register("densenet_tiny")(functools.partial(DenseNet, (2, 2), 4))
