"""Compact export (`nr_jax.export`): a plain network that computes `nr_jax.predict` exactly.

Per model family (VGG, ResNet, DenseNet, the ImageNet VGG; the BN-free CNN, GroupNorm and
LayerNorm chains, the MLP's dense units), before and after rejuvenation, both schemes: the
exported network's logits equal the NR model's eval-mode prediction (float32), its parameters are
the effective conv weights of the live channels, one bias per live output channel (and the
scale of each BatchNorm cross-attention and GroupNorm / LayerNorm output) and the classifier,
counted independently from the channel graph (`nr_jax.count`); it holds no BatchNorm, no NR
normalisation, no mask and no zero block. A GroupNorm / LayerNorm unit masked in part keeps its
groups' statistics. The `jax.export` artefact round-trips at two batch sizes; bad inputs are
refused with one line. The variables are host-side numpy trees shaped by `jax.eval_shape`
(nothing compiles but the two forward passes of each case).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import apply, host_variables, random_gammas, set_gammas, shrink_outgoing

import nr_jax
from nr_jax import criteria, norms
from nr_jax.compact import ExportedNet, GroupLayout, GroupNormalize
from nr_jax.rejuvenation import sticky_masks

CLASSES = 10
X = jax.random.normal(jax.random.key(5), (2, 28, 28, 1))  # Fashion-MNIST-sized: fits every family
PRUNE = {"prune_residual": True}
# GroupNorm / LayerNorm chains (vgg_tiny: GroupNorm groups of 4 and 8 channels); the MLP's
# default hidden units have no normalisation
GN = {"norm": "group", "num_groups": 2, "gamma_init": 1.0}
LN = {"norm": "layer", "gamma_init": 1.0}
GROUPED = ("group", "layer")


class Case(NamedTuple):
    """One exported model.

    Attributes:
      name: registered model name. kwargs: extra model arguments (e.g. the normalisation).
      phase: "before" or "after" rejuvenation. scheme: "removed" or "attention".
      dead: a unit whose γ are all ~0; it and the units it starves are masked (before
        rejuvenation: the sticky masks; after: the plan's all-dead units), so export removes them.
    """

    name: str
    phase: str
    scheme: str = "removed"
    kwargs: dict[str, Any] = {}
    dead: str | None = None

    def __str__(self) -> str:
        flags = [
            v if isinstance(v, str) else k
            for k, v in self.kwargs.items()
            if v is True or k == "norm"
        ]
        flags += ["dead"] if self.dead else []
        return "-".join([self.name, self.phase, self.scheme, *flags])


DEFAULT = [
    Case("vgg_tiny", "before"),
    Case("vgg_tiny", "after", "removed"),
    Case("vgg_tiny", "after", "attention"),
    Case("resnet_tiny_basic", "after", "removed", PRUNE, "s2b1_conv1"),
    Case("densenet_tiny", "after", "removed"),
    Case("vgg_imagenet_tiny", "after", "attention"),
    # beyond BatchNorm (issue 16): no normalisation, GroupNorm, LayerNorm, dense units
    Case("cnn_nobn_tiny", "after", "removed"),
    Case("cnn_nobn_tiny", "after", "attention"),
    Case("vgg_tiny", "after", "removed", GN),
    Case("vgg_tiny", "after", "attention", GN),
    Case("vgg_tiny", "after", "removed", LN),
    Case("mlp_tiny", "after", "removed"),
    Case("mlp_tiny", "after", "attention"),
    Case("mlp_tiny", "after", "removed", {"norm": "layer"}),
]
SLOW = [
    Case("resnet_tiny_basic", "before", "removed", PRUNE, "s2b1_conv1"),
    Case("resnet_tiny_basic", "after", "attention", PRUNE, "s2b1_conv1"),
    Case("resnet_tiny_cifar", "before"),
    Case("resnet_tiny_cifar", "after", "removed"),
    Case("resnet_tiny_cifar", "after", "attention"),
    Case("densenet_tiny", "before"),
    Case("densenet_tiny", "after", "attention"),
    Case("vgg_imagenet_tiny", "before"),
    Case("vgg_imagenet_tiny", "after", "removed"),
    Case("cnn_nobn_tiny", "before"),
    Case("vgg_tiny", "before", "removed", GN),
    Case("vgg_tiny", "before", "removed", LN),
    Case("vgg_tiny", "after", "attention", LN),
    Case("cnn_gn_fmnist", "after", "removed"),
    Case("cnn_gn_fmnist", "after", "attention"),
    Case("mlp_tiny", "before"),
    Case("mlp_tiny", "after", "attention", {"norm": "layer"}),
    Case("mlp_tiny", "after", "removed", {"norm": "group", "num_groups": 2}),
    Case("mlp_tiny", "before", "removed", {"norm": "batch"}),
    Case("mlp_tiny", "after", "attention", {"norm": "batch"}),
]
CASES = DEFAULT + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW]


def criterion(graph: nr_jax.ChannelGraph) -> str:
    """The liveness criterion for the graph's units: "bn" (BatchNorm), "norm" (GroupNorm /
    LayerNorm scales), "outgoing" (no normalisation: the outgoing weights)."""
    found = {u.norm for u in graph.units}
    return "outgoing" if None in found else "bn" if found == {"batch"} else "norm"


def build(case: Case, seed: int = 1) -> tuple[Any, dict, nr_jax.ChannelGraph, tuple[str, ...]]:
    """The case's model and variables (random γ, or random outgoing weights ~0 without
    normalisation: about half the channels dead), its channel graph and its masked units."""
    model = nr_jax.models.get(case.name, num_classes=CLASSES, scheme=case.scheme, **case.kwargs)
    graph = nr_jax.channel_graph(model, X.shape)
    name = criterion(graph)
    if name == "outgoing":
        variables = shrink_outgoing(host_variables(graph, seed), graph, seed, dead_frac=0.5)
    else:
        variables, _ = random_gammas(host_variables(graph, seed), graph, seed, dead_frac=0.5)
    if case.dead is not None:
        dead = np.full(graph[case.dead].out_channels, 1e-5, np.float32)
        variables = set_gammas(variables, {case.dead: dead})
    variables = jax.device_get(variables)
    live = jax.device_get(criteria.resolve(name)(variables, graph))
    if case.phase == "before":
        masked = tuple(n for n, d in live.dead.items() if d) if case.dead else ()
        masks = sticky_masks(variables[nr_jax.MASKS], dict(live.dead)) if case.dead else None
        if masks is not None:
            variables = {**variables, nr_jax.MASKS: jax.device_get(masks)}
        return model, variables, graph, masked
    res = nr_jax.rejuvenate(
        jax.random.key(3), model, variables, None, optax.identity(), graph, live=live
    )
    return res.model, jax.device_get(res.variables), res.graph, res.report.dead_units


def gated(u: nr_jax.Unit) -> bool:
    """A cross-attention unit with both groups on both sides (the gate of `nr_jax.schemes.mix`)."""
    if not u.scheme.startswith("attention") or u.out_split is None:
        return False
    return 0 < u.in_split < u.in_channels and 0 < u.out_split < u.out_channels


def per_channel(u: nr_jax.Unit) -> int:
    """Exported parameters per live output channel besides the kernels: the bias, and the scale
    where it cannot be folded (a gated BatchNorm unit, every GroupNorm / LayerNorm unit)."""
    return 2 if u.norm in GROUPED or (u.norm == "batch" and gated(u)) else 1


def expected_params(graph: nr_jax.ChannelGraph, masked: tuple[str, ...]) -> int:
    """Effective conv weights + `per_channel` parameters per output channel + the classifier,
    from `nr_jax.count`, without the masked units.

    A masked unit's outputs must only reach masked units or residual sums (whose other units
    keep the channels live); then removing it removes exactly its own weights and biases.
    """
    c = nr_jax.count(graph)
    total = c.effective - c.bn + sum(per_channel(u) * u.out_channels for u in graph.units)
    for u in graph.all_units:
        for producers, _, _ in u.inputs:
            assert u.name in masked or len(producers) > 1 or not set(producers) & set(masked)
    for name in masked:
        u = graph[name]
        total -= u.effective_weights + per_channel(u) * u.out_channels
    return total


def modules_run(net: ExportedNet, net_vars: dict) -> set[type]:
    """The classes of the modules whose methods run in `net.apply` (traced, not computed)."""
    seen: set[type] = set()

    def record(next_fun, args, kwargs, context):
        seen.add(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(net.apply, net_vars, X)
    return seen


def exported(model: Any, variables: dict) -> nr_jax.compact.Exported:
    """`nr_jax.export` of the model, its logits checked against the training form's prediction
    (max |diff| <= 1e-5 max |logit|, the logits not ~0)."""
    net, net_vars = nr_jax.export(model, variables, input_shape=X.shape)
    reference = nr_jax.predict(apply(model, variables, X))
    out = jax.jit(net.apply)(net_vars, X)
    scale = float(jnp.max(jnp.abs(reference)))
    assert scale > 1e-3  # the comparison is not vacuous
    assert out.shape == reference.shape == (X.shape[0], CLASSES)
    assert float(jnp.max(jnp.abs(out - reference))) <= 1e-5 * scale
    return nr_jax.compact.Exported(net, net_vars)


def with_masked(variables: dict, name: str, channels: Any) -> dict:
    """The variables with the channels `channels` of unit `name` masked (mask 0)."""
    masks = jax.tree.map(np.array, variables[nr_jax.MASKS])
    masks[name]["mask"][channels] = 0.0
    return {**variables, nr_jax.MASKS: masks}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_computes_the_prediction(case):
    """Equal logits (max |diff| <= 1e-5 max |logit|), the independent parameter count, and a
    plain network: standard convolutions (dense layers for an MLP), no BN, GroupNorm / LayerNorm
    as `GroupNormalize`, no masks, no zero blocks, no NR unit run."""
    model, variables, graph, masked = build(case)
    assert case.dead is None or masked, "the case masks nothing: the removal is not tested"
    net, net_vars = exported(model, variables)
    assert set(net_vars) == {"params"}
    leaves = jax.tree_util.tree_flatten_with_path(net_vars)[0]
    assert sum(leaf.size for _, leaf in leaves) == expected_params(graph, masked)
    for path, leaf in leaves:
        keys = [k.key for k in path]
        assert "bn" not in keys and leaf.dtype == jnp.float32
        if keys[-1] == "kernel" and case.scheme == "removed":  # attention keeps its zero-started
            assert np.all(np.asarray(leaf) != 0), jax.tree_util.keystr(path)  # cross blocks
    run = modules_run(net, net_vars)
    assert nn.BatchNorm not in run and norms.GroupedNorm not in run and nn.Dense in run
    assert (nn.Conv in run) == (not all(u.dense for u in graph.units))
    assert (GroupNormalize in run) == any(u.norm in GROUPED for u in graph.units)
    for name in masked:
        assert name not in net_vars["params"]


@pytest.mark.parametrize("norm", GROUPED)
def test_masked_channels_keep_their_group_statistics(norm):
    """A GroupNorm / LayerNorm unit masked in part: the training form masks after the
    normalisation, so a masked channel's response still counts in its group's statistics. The
    export computes it for the statistics only (`GroupNormalize.keep`) and removes it from the
    outputs (and its consumers' rows); a group whose every channel is masked goes entirely."""
    kwargs = GN if norm == "group" else LN
    model = nr_jax.models.get("vgg_tiny", num_classes=CLASSES, **kwargs)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = jax.device_get(random_gammas(host_variables(graph, 4), graph, 4, 0.0)[0])
    masked = [0, 2, *range(8, 16)] if norm == "group" else [0, 2, 9]  # conv1: groups (8, 8)
    net, net_vars = exported(model, with_masked(variables, "conv1", masked))
    unit = next(u for u in net.units if u.name == "conv1")
    kept = 6 if norm == "group" else 13
    computed = 8 if norm == "group" else 16
    keep = (1, 3, 4, 5, 6, 7) if norm == "group" else (1, *range(3, 9), *range(10, 16))
    assert unit.norm == GroupLayout((computed,), norm == "group", keep)
    # conv0, conv1 (the computed channels' kernels), conv2 (the kept channels' rows), the head
    k = 9
    want = k * 8 + 2 * 8 + k * 8 * computed + 2 * kept + k * kept * 16 + 2 * 16 + 16 * CLASSES
    assert sum(a.size for a in jax.tree.leaves(net_vars)) == want + CLASSES


def test_group_norm_block_without_inputs():
    """A rejuvenated GroupNorm unit whose survivor inputs are all masked: its old block computes
    zeros (no kernel, no bias), which its groups normalise to zero, so those outputs are β."""
    model, variables, graph, _ = build(Case("vgg_tiny", "after", "removed", GN), seed=4)
    survivors = np.arange(graph["conv0"].out_split)
    net, net_vars = exported(model, with_masked(variables, "conv0", survivors))
    unit = next(u for u in net.units if u.name == "conv1")
    assert (unit.kind, unit.in_split, unit.norm.keep) == ("blocks", 0, None) and unit.out_split
    assert set(net_vars["params"]["conv1"]["linear"]) == {"new"}


def test_export_inference_round_trip():
    """The serialised artefact has a symbolic batch: deserialised, it runs at batch 1 and 3 and
    computes what the Flax network computes (`jax.export` serialises with flatbuffers)."""
    pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
    model, variables, _, _ = build(Case("vgg_tiny", "after", "removed"))
    net, net_vars = nr_jax.export(model, variables, input_shape=X.shape)
    blob = nr_jax.export_inference(net, net_vars, X.shape)
    assert isinstance(blob, bytes)
    restored = jax.export.deserialize(bytearray(blob))
    assert str(restored.in_avals[0].shape[0]) == "b"
    x3 = jax.random.normal(jax.random.key(9), (3, *X.shape[1:]))
    reference = jax.jit(net.apply)(net_vars, x3)
    for x, want in ((x3[:1], reference[:1]), (x3, reference)):
        got = restored.call(x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_export_infers_the_input_shape():
    """Without `input_shape` the trace reads the image channels from the stem's kernel."""
    model, variables, _, _ = build(Case("vgg_tiny", "before"))
    net, net_vars = nr_jax.export(model, variables)
    again = nr_jax.export(model, variables, input_shape=X.shape)
    assert net == again.model
    jax.tree.map(np.testing.assert_array_equal, net_vars, again.variables)


def test_refusals():
    """One-line errors: not an nr_jax model, variables of other widths, a rejuvenated model with
    the variables of before, no BN statistics, masks that are not 0/1, and an export_inference
    of a model that was not exported."""
    model, variables, graph, _ = build(Case("vgg_tiny", "before"))
    wide = nr_jax.models.get("vgg_tiny", num_classes=CLASSES, width_multiplier=2.0)
    res = nr_jax.rejuvenate(jax.random.key(0), model, variables, None, optax.identity(), graph)
    bad_masks = jax.tree.map(lambda m: m * 0.5, variables[nr_jax.MASKS])
    refused = [
        (TypeError, "export: expected an nr_jax model .* got Dense", nn.Dense(3), variables),
        (ValueError, "export: variables of other widths: params/conv0/", wide, variables),
        (ValueError, "export: variables of other widths", res.model, variables),
        (ValueError, "variables lack batch_stats/conv0/", model, {"params": variables["params"]}),
        (
            ValueError,
            "the mask of unit conv0 holds values other than 0 and 1",
            model,
            {**variables, nr_jax.MASKS: bad_masks},
        ),
    ]
    for error, message, m, v in refused:
        with pytest.raises(error, match=message) as info:
            nr_jax.export(m, v, input_shape=X.shape)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="export_inference: expected the ExportedNet"):
        nr_jax.export_inference(model, variables, X.shape)


def test_masked_stream_channels_refused():
    """A residual stream's channel masked in one of its units only cannot be removed: refused."""
    model = nr_jax.models.get("resnet_tiny_basic", num_classes=CLASSES)
    graph = nr_jax.channel_graph(model, X.shape)
    variables = jax.device_get(host_variables(graph))
    tied = next(u for u in graph.units if u.tie is not None)
    masks = jax.tree.map(np.array, variables[nr_jax.MASKS])
    masks[tied.name]["mask"][0] = 0.0
    with pytest.raises(ValueError, match=f"unit {tied.name} masks some channels"):
        nr_jax.export(model, {**variables, nr_jax.MASKS: masks}, input_shape=X.shape)
