"""Hash of the lowered train step (StableHLO, source locations stripped) of the benchmark's
small models, to compare two commits: run from each commit's worktree with
`PYTHONPATH=<worktree> python experiments/results/layout_ab/hlo_hash.py`."""

import hashlib
import re

from absl import flags

import experiments.benchmark.__main__  # noqa: F401  (defines the benchmark's flags)
from experiments.benchmark.common import make_trainer, synthetic_batch

flags.FLAGS(["hlo_hash"])
for model in ("vgg_fmnist", "resnet_fmnist"):
    trainer, state = make_trainer(model, dataset="fashion_mnist", batch=None)
    text = trainer.steps.train.lower(state, synthetic_batch(64, 28, 1)).as_text()
    text = re.sub(r"loc\(.*?\)", "", text)
    print(model, hashlib.sha256(text.encode()).hexdigest()[:16], len(text))
