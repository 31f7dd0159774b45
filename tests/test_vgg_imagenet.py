"""ImageNet VGG-16 in the official NR form (`vgg16_nr`): structure and counts.

Rejuvenation and training of `vgg_imagenet_tiny`: the family contract, tests/test_families.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init, one_sgd_step, sgd_chain

import nr_jax

X = jnp.asarray(np.random.default_rng(3).normal(size=(4, 28, 28, 1)), jnp.float32)


def key(seed):
    """An RBG key: XLA compiles its samplers in ~1 s on CPU, threefry's in ~10 s."""
    return jax.random.key(seed, impl="rbg")


def test_tiny_graph_and_counts_on_paper():
    model = nr_jax.models.get("vgg_imagenet_tiny", num_classes=10)
    graph = nr_jax.channel_graph(model, X.shape)
    assert [u.name for u in graph.units] == ["conv0", "conv1", "conv2", "fc6", "fc7"]
    assert not any(u.fixed for u in graph.units)  # FC6/FC7 are prunable NR units (7.13)
    assert model.gamma_init == 0.5  # ImageNet VGG (method.md 7.7); init uses it: test_families
    assert [u.out_hw for u in graph.units] == [(28, 28), (14, 14), (7, 7), (1, 1), (1, 1)]
    assert graph["fc6"].kernel == (1, 1) and graph["fc6"].inputs == ((frozenset(["conv2"]), 0, 16),)
    # conv weights 9*1*8 + 9*8*16 + 9*16*16 + 16*32 + 32*32; MACs x 784, 196, 49, 1, 1
    c = nr_jax.count(graph)
    assert c.conv == 72 + 1152 + 2304 + 512 + 1024
    assert c.macs == 72 * 784 + 1152 * 196 + 2304 * 49 + 512 + 1024
    assert c.classifier == 32 * 10 + 10
    shapes = graph.variable_shapes["params"]
    assert shapes["fc7"]["kernel"].shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="average pool"):
        nr_jax.channel_graph(model, (1, 16, 16, 1))  # 4x4 maps < the 7x7 pool


@pytest.mark.slow
def test_full_size_vgg16_imagenet():
    model = nr_jax.models.get("vgg16_imagenet", num_classes=1000)
    shape = (2, 224, 224, 3)
    graph = nr_jax.channel_graph(model, shape)
    c = nr_jax.count(graph)
    print(f"vgg16_imagenet: {c.total:,} params, {c.macs / 1e9:.3f} GMACs")
    assert c.total == pytest.approx(37.707e6, rel=1e-3)  # method.md 5.3
    assert c.macs / 1e9 == pytest.approx(15.366, rel=1e-3)
    x = jnp.ones(shape, jnp.float32)
    variables = init(model, key(0), x)
    variables, _, loss = one_sgd_step(
        model, sgd_chain(graph), variables, x, jnp.zeros(2, jnp.int32)
    )
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(variables["params"])
