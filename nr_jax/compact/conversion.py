"""`export`: an NR model as its plain inference network (`nr_jax.compact`).

The steps: trace the channel graph (recording every unit's module), check the variables against
it, read the masks and the channels to keep (`nr_jax.compact.channels`), convert every unit's
parameters (`nr_jax.compact.folding`), build the wiring at the compact widths and check that it
feeds every exported unit the channels its parameters were cut for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nr_jax.compact.channels import compact_widths, kept_inputs, kept_outputs, unit_mask
from nr_jax.compact.folding import export_conv, export_head
from nr_jax.compact.network import NR_UNITS, Exported, ExportedNet
from nr_jax.graph import INPUT, ChannelGraph, channel_graph
from nr_jax.layers import MASKS, WidthSpec

__all__ = ["DEFAULT_HW", "export"]

DEFAULT_HW = 224  # spatial size of the trace that derives the channel graph (any size that fits)


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
    masks = {u.name: unit_mask(flat, u) for u in graph.units}
    keep_out = kept_outputs(graph, masks)
    keep_in = {u.name: kept_inputs(u, keep_out) for u in graph.all_units}
    units, params = [], {}
    for u in graph.all_units:
        if u.kind == "conv":
            unit, p = export_conv(
                u, recorded[u.name], flat, masks[u.name], keep_in[u.name], keep_out[u.name]
            )
        else:
            unit, p = export_head(u, recorded[u.name], flat, keep_in[u.name])
        units.append(unit)
        if p:
            params[unit.key] = p
    wiring = model.clone(widths=compact_widths(graph, keep_in, keep_out))
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
        if not isinstance(unit, NR_UNITS):
            raise ValueError(
                f"export: unit {u.name} is a {type(unit).__name__}; export converts the units "
                "of nr_jax.layers only"
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
