"""The README's "NR in your own Flax loop" snippet runs as written and rejuvenates."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def snippet() -> str:
    with open(README) as f:
        text = f.read()
    section = text.split("## NR in your own Flax loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.real_data
@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist"
)
def test_own_loop_snippet_runs(capsys):
    namespace: dict = {}
    exec(compile(snippet(), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["graph"].rejuvenated
    assert namespace["report"].counts_after.effective < namespace["report"].counts_after.total
    assert "rejuvenated: True" in capsys.readouterr().out
