"""The README's API block and the own-loop example of experiments/README.md run as written."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("NR_JAX_FASHION_MNIST_DIR"),
    reason="needs dataset-fashion-mnist",
)


def snippet(path: str, section: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text.split(section, 1)[1], re.S).group(1)


@pytest.mark.real_data
@needs_fmnist
def test_api_block_runs(tmp_path):
    from tests.configs.tiny_run import get_config

    config = get_config()
    config.epochs, config.lr_milestones, config.train_limit, config.test_limit = 1, (), 128, 100
    config.checkpoint, config.tensorboard = False, False
    rng = np.random.default_rng(0)
    namespace = {
        "key": jax.random.key(0),
        "x": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
        "labels": np.array([3, 7], np.int32),
        "config": config,
        "workdir": str(tmp_path / "run"),
    }
    exec(compile(snippet("README.md", "## Public API"), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["plan"].r >= 1.0
    # the block's apply_plan and rejuvenate agree: rejuvenate is plan + apply_plan
    assert namespace["res"].graph.widths == namespace["graph"].widths
    assert namespace["logits"].shape == (2, 10)
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["summary"]["epochs_run"] >= 1
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.real_data
@needs_fmnist
def test_own_loop_snippet_runs(capsys):
    namespace: dict = {}
    code = snippet("experiments/README.md", "## NR in your own Flax loop")
    exec(compile(code, "experiments/README.md", "exec"), namespace)  # noqa: S102
    assert namespace["graph"].rejuvenated
    assert namespace["report"].counts_after.effective < namespace["report"].counts_after.total
    assert "rejuvenated: True" in capsys.readouterr().out
