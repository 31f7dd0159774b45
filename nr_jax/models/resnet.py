"""ResNets (v1, post-activation) for Neural Rejuvenation (method.md 2.3, 3.2, 5.3, 7.7, 7.11).

One flat Linen module builds every variant: all units are created inside one `@nn.compact`
`__call__` with unique names (`stem`, `s1b0_conv1`, ..., `s1b0_down`, `head`), so the keys of
`widths` are exactly the unit names. A unit is conv -> BN -> (ReLU); a block is

    branch   = conv1 -> ... -> conv_last (no ReLU)
    shortcut = x (identity) or down(x) (1x1 conv + BN, no ReLU) where the stride or width changes
    x        = relu(add(branch, shortcut))

`layers.add` records the residual tie, so the channel graph knows which units write into one
residual stream; liveness gives the stream one shared mask and rejuvenation one shared width.

Fixed units (method.md 2.3). Official rule (`prune_residual=False`, the default): the stem, the last
conv of every branch and every downsample conv are fixed (always live, no L1 on γ); only interior
branch convs are prunable (conv1 of a basic block, conv1 and conv2 of a bottleneck), so the
residual stream keeps every channel but still grows by r at rejuvenation (method.md 3.2).
`prune_residual=True` (our extension) leaves those units prunable: they get L1 pressure and a
stream channel is dropped when it is dead in every unit tied to the stream.

Variants:

* CIFAR (`resnet164_cifar`): the official `resnet --depth 110`, which is the 164-layer v1
  bottleneck net because depth = 6n+2 is used for both block types (n = 18 blocks per stage,
  method.md 5.2). 3x3 stem 3->16, planes 16/32/64, expansion 4 (streams 64/128/256), stride on the
  3x3 conv, 1x1 downsample where stride or width changes (also block 0 of stage 1: 16 -> 64).
  Classifier: He normal with fan-out = num_classes, i.e. N(0, 2/K), and the PyTorch default bias
  U(-1/sqrt(C), 1/sqrt(C)) (method.md 7.7). 1,704,154 params (C10), 1,727,284 (C100),
  0.248 GMACs at 32x32 (method.md 5.3).
* ImageNet (`resnet18/34/50/101`): torchvision layout, 7x7/2 stem (64) + BN + ReLU, max-pool 3x3/2
  (padding 1), stages 64/128/256/512 with strides 1/2/2/2, basic or bottleneck blocks with the
  stride on the 3x3 conv of the bottleneck (torchvision v1.5; the official `resnet*_nr` counts of
  method.md 5.3 are the torchvision ones: 4.087 GMACs for ResNet-50 needs the stride on the 3x3).
  Classifier: torchvision's `nn.Linear` default init, weight and bias U(-1/sqrt(C), 1/sqrt(C)) (the
  official ImageNet init of the classifier is not documented in method.md; this is our choice).

Conv kernels use He normal with fan-out (`layers.he_fan_out`, the official/torchvision conv init);
BN γ starts at 1.0 for every ResNet (method.md 7.7).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import layers
from nr_jax.models import register, scaled_width

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
HEAD_INITS = ("he_fan_out", "torchvision")
EXPANSION = {"basic": 1, "bottleneck": 4}


def _uniform(bound: float) -> Callable[..., jax.Array]:
    """U(-bound, bound), PyTorch's default Linear/Conv init with bound = 1/sqrt(fan_in)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ResNet(nn.Module):
    """A v1 (post-activation) ResNet built from NR units, flat (no nested submodules).

    Attributes:
      stage_sizes: blocks per stage.
      block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with expansion 4).
      planes: branch width (planes) per stage; stream width = planes * expansion.
      strides: stride of the first block of each stage.
      stem: "cifar" (3x3 conv, no pool) or "imagenet" (7x7/2 conv, max-pool 3x3/2).
      stem_width: output channels of the stem conv.
      num_classes: classifier outputs.
      widths: per-unit width overrides (filled by `nr_jax.rejuvenate`).
      scheme: how old and new neurons mix after rejuvenation (`nr_jax.layers.SCHEMES`).
      bias_in_both_heads: the official doubled classifier bias (method.md 7.6).
      prune_residual: False (official): stem, last branch convs and downsample convs are fixed;
        True: they are prunable too and residual stream channels can be reclaimed.
      head_init: "he_fan_out" (official CIFAR ResNet, method.md 7.7) or "torchvision".
      gamma_init: initial BN scale (official ResNet: 1.0).
      dtype: computation dtype (None: float32).
      conv_weight_grad: kernel-gradient mode of every unit (`nr_jax.layers.NRConv`).
      batch_chunks: whether unit kernel gradients sum over batch chunks (False when the batch is
        sharded over several devices; `nr_jax.layers.NRConv`).
      width_multiplier: every unit's default width (stem, planes, planes * expansion) is scaled
        by it and rounded (`nr_jax.models.scaled_width`).
    """

    stage_sizes: tuple[int, ...]
    block: str = "bottleneck"
    planes: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (1, 2, 2)
    stem: str = "cifar"
    stem_width: int = 16
    num_classes: int = 10
    widths: layers.WidthSpec = layers.WidthSpec()
    scheme: str = "removed"
    bias_in_both_heads: bool = False
    prune_residual: bool = False
    head_init: str = "he_fan_out"
    gamma_init: float = 1.0
    dtype: Any = None
    conv_weight_grad: str = "auto"
    batch_chunks: bool = True
    width_multiplier: float = 1.0

    def _unit(
        self,
        name: str,
        features: int,
        kernel_size: int,
        strides: int = 1,
        fixed: bool = False,
        activation: Any = nn.relu,
    ) -> layers.NRConv:
        return layers.conv_unit(
            self.widths,
            name,
            scaled_width(features, self.width_multiplier),
            kernel_size=kernel_size,
            strides=strides,
            fixed=fixed,
            activation=activation,
            gamma_init=self.gamma_init,
            scheme=self.scheme,
            dtype=self.dtype,
            conv_weight_grad=self.conv_weight_grad,
            batch_chunks=self.batch_chunks,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: images (B, H, W, C) -> logits (B, K), or (B, 2, K) after rejuvenation."""
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: block must be one of {BLOCKS}, got {self.block!r}")
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {STEMS}, got {self.stem!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(
                f"ResNet: head_init must be one of {HEAD_INITS}, got {self.head_init!r}"
            )
        if not len(self.stage_sizes) == len(self.planes) == len(self.strides):
            raise ValueError("ResNet: stage_sizes, planes and strides must have the same length")
        tied = not self.prune_residual  # stream writers are fixed under the official rule
        if self.stem == "cifar":
            x = self._unit("stem", self.stem_width, 3, fixed=tied)(x, train)
        else:
            x = self._unit("stem", self.stem_width, 7, strides=2, fixed=tied)(x, train)
            x = layers.max_pool(x, 3, 2, padding=((1, 1), (1, 1)))
        in_planes = scaled_width(self.stem_width, self.width_multiplier)  # default stream width
        expansion = EXPANSION[self.block]
        for s, (n, planes, stride) in enumerate(
            zip(self.stage_sizes, self.planes, self.strides, strict=True), start=1
        ):
            out_planes = planes * expansion
            for b in range(n):
                name = f"s{s}b{b}"
                st = stride if b == 0 else 1
                if self.block == "basic":
                    y = self._unit(f"{name}_conv1", planes, 3, strides=st)(x, train)
                    y = self._unit(f"{name}_conv2", out_planes, 3, fixed=tied, activation=None)(
                        y, train
                    )
                else:
                    y = self._unit(f"{name}_conv1", planes, 1)(x, train)
                    y = self._unit(f"{name}_conv2", planes, 3, strides=st)(y, train)
                    y = self._unit(f"{name}_conv3", out_planes, 1, fixed=tied, activation=None)(
                        y, train
                    )
                if st != 1 or in_planes != scaled_width(out_planes, self.width_multiplier):
                    shortcut = self._unit(
                        f"{name}_down", out_planes, 1, strides=st, fixed=tied, activation=None
                    )(x, train)
                else:
                    shortcut = x
                x = layers.relu(layers.add(y, shortcut))
                in_planes = scaled_width(out_planes, self.width_multiplier)
        fan_in = x.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        if self.head_init == "he_fan_out":  # 1x1 conv head: std sqrt(2 / (1*1*K))
            kernel_init = nn.initializers.normal(math.sqrt(2.0 / self.num_classes))
        else:
            kernel_init = _uniform(bound)
        head = layers.classifier_unit(
            self.widths,
            self.num_classes,
            bias_in_both_heads=self.bias_in_both_heads,
            kernel_init=kernel_init,
            bias_init=_uniform(bound),
            dtype=self.dtype,
        )
        return head(x)


def _cifar(
    n: int, planes: tuple[int, ...] = (16, 32, 64), block: str = "bottleneck", **kwargs: Any
) -> ResNet:
    strides = (1,) + (2,) * (len(planes) - 1)
    return ResNet(
        stage_sizes=(n,) * len(planes),
        block=block,
        planes=planes,
        strides=strides,
        stem="cifar",
        stem_width=planes[0],
        head_init="he_fan_out",
        **kwargs,
    )


def _imagenet(stage_sizes: tuple[int, ...], block: str, **kwargs: Any) -> ResNet:
    return ResNet(
        stage_sizes=stage_sizes,
        block=block,
        planes=(64, 128, 256, 512),
        strides=(1, 2, 2, 2),
        stem="imagenet",
        stem_width=64,
        head_init="torchvision",
        **kwargs,
    )


# CIFAR ResNet-164: the official `resnet --depth 110` (6n+2 with n = 18, bottleneck blocks).
register("resnet164_cifar")(functools.partial(_cifar, 18))
register("resnet18")(functools.partial(_imagenet, (2, 2, 2, 2), "basic"))
register("resnet34")(functools.partial(_imagenet, (3, 4, 6, 3), "basic"))
register("resnet50")(functools.partial(_imagenet, (3, 4, 6, 3), "bottleneck"))
register("resnet101")(functools.partial(_imagenet, (3, 4, 23, 3), "bottleneck"))
# Tiny variants for tests: a 3-stage bottleneck net (2 blocks per stage, planes 4/8/16, streams
# 16/32/64) and a 2-stage basic-block net (2 blocks per stage, widths 8/16).
# ResNet-20 (He et al. 2016, CIFAR: 3 stages of 3 basic blocks, widths 16/32/64), with 1x1
# projection shortcuts where the shape changes (option B); the reference net of performance-notes.
register("resnet20_cifar")(functools.partial(_cifar, 3, (16, 32, 64), "basic"))
register("resnet_tiny_cifar")(functools.partial(_cifar, 2, (4, 8, 16)))
register("resnet_tiny_basic")(functools.partial(_cifar, 2, (8, 16), "basic"))
# CPU-sized bottleneck ResNet-20 for the Fashion-MNIST table (56,610 params, 6.4M MACs at 28x28)
register("resnet_fmnist")(functools.partial(_cifar, 2, (8, 16, 32)))
