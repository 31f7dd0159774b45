"""The exported network: the source model's wiring with every NR unit replaced by plain modules.

Between its units an NR model only applies parameter-free, channel-wise functions
(`nr_jax.layers`: pools, ReLUs, residual sums, concatenations). `ExportedNet` keeps the source
model at the compact widths as its `wiring` (a `WidthSpec` listing the live channels of every
unit, in the same [survivors, new] order, so every concatenation lays them out as the consumers'
kernels expect) and runs its code with every NR unit replaced, through
`flax.linen.intercept_methods`, by the module that its `ExportedUnit` builds. No NR unit runs and
the wiring holds no variables; an exported network is computed in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nr_jax import layers
from nr_jax.compact.modules import (
    Bias,
    BlockConv,
    CrossAttention,
    GroupNormalize,
    Normalized,
    linear,
    output_shape,
)

__all__ = ["NR_UNITS", "Exported", "ExportedNet", "ExportedUnit", "GroupLayout"]

Array = jax.Array
# The units export replaces: convolutions, dense units (where nr_jax.layers has them), classifier.
NR_UNITS = tuple(
    getattr(layers, n) for n in ("NRConv", "NRDense", "NRClassifier") if hasattr(layers, n)
)
_zeros = nn.initializers.zeros_init()  # values come from `export`


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """The GroupNorm / LayerNorm of an exported unit (`GroupNormalize`'s fields).

    Attributes:
      groups: group sizes over the channels the linear part computes.
      spatial: GroupNorm (statistics over H, W too) or LayerNorm (at each position).
      keep: indices of the unit's outputs among those channels; None: all of them.
    """

    groups: tuple[int, ...]
    spatial: bool
    keep: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ExportedUnit:
    """How one NR unit of the source model is computed in the exported network.

    Attributes:
      name: the unit's name in the source model (its channel-graph name).
      kind: "conv" (one `nn.Conv` / `nn.Dense`), "bias" (`Bias`: no live input), "blocks"
        (`BlockConv`), "attention" (`CrossAttention`), "zeros" (every output masked: no
        parameters) or "head" (global average pooling, then one `nn.Dense`).
      features: channels the linear part computes (classes for the head): the live outputs,
        plus, with `norm`, the masked channels that share a group with them.
      kernel, strides: of the unit.
      in_split, out_split: live survivors among the inputs and the computed outputs ("blocks",
        "attention").
      activation: applied after the unit (the NR unit's own, e.g. ReLU), or None.
      dense: a dense unit (`nn.Dense`) rather than a convolution.
      bias: the linear part adds a bias (a folded BatchNorm, or the unit's own).
      scale: "attention" only: a scale per channel after the gate (a BatchNorm's).
      norm: the GroupNorm / LayerNorm after the linear part (`Normalized`), or None.
    """

    name: str
    kind: str
    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    in_split: int = 0
    out_split: int = 0
    activation: Callable[[Array], Array] | None = None
    dense: bool = False
    bias: bool = True
    scale: bool = False
    norm: GroupLayout | None = None

    @property
    def key(self) -> str:
        """The key of the unit's parameters in the exported network ("/" of nested names: ".")."""
        return self.name.replace("/", ".")

    def module(self) -> nn.Module | None:
        """The plain module computing the unit (None for "zeros")."""
        if self.kind == "head":
            return nn.Dense(self.features, kernel_init=_zeros, bias_init=_zeros, name=self.key)
        if self.norm is None or self.kind in ("bias", "zeros"):
            return self._linear(name=self.key)
        layout = self.norm
        norm = GroupNormalize(layout.groups, layout.spatial, layout.keep, parent=None)
        return Normalized(self._linear(parent=None), norm, name=self.key)

    def _linear(self, **kw: Any) -> nn.Module | None:
        k, s, n = self.kernel, self.strides, self.features
        if self.kind == "conv":
            return linear(self.dense, n, k, s, use_bias=self.bias, **kw)
        if self.kind == "bias":
            return Bias(n, k, s, **kw)
        if self.kind == "blocks":
            return BlockConv(n, self.in_split, self.out_split, k, s, self.bias, **kw)
        if self.kind == "attention":
            split = (self.in_split, self.out_split)
            return CrossAttention(n, *split, k, s, self.scale, self.bias, **kw)
        return None

    def __call__(self, module: nn.Module | None, x: Array) -> Array:
        """The unit's output from its input x (B, H, W, live inputs) or (B, live inputs)."""
        if self.kind == "head":
            spatial = tuple(range(1, x.ndim - 1))  # none for dense features (B, D)
            return module(jnp.mean(x.astype(jnp.float32), axis=spatial))
        if self.kind == "zeros":
            shape = output_shape(x, self.features, self.kernel, self.strides)
            return jnp.zeros(shape, jnp.float32)
        y = module(x.astype(jnp.float32))
        return y if self.activation is None else self.activation(y)


class ExportedNet(nn.Module):
    """The exported inference network: standard convolutions wired as the source model.

    Attributes:
      wiring: the source model at the compact widths; only its parameter-free code between units
        runs (see the module docstring).
      units: one `ExportedUnit` per NR unit of the source model, the classifier last.
    """

    wiring: nn.Module
    units: tuple[ExportedUnit, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: images (B, H, W, C) -> logits (B, K), as `nr_jax.predict` of the source model."""
        units = {u.name: u for u in self.units}
        modules = {u.name: u.module() for u in self.units}

        def replace(next_fun, args, kwargs, context):
            unit = context.module
            if context.method_name != "__call__" or not isinstance(unit, NR_UNITS):
                return next_fun(*args, **kwargs)
            name = "/".join(unit.scope.path)
            x = args[0] if args else kwargs["x"]
            return units[name](modules[name], x)

        with nn.intercept_methods(replace):
            return self.wiring.apply({}, x, train=False)


class Exported(NamedTuple):
    """What `export` returns: the plain network and its variables ({"params"})."""

    model: ExportedNet
    variables: dict[str, Any]
