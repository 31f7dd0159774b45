"""`tiny_run` as one job of two processes on this machine (`tests/test_multiprocess.py`).

The same run, shorter: the search ends after 3 epochs (60 steps, target 0.95), then one epoch at
the new widths (steps 61-80, mid-epoch checkpoints at 68 and 76); 100 test images. The batch is
sharded over every device of the job; the test adds the job's fields (`config.distributed`, the
coordinator on a loopback address, the process count and id, short timeouts).
"""

from tests.configs import tiny_run


def get_config():
    c = tiny_run.get_config()
    c.data_parallel = True
    c.epochs, c.lr_milestones = 1, ()
    c.test_limit = 100
    c.nr.target = 0.95
    return c
