"""The accelerator check (issue 15 item 3): `python -m experiments.accelerator_check --out DIR
[--cpu_smoke] [--deadline_s 280] [--only tests,throughput] [--fmnist_npz PATH]`.

On the GPU machine it runs the sections of `experiments.accelerator` in priority order, each with
its own deadline, and rewrites `DIR/accelerator_check.json` and `DIR/accelerator_check.md` after
every one of them. `python -m experiments.accelerator_bundle --dest .accel` prepares what travels
there (the Fashion-MNIST subset, wheels of the packages that machine lacks) and prints the exact
`run` command. `--cpu_smoke` is the reduced CPU mode that `tests/test_accelerator_check.py` runs.

The packages are checked before anything imports them: a missing one is one line on stderr
(exit status 2) naming it and how to bring it; every other refusal is `experiments.cli`'s.
"""

from __future__ import annotations

import sys

from experiments.accelerator.requirements import message, missing_modules


def entry() -> None:
    """Checks the packages, then runs `experiments.accelerator.driver.main` through the CLI."""
    missing = missing_modules()
    if missing:
        print(f"error: {message(missing)}", file=sys.stderr)
        sys.exit(2)
    from experiments import cli
    from experiments.accelerator import driver

    cli.run(driver.main)


if __name__ == "__main__":
    entry()
