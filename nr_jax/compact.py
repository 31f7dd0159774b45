"""Compact export: an NR model as a plain inference network of standard convolutions.

    net, net_vars = nr_jax.export(model, variables)        # before or after rejuvenation
    logits = net.apply(net_vars, x)                        # = nr_jax.predict(model.apply(...))
    blob = nr_jax.export_inference(net, net_vars, x.shape) # serialised `jax.export`, batch "b"
    y = jax.export.deserialize(blob).call(x)               # any batch size, weights inside

`export(model, variables)` returns an `Exported(model, variables)` pair: an `ExportedNet` and its
variables, which hold only `{"params"}`, with the network in its eval-mode form:

* every BatchNorm is folded into its convolution, which gets a bias: W' = W·s, b' = β - μ·s with
  s = γ / sqrt(σ² + 1e-5), per output channel (running statistics, as `model.apply(...,
  train=False)`); a unit without normalisation keeps its own bias, and a dense unit (`NRDense`,
  where `nr_jax.layers` has it) becomes `nn.Dense` the same way; GroupNorm and LayerNorm, which
  depend on each input, cannot be folded and are refused;
* there are no masks: masked-out channels are removed, and so are their consumers' input
  channels (the kernel rows that read them); a unit whose every live input is gone becomes its
  bias (`Bias`), a unit whose every output is masked becomes zeros, without parameters;
* there are no zero blocks: a split unit of the ``"removed"`` scheme (method.md 4.2) becomes one
  `nn.Conv` per block it uses, on channel slices (`BlockConv`: old->old and new->new, or one
  convolution where the unit has no new inputs); a split unit of the ``"attention"`` scheme keeps
  its four blocks (the cross blocks are trained) and its gate, in `CrossAttention`, which also
  keeps the BN scale per channel, because the gate 2σ(·) reads the pre-BN response;
* the classifier is global average pooling and one `nn.Dense`: after rejuvenation its two heads
  become their sum, the prediction (`nr_jax.predict`, method.md 4.3), the bias counted twice if
  the model says so (`bias_in_both_heads`, method.md 7.6).

Its parameters are the effective conv weights (the blocks actually computed, between live
channels), one bias per live output channel (plus the BN scale of each cross-attention output),
and the classifier's live columns and bias.

How it is wired: between its units an NR model only applies parameter-free, channel-wise
functions (`nr_jax.layers`: pools, ReLUs, residual sums, concatenations). `ExportedNet` keeps the
source model at the compact widths as its `wiring` (a `WidthSpec` listing the live channels of
every unit, in the same [survivors, new] order, so every concatenation lays them out as the
consumers' kernels expect) and runs its code with every NR unit replaced, through
`flax.linen.intercept_methods`, by the plain module that computes the unit's live channels. No NR
unit runs and the wiring holds no variables; an exported network is computed in float32.

`export_inference(net, net_vars, example_shape)` serialises the jitted inference function with
its weights as constants and a symbolic batch dimension (`jax.export.symbolic_shape("b, H, W,
C")`): `jax.export.deserialize(blob).call(x)` runs it, without nr_jax or Flax, at any batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nr_jax import layers
from nr_jax.graph import INPUT, ChannelGraph, Unit, channel_graph
from nr_jax.layers import MASKS, UnitWidth, WidthSpec

__all__ = [
    "BN_EPSILON",
    "Bias",
    "BlockConv",
    "CrossAttention",
    "Exported",
    "ExportedNet",
    "ExportedUnit",
    "export",
    "export_inference",
]

Array = jax.Array
BN_EPSILON = 1e-5  # of every NR unit's BatchNorm (`nr_jax.layers.NRConv`)
FOLDED_NORMS = ("batch", None)  # BatchNorm in eval mode, or none (a unit with a bias)
# The units export replaces: convolutions, dense units (where nr_jax.layers has them), classifier.
NR_UNITS = tuple(
    getattr(layers, n) for n in ("NRConv", "NRDense", "NRClassifier") if hasattr(layers, n)
)
DEFAULT_HW = 224  # spatial size of the trace that derives the channel graph (any size that fits)
_zeros = nn.initializers.zeros_init()  # values come from `export`; zeros also fit empty shapes


def output_shape(x: Array, features: int, kernel: tuple[int, int], strides: tuple[int, int]):
    """Output shape of an NR unit on x: (B, H', W', features) for a convolution (symmetric
    padding k // 2, `nr_jax.ops.padding`), (B, features) for a dense unit (x of rank 2)."""
    if x.ndim == 2:
        return (x.shape[0], features)
    hw = zip(x.shape[1:3], kernel, strides, strict=True)
    return (x.shape[0], *((n + 2 * (k // 2) - k) // s + 1 for n, k, s in hw), features)


def _linear(dense: bool, features: int, kernel, strides, **kw: Any) -> nn.Module:
    """`nn.Dense` (a dense unit) or `nn.Conv` with the NR unit's padding."""
    if dense:
        return nn.Dense(features, kernel_init=_zeros, bias_init=_zeros, **kw)
    pad = tuple((k // 2, k // 2) for k in kernel)
    return nn.Conv(
        features, kernel, strides, padding=pad, kernel_init=_zeros, bias_init=_zeros, **kw
    )


class Bias(nn.Module):
    """A unit without input channels: its bias at every output position.

    Attributes: features: output channels. kernel, strides: of the convolution it stands for.
    """

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, any) -> (B, H', W', features); (B, any) -> (B, features)."""
        bias = self.param("bias", _zeros, (self.features,))
        return jnp.broadcast_to(bias, output_shape(x, self.features, self.kernel, self.strides))


def _conv_or_bias(x: Array, features: int, kernel, strides, name: str) -> Array:
    """`nn.Conv` (`nn.Dense` for x of rank 2) over the channels of x, or its `Bias` when x has
    none."""
    if x.shape[-1] == 0:
        return Bias(features, kernel, strides, name=name)(x)
    return _linear(x.ndim == 2, features, kernel, strides, name=name)(x)


class BlockConv(nn.Module):
    """A split unit without cross connections (method.md 4.2, scheme "removed"): two convolutions.

    Old outputs (the first `out_split`) read the old inputs (the first `in_split`) through the
    child "old"; new outputs read the new inputs through "new". A block without output channels
    is absent; one without input channels is its `Bias`.

    Attributes: features: output channels. in_split, out_split: live survivors among the inputs
    and outputs. kernel, strides: of the unit.
    """

    features: int
    in_split: int
    out_split: int
    kernel: tuple[int, int]
    strides: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', features), [old, new] outputs."""
        blocks = (
            ("old", x[..., : self.in_split], self.out_split),
            ("new", x[..., self.in_split :], self.features - self.out_split),
        )
        parts = [
            _conv_or_bias(xs, n, self.kernel, self.strides, name) for name, xs, n in blocks if n > 0
        ]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


class CrossAttention(nn.Module):
    """A split unit with cross-attention (method.md 4.2), then its BN as a per-channel affine map.

    "from_old" convolves the old inputs into [ll, rl], "from_new" the new inputs into [lr, rr]
    (no bias; a child is absent when its inputs are, its output then zero);
    old = ll + 2σ(ll)·lr, new = rr + 2σ(rr)·rl, and y = [old, new] · scale + bias.

    Attributes: features: output channels. in_split, out_split: live survivors among the inputs
    and outputs. kernel, strides: of the unit.
    """

    features: int
    in_split: int
    out_split: int
    kernel: tuple[int, int]
    strides: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: (B, H, W, D_in) -> (B, H', W', features)."""
        zero = jnp.zeros(output_shape(x, self.features, self.kernel, self.strides), x.dtype)
        x_old, x_new = x[..., : self.in_split], x[..., self.in_split :]
        conv = lambda xs, name: (  # noqa: E731
            _linear(
                xs.ndim == 2, self.features, self.kernel, self.strides, use_bias=False, name=name
            )(xs)
            if xs.shape[-1]
            else zero
        )
        from_old, from_new = conv(x_old, "from_old"), conv(x_new, "from_new")
        k = self.out_split
        ll, rl, lr, rr = from_old[..., :k], from_old[..., k:], from_new[..., :k], from_new[..., k:]
        pre = jnp.concatenate(
            [ll + 2.0 * jax.nn.sigmoid(ll) * lr, rr + 2.0 * jax.nn.sigmoid(rr) * rl], axis=-1
        )
        scale = self.param("scale", _zeros, (self.features,))
        bias = self.param("bias", _zeros, (self.features,))
        lead = (1,) * (pre.ndim - 1)
        return pre * scale.reshape(*lead, -1) + bias.reshape(*lead, -1)


@dataclasses.dataclass(frozen=True)
class ExportedUnit:
    """How one NR unit of the source model is computed in the exported network.

    Attributes:
      name: the unit's name in the source model (its channel-graph name).
      kind: "conv" (one `nn.Conv`), "bias" (`Bias`: no live input), "blocks" (`BlockConv`),
        "attention" (`CrossAttention`), "zeros" (every output masked: no parameters) or "head"
        (global average pooling, then one `nn.Dense`).
      features: live output channels (classes for the head).
      kernel, strides: of the unit.
      in_split, out_split: live survivors among the inputs and outputs ("blocks", "attention").
      activation: applied after the unit (the NR unit's own, e.g. ReLU), or None.
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

    @property
    def key(self) -> str:
        """The key of the unit's parameters in the exported network ("/" of nested names: ".")."""
        return self.name.replace("/", ".")

    def module(self) -> nn.Module | None:
        """The plain module computing the unit (None for "zeros")."""
        k, s, name = self.kernel, self.strides, self.key
        if self.kind == "conv":
            return _linear(self.dense, self.features, k, s, name=name)
        if self.kind == "bias":
            return Bias(self.features, k, s, name=name)
        if self.kind in ("blocks", "attention"):
            cls = BlockConv if self.kind == "blocks" else CrossAttention
            return cls(self.features, self.in_split, self.out_split, k, s, name=name)
        if self.kind == "head":
            return nn.Dense(self.features, kernel_init=_zeros, bias_init=_zeros, name=name)
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


# ---------------------------------------------------------------------------------------------
# export: checks, live channels, folding
# ---------------------------------------------------------------------------------------------


def export(
    model: nn.Module, variables: Any, *, input_shape: tuple[int, ...] | None = None
) -> Exported:
    """The model as a plain inference network whose outputs equal `nr_jax.predict`'s.

    Args:
      model: an nr_jax model (a `widths: WidthSpec` field, units from `nr_jax.layers`), before or
        after rejuvenation, any scheme.
      variables: its {"params", "batch_stats"} ("batch_stats" where units have BatchNorm) and
        optionally "nr_masks" (a channel whose mask is 0 is removed; without masks every channel
        is kept).
      input_shape: (B, H, W, C) of a trace that derives the channel graph; default (1, 224, 224,
        C) with C read from the variables. The exported network takes any batch and image size
        the model takes.

    Returns:
      `Exported(model, variables)`: an `ExportedNet` and its {"params"} (float32 jax arrays), with
      `net.apply(net_vars, x) == nr_jax.predict(model.apply(variables, x, train=False))` up to
      float32 rounding.

    Raises:
      TypeError: `model` is not an nr_jax model.
      ValueError: the variables do not fit the model (other widths, missing collections), a mask
        is not 0/1, or masks cut a residual stream's channels in some of its units only.
    """
    if not isinstance(getattr(model, "widths", None), WidthSpec) or not isinstance(
        model, nn.Module
    ):
        raise TypeError(
            f"export: expected an nr_jax model (a flax Module with a `widths: WidthSpec` field and "
            f"units from nr_jax.layers), got {type(model).__name__}"
        )
    flat = _host(variables)
    graph, recorded = _trace(model, flat, input_shape)
    _check_variables(model, graph, flat)
    masks = {u.name: _mask(flat, u) for u in graph.units}
    keep_out = _kept_outputs(graph, masks)
    keep_in = {u.name: _kept_inputs(u, keep_out) for u in graph.all_units}
    units, params = [], {}
    for u in graph.all_units:
        if u.kind == "conv":
            unit, p = _export_conv(
                u, recorded[u.name], flat, masks[u.name], keep_in[u.name], keep_out[u.name]
            )
        else:
            unit, p = _export_head(u, recorded[u.name], flat, keep_in[u.name])
        units.append(unit)
        if p:
            params[unit.key] = p
    wiring = model.clone(widths=_compact_widths(graph, keep_in, keep_out))
    net = ExportedNet(wiring, tuple(units))
    net_vars = {"params": jax.tree.map(jnp.asarray, params)}
    _check_wiring(model, net, net_vars, graph.input_shape)
    return Exported(net, net_vars)


def _host(variables: Any) -> dict[tuple[str, ...], np.ndarray]:
    """The variables as numpy arrays keyed by path ("params", and "batch_stats" and "nr_masks"
    where the model has them)."""
    if isinstance(variables, flax.core.FrozenDict):
        variables = flax.core.unfreeze(variables)
    if not isinstance(variables, Mapping):
        raise ValueError(f"export: variables must be a dict of collections, got {type(variables)}")
    if "params" not in variables:
        raise ValueError("export: variables lack the 'params' collection")
    tree = {k: variables[k] for k in ("params", "batch_stats", MASKS) if k in variables}
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(tree)))


def _trace(
    model: nn.Module, flat: dict, input_shape: tuple[int, ...] | None
) -> tuple[ChannelGraph, dict[str, nn.Module]]:
    """The channel graph, and every unit's module (its activation, its head's bias rule).

    Without `input_shape`, traces at (1, 224, 224, C) with C the input channels of the first
    kernel in the parameters (the first unit `model.init` made), and again with the channels of
    the unit that reads the image if they differ.
    """
    if input_shape is not None:
        return _graph(model, tuple(input_shape))
    kernels = [v for k, v in flat.items() if k[0] == "params" and k[-1] == "kernel" and v.ndim == 4]
    channels = kernels[0].shape[2] if kernels else 3
    graph, recorded = _graph(model, (1, DEFAULT_HW, DEFAULT_HW, channels))
    for u in graph.units:
        kernel = flat.get(("params", *u.path, "kernel"))
        reads_image = any(INPUT in seg[0] for seg in u.inputs)
        if reads_image and getattr(u, "dense", False):
            raise ValueError(
                f"export: {type(model).__name__} flattens its input; give input_shape=(B, H, W, C)"
            )
        if reads_image and kernel is not None and kernel.ndim == 4 and kernel.shape[2] != channels:
            return _graph(model, (1, DEFAULT_HW, DEFAULT_HW, kernel.shape[2]))
    return graph, recorded


def _graph(model: nn.Module, shape: tuple[int, ...]) -> tuple[ChannelGraph, dict[str, nn.Module]]:
    recorded: dict[str, nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.scope is not None:
            recorded.setdefault("/".join(context.module.scope.path), context.module)
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(record):
            graph = channel_graph(model, shape)
    except ValueError as e:
        raise ValueError(f"export: {type(model).__name__}: {e}") from None
    if graph.classifier is None:
        raise ValueError(f"export: {type(model).__name__} has no nr_jax.layers.NRClassifier")
    for u in graph.units:
        unit = recorded.get(u.name)
        norm = getattr(unit, "norm", "batch")
        if not isinstance(unit, NR_UNITS) or norm not in FOLDED_NORMS:
            raise ValueError(
                f"export: unit {u.name} is a {type(unit).__name__} with norm {norm!r}; export "
                f"folds the normalisations {FOLDED_NORMS} of nr_jax.layers units only (GroupNorm "
                "and LayerNorm depend on each input)"
            )
    return graph, recorded


def _check_variables(model: nn.Module, graph: ChannelGraph, flat: dict) -> None:
    """Every leaf has the shape the model's graph expects; only NR units hold parameters."""
    expected = traverse_util.flatten_dict(dict(graph.variable_shapes))
    name = type(model).__name__
    order = ("params", "batch_stats", MASKS)
    for path in sorted(expected, key=lambda p: order.index(p[0]) if p[0] in order else 3):
        leaf = expected[path]
        if path[0] == MASKS and path not in flat:
            continue  # no masks: every channel is live
        if path not in flat:
            raise ValueError(f"export: variables lack {'/'.join(path)}, which {name} has")
        if flat[path].shape != leaf.shape:
            raise ValueError(
                f"export: variables of other widths: {'/'.join(path)} has shape "
                f"{flat[path].shape}, {name} expects {leaf.shape}"
            )
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    if extra:
        raise ValueError(f"export: variables hold {extra[0]}, which {name} does not have")
    units = {u.path for u in graph.all_units}
    for path in expected:
        if path[0] == "params" and not any(path[1 : 1 + len(p)] == p for p in units):
            raise ValueError(f"export: {'/'.join(path)} belongs to no NR unit of {name}")


def _mask(flat: dict, u: Unit) -> np.ndarray:
    """The unit's channel mask (ones without masks), checked to be 0/1."""
    mask = flat.get((MASKS, *u.path, "mask"))
    if mask is None:
        return np.ones((u.out_channels,), np.float32)
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"export: the mask of unit {u.name} holds values other than 0 and 1")
    return mask


def _kept_outputs(graph: ChannelGraph, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Output channels the exported network keeps: unmasked, or live in the unit's stream.

    A residual stream keeps a channel that any of its units leaves unmasked (the sum is not zero
    there); one summed with the network input keeps every channel.
    """
    with_input = {p for u in graph.all_units for ps, _, _ in u.inputs if INPUT in ps for p in ps}
    keep = {}
    for u in graph.units:
        group = sorted(graph.ties[u.tie]) if u.tie is not None else [u.name]
        if with_input & set(group):
            keep[u.name] = np.ones((u.out_channels,), bool)
        else:
            keep[u.name] = np.any([masks[n] != 0 for n in group], axis=0)
        masked = masks[u.name] == 0
        if not masked.all() and np.any(masked & keep[u.name]):
            raise ValueError(
                f"export: unit {u.name} masks some channels that its residual stream keeps; "
                "only a whole unit can be masked there"
            )
    return keep


def _kept_inputs(u: Unit, keep_out: dict[str, np.ndarray]) -> np.ndarray:
    """The unit's input channels that the exported network keeps, in the unit's input order."""
    parts = []
    for producers, start, stop in u.inputs:
        if INPUT in producers:
            parts.append(np.ones((stop - start,), bool))
        else:
            parts.append(np.any([keep_out[p][start:stop] for p in sorted(producers)], axis=0))
    return np.concatenate(parts) if parts else np.ones((u.in_channels,), bool)


def _mode(u: Unit) -> str:
    """How the NR unit computes (`nr_jax.layers.NRConv._forward`): "conv", "blocks", "attention"."""
    l_in, l_out = u.in_split, u.out_split
    if u.scheme == "dense" or l_out is None:
        return "conv"
    if u.scheme.startswith("attention"):
        no_groups = l_in in (0, u.in_channels) or l_out in (0, u.out_channels)
        return "conv" if no_groups else "attention"
    return "conv" if l_in == u.in_channels else "blocks"


def _export_conv(
    u: Unit, rec: nn.Module, flat: dict, mask: np.ndarray, keep_in: np.ndarray, keep_out: np.ndarray
) -> tuple[ExportedUnit, dict]:
    """The unit's `ExportedUnit` and folded parameters (kernel·s and β - μ·s, live channels)."""
    n_out = int(keep_out.sum())
    dense = bool(getattr(u, "dense", False))
    base = ExportedUnit(
        u.name, "zeros", n_out, u.kernel, u.strides, activation=rec.activation, dense=dense
    )
    if n_out == 0 or not mask.any():
        return base, {}
    get = lambda coll, *leaf: flat[(coll, *u.path, *leaf)].astype(np.float64)  # noqa: E731
    if getattr(rec, "norm", "batch") == "batch":
        s = get("params", "bn", "scale") / np.sqrt(get("batch_stats", "bn", "var") + BN_EPSILON)
        b = get("params", "bn", "bias") - get("batch_stats", "bn", "mean") * s
    else:  # no normalisation: the unit's own bias
        s, b = np.ones((u.out_channels,)), get("params", "bias")
    kernel, ii, oo = get("params", "kernel"), np.flatnonzero(keep_in), np.flatnonzero(keep_out)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    mode = _mode(u)
    if mode == "conv":
        if len(ii) == 0:
            return dataclasses.replace(base, kind="bias"), {"bias": f32(b[oo])}
        return dataclasses.replace(base, kind="conv"), {
            "kernel": f32(kernel[..., ii, :][..., oo] * s[oo]),
            "bias": f32(b[oo]),
        }
    i_old, i_new = ii[ii < u.in_split], ii[ii >= u.in_split]
    o_old, o_new = oo[oo < u.out_split], oo[oo >= u.out_split]
    unit = dataclasses.replace(base, kind=mode, in_split=len(i_old), out_split=len(o_old))
    if mode == "attention":  # BN after the gate: raw kernels, then scale and bias
        p = {"scale": f32(s[oo]), "bias": f32(b[oo])}
        for name, rows in (("from_old", i_old), ("from_new", i_new)):
            if len(rows):
                p[name] = {"kernel": f32(kernel[..., rows, :][..., oo])}
        return unit, p
    p = {}
    for name, rows, cols in (("old", i_old, o_old), ("new", i_new, o_new)):
        if len(cols) and len(rows):
            p[name] = {
                "kernel": f32(kernel[..., rows, :][..., cols] * s[cols]),
                "bias": f32(b[cols]),
            }
        elif len(cols):
            p[name] = {"bias": f32(b[cols])}
    return unit, p


def _export_head(
    u: Unit, rec: nn.Module, flat: dict, keep_in: np.ndarray
) -> tuple[ExportedUnit, dict]:
    """The classifier on its live inputs; after rejuvenation the sum of its two heads."""
    kernel = flat[("params", *u.path, "kernel")]
    bias = flat[("params", *u.path, "bias")]
    twice = u.in_split is not None and getattr(rec, "bias_in_both_heads", False)
    params = {
        "kernel": np.asarray(kernel[np.flatnonzero(keep_in)], np.float32),
        "bias": np.asarray(bias * (2 if twice else 1), np.float32),
    }
    return ExportedUnit(u.name, "head", u.out_channels), params


def _compact_widths(graph: ChannelGraph, keep_in: dict, keep_out: dict) -> WidthSpec:
    """Every unit at its live width; split points counted among the live channels."""
    below = lambda keep, split: None if split is None else int(keep[:split].sum())  # noqa: E731
    entries = {}
    for u in graph.all_units:
        features = int(keep_out[u.name].sum()) if u.kind == "conv" else u.out_channels
        out_split = below(keep_out[u.name], u.out_split) if u.kind == "conv" else None
        entries[u.name] = UnitWidth(features, below(keep_in[u.name], u.in_split), out_split)
    return WidthSpec.from_dict(entries)


def _check_wiring(model: nn.Module, net: ExportedNet, net_vars: dict, shape: tuple) -> None:
    """The wiring feeds every exported unit the live channels its parameters were cut for."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    want = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x)
    got = jax.tree_util.tree_flatten_with_path(net_vars)[0]
    want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, leaf in got:
        if path not in want or want[path].shape != leaf.shape:
            raise ValueError(
                f"export: {type(model).__name__} does not build the widths it is given (its "
                f"units must take their widths from `self.widths` via nr_jax.layers): "
                f"{jax.tree_util.keystr(path)} has shape {leaf.shape}, the wiring gives "
                f"{want[path].shape if path in want else 'no such parameter'}"
            )
    if len(got) != len(want):
        raise ValueError(f"export: {type(model).__name__}'s wiring calls units it did not trace")


# ---------------------------------------------------------------------------------------------
# export_inference: a serialised `jax.export` artefact
# ---------------------------------------------------------------------------------------------


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
