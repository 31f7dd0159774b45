"""Default run: Neural Rejuvenation of a small VGG on Fashion-MNIST (CPU, a few minutes).

Command (from the repository root):
    python -m experiments.main --config experiments/configs/default.py --workdir runs/default

What it does: trains `vgg_fmnist` (6 NR units, 28x28x1 inputs) on the first 10,000 Fashion-MNIST
training images with the L1 pressure on BN scales until the parameter utilisation falls to the
target, rejuvenates once (drop dead channels, widen every unit by r = sqrt(1/U)), then trains the
mix of old and new neurons (cross connections removed, two-logit loss) for `epochs` more epochs,
and evaluates on the 10,000 test images. The README's results section records what it reached.
"""

from nr_jax.config import base_config


def get_config():
    c = base_config()
    c.model = "vgg_fmnist"
    c.dataset = "fashion_mnist"
    c.train_limit = 10_000
    c.batch_size = 64
    c.epochs = 6
    c.lr = 0.1
    c.lr_milestones = (3, 5)
    c.nr.target = 0.25
    c.nr.lam = 1e-2  # much stronger than CIFAR's 1.5e-4: the search takes 2-3 epochs, not 30
    c.nr.max_search_epochs = 8
    c.nr.allocation = "sqrt"  # the official rule (the figures in the README used it)
    c.log_every_steps = 20
    return c
