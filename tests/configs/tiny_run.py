"""A real run small enough for the crash-safety tests (vgg_tiny, 640 Fashion-MNIST images).

20 steps an epoch, a mid-epoch checkpoint every 8 steps, one rejuvenation after the search.
"""

from nr_jax.config import base_config


def get_config():
    c = base_config()
    c.model = "vgg_tiny"
    c.dataset = "fashion_mnist"
    c.batch_size, c.eval_batch_size = 32, 100
    c.epochs, c.lr_milestones = 2, (1,)
    c.train_limit, c.test_limit = 640, 200
    c.log_every_steps = 5
    c.checkpoint_every_steps = 8
    c.keep_checkpoints = 2
    c.progress = False
    c.plots = False
    c.data_parallel = False
    c.nr.lam = 1e-2  # strong: the search ends after an epoch or two
    c.nr.target = 0.9
    c.nr.max_search_epochs = 5
    return c
