"""CIFAR-10 VGG-19 with Neural Rejuvenation: the official README row (method.md 5.2).

Official command: `cifar.py -a vgg19_bn --epochs 300 --schedule 150 225 --gamma 0.1
--nr-target 0.25 --nr-sparsity 1.5e-4` (batch 64, lr 0.1, momentum 0.9, wd 1e-4).
Command here:
    python -m experiments.main --config experiments/configs/cifar10_vgg19.py \
        --workdir runs/c10_vgg19

Expected (official README): 4.19% test error with 9.99M effective parameters (20.04M allocated).
Needs a GPU for a full run (300 + k epochs), and CIFAR-10 prepared for tfds (see README).
"""

from nr_jax.config import base_config


def get_config():
    c = base_config()
    c.model = "vgg19_cifar"
    c.dataset = "cifar10"
    c.augment = True
    c.batch_size = 64
    c.epochs = 300
    c.lr = 0.1
    c.lr_milestones = (150, 225)
    c.weight_decay = 1e-4
    c.nr.target = 0.25
    c.nr.lam = 1.5e-4
    c.nr.max_search_epochs = 300
    return c
