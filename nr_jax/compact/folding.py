"""One NR unit's parameters in the exported network: the live blocks, normalisation folded in.

* BatchNorm (eval mode, running statistics) is folded into the convolution, which gets a bias:
  W' = W·s, b' = β - μ·s with s = γ / sqrt(σ² + 1e-5), per output channel; a unit without
  normalisation keeps its own bias (s = 1). In a gated cross-attention unit the gate reads the
  pre-normalisation response, so the kernels stay raw and s (BatchNorm only) and b' follow the
  gate.
* GroupNorm / LayerNorm depends on each input and cannot be folded: the kernels stay raw and
  without bias, and a `GroupNormalize` with the unit's groups (over the channels it computes,
  `nr_jax.compact.channels.statistics_channels`), γ and β of the kept channels follows.
* A unit without live inputs is its bias: b' for BatchNorm and no normalisation, β for GroupNorm
  / LayerNorm (a group of zeros normalises to zero).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from nr_jax.compact.channels import group_layout, statistics_channels
from nr_jax.compact.network import ExportedUnit, GroupLayout
from nr_jax.graph import Unit

__all__ = ["BN_EPSILON", "export_conv", "export_head", "mode"]

BN_EPSILON = 1e-5  # of every NR unit's BatchNorm (`nr_jax.layers.NRConv`)
GROUPED = ("group", "layer")  # normalisations kept as `GroupNormalize`


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


def mode(u: Unit) -> str:
    """How the NR unit computes (`nr_jax.schemes.mix`): "conv", "blocks", "attention"."""
    l_in, l_out = u.in_split, u.out_split
    if u.scheme == "dense" or l_out is None:
        return "conv"
    if u.scheme.startswith("attention"):
        no_groups = l_in in (0, u.in_channels) or l_out in (0, u.out_channels)
        return "conv" if no_groups else "attention"
    return "conv" if l_in == u.in_channels else "blocks"


def export_conv(
    u: Unit, rec: nn.Module, flat: dict, mask: np.ndarray, keep_in: np.ndarray, keep_out: np.ndarray
) -> tuple[ExportedUnit, dict]:
    """The unit's `ExportedUnit` and parameters (float32 numpy).

    Args:
      u: the unit (channel graph). rec: its module in the source model (its activation).
      flat: the variables as numpy arrays keyed by path.
      mask: its channel mask (D_out,). keep_in, keep_out: bool (D_in,), (D_out,), the input and
        output channels the exported network keeps.
    """
    n_out = int(keep_out.sum())
    base = ExportedUnit(
        u.name, "zeros", n_out, u.kernel, u.strides, activation=rec.activation, dense=u.dense
    )
    if n_out == 0 or not mask.any():
        return base, {}
    get = lambda coll, *leaf: flat[(coll, *u.path, *leaf)].astype(np.float64)  # noqa: E731
    ii, oo = np.flatnonzero(keep_in), np.flatnonzero(keep_out)
    s = np.ones((u.out_channels,))
    if u.norm in GROUPED:  # raw kernels without bias; γ, β after the statistics
        b, constant = None, get("params", "norm", "bias")
    elif u.norm == "batch":
        s = get("params", "bn", "scale") / np.sqrt(get("batch_stats", "bn", "var") + BN_EPSILON)
        b = constant = get("params", "bn", "bias") - get("batch_stats", "bn", "mean") * s
    else:  # no normalisation: the unit's own bias
        b = constant = get("params", "bias")
    if len(ii) == 0:  # a zero response: its bias (GroupNorm / LayerNorm: zeros normalise to 0)
        return dataclasses.replace(base, kind="bias"), {"bias": _f32(constant[oo])}
    kernel = get("params", "kernel")
    if u.norm in GROUPED:
        computed = statistics_channels(u, keep_out)
        unit, p = _linear(u, base, kernel, ii, np.flatnonzero(computed), s, None)
        groups, keep = group_layout(u, computed, keep_out)
        layout = GroupLayout(groups, u.norm == "group", keep)
        unit = dataclasses.replace(unit, bias=False, norm=layout)
        scale, bias = get("params", "norm", "scale"), get("params", "norm", "bias")
        return unit, {"linear": p, "norm": {"scale": _f32(scale[oo]), "bias": _f32(bias[oo])}}
    unit, p = _linear(u, base, kernel, ii, oo, s, b)
    if unit.kind == "attention":  # after the gate: BatchNorm's scale (not 1) and the bias
        unit = dataclasses.replace(unit, scale=u.norm == "batch")
        p["bias"] = _f32(b[oo])
        if unit.scale:
            p["scale"] = _f32(s[oo])
    return unit, p


def _linear(
    u: Unit,
    base: ExportedUnit,
    kernel: np.ndarray,
    ii: np.ndarray,
    oo: np.ndarray,
    s: np.ndarray,
    b: np.ndarray | None,
) -> tuple[ExportedUnit, dict]:
    """The linear part from inputs `ii` to outputs `oo` (indices, ii not empty): kernel columns
    scaled by s (D_out,), biased by b (D_out,) or without bias (b None). "attention" keeps raw
    kernels without bias: its affine map comes after the gate."""
    unit = dataclasses.replace(base, features=len(oo), bias=b is not None)
    with_bias = lambda p, cols: p if b is None else {**p, "bias": _f32(b[cols])}  # noqa: E731
    if mode(u) == "conv":
        p = {"kernel": _f32(kernel[..., ii, :][..., oo] * s[oo])}
        return dataclasses.replace(unit, kind="conv"), with_bias(p, oo)
    i_old, i_new = ii[ii < u.in_split], ii[ii >= u.in_split]
    o_old, o_new = oo[oo < u.out_split], oo[oo >= u.out_split]
    unit = dataclasses.replace(unit, kind=mode(u), in_split=len(i_old), out_split=len(o_old))
    p = {}
    if unit.kind == "attention":
        for name, rows in (("from_old", i_old), ("from_new", i_new)):
            if len(rows):
                p[name] = {"kernel": _f32(kernel[..., rows, :][..., oo])}
        return unit, p
    for name, rows, cols in (("old", i_old, o_old), ("new", i_new, o_new)):
        block = {"kernel": _f32(kernel[..., rows, :][..., cols] * s[cols])} if len(rows) else {}
        if len(cols) and (len(rows) or b is not None):
            p[name] = with_bias(block, cols)
    return unit, p


def export_head(
    u: Unit, rec: nn.Module, flat: dict, keep_in: np.ndarray
) -> tuple[ExportedUnit, dict]:
    """The classifier on its live inputs; after rejuvenation the sum of its two heads (the
    prediction, `nr_jax.predict`), the bias counted twice where the model says so
    (`bias_in_both_heads`, method.md 7.6)."""
    kernel = flat[("params", *u.path, "kernel")]
    bias = flat[("params", *u.path, "bias")]
    twice = u.in_split is not None and getattr(rec, "bias_in_both_heads", False)
    params = {
        "kernel": _f32(kernel[np.flatnonzero(keep_in)]),
        "bias": _f32(bias * (2 if twice else 1)),
    }
    return ExportedUnit(u.name, "head", u.out_channels), params
