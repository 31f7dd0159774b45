"""Configs of the Fashion-MNIST result table (`python -m experiments.reproduce_fmnist`).

NR arm: search with L1 until U <= 0.25, rejuvenate, then E epochs. Baseline twin: no L1, no
rejuvenation, E + k epochs with the milestones shifted by k (k = the NR arm's search epochs for the
same seed), or E epochs. Sized for about an hour on 2 CPU cores: the first 5,000 training images
(of 60,000) and the first 5,000 test images, E = 5 epochs after the search, batch 64 as the
official CIFAR runs, λ = 1e-2 so that the search takes a few epochs.
"""

from nr_jax.config import base_config

ARCHS = {"vgg": "vgg_fmnist", "resnet": "resnet_fmnist"}
E = 5
MILESTONES = (3, 4)


def get_config(arch: str = "vgg"):
    c = base_config()
    c.model = ARCHS[arch]
    c.dataset = "fashion_mnist"
    c.train_limit = 5_000
    c.test_limit = 5_000
    c.batch_size = 64
    c.epochs = E
    c.lr = 0.1
    c.lr_milestones = MILESTONES
    c.nr.target = 0.25
    c.nr.lam = 1e-2
    c.nr.max_search_epochs = 8
    c.nr.allocation = "sqrt"  # the official rule (the figures in the README used it)
    c.log_every_steps = 20
    c.checkpoint = False
    c.tensorboard = False
    return c


def nr_config(arch: str, seed: int):
    c = get_config(arch)
    c.seed = seed
    return c


def baseline_config(arch: str, seed: int, k: int):
    """The baseline twin: E + k epochs, milestones shifted by k (k = 0: the plain E epochs)."""
    c = get_config(arch)
    c.seed = seed
    c.nr.enabled = False
    c.epochs = E + k
    c.lr_milestones = tuple(m + k for m in MILESTONES)
    return c
