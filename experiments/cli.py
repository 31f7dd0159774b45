"""How the entry points answer errors: a refused input is one line on stderr, with exit status 2.

    $ python -m experiments.main --config experiments/configs/default.py --workdir runs/x \
        --config.nr.lam=-1e-4
    error: config.nr.lam = -0.0001 is not allowed: a number >= 0
    $ echo $?
    2

`run(main)` takes the place of `absl.app.run(main)` in `experiments.main`,
`experiments.reproduce_fmnist` and `experiments.benchmark`. A refusal is what a user can cause and
fix: a flag absl does not accept, a config file that cannot be loaded, an override of a config
field that does not exist (named with the nearest valid field), and every
`nr_jax.config.ConfigError` (values, names, model keywords, a workdir that is a file, a checkpoint
of another model) or `nr_jax.data.DatasetNotFoundError` (a dataset missing, or in a format that
needs TensorFlow). The library raises those before it writes anything, so a refused command leaves
an existing run directory as it was. Any other exception is a failure during the run: one line
`error: <type>: <message>`, exit status 1. `--debug` prints the Python traceback as well.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from nr_jax.config import ConfigError, check_field

__all__ = ["FAILED", "REFUSED", "run"]

REFUSED, FAILED = 2, 1  # exit statuses

flags.DEFINE_boolean(
    "debug",
    False,
    "On an error, print the Python traceback too. Without it an error is one line on stderr, "
    "'error: <message>', with exit status 2 for a refused input (bad flag, config field or value, "
    "unknown name, missing dataset, a workdir of another model: nothing is written) and 1 for a "
    "failure during the run.",
)
FLAGS = flags.FLAGS


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> NoReturn:
    """Parses the flags (`argv`, default `sys.argv`), calls `main` with the remaining arguments
    and exits: 0, or `REFUSED` / `FAILED` after a one-line `error: ...` on stderr."""
    argv = list(sys.argv if argv is None else argv)
    debug = bool(re.search(r"^--?debug(=(true|1))?$", "\n".join(argv), re.MULTILINE | re.I))
    try:
        app.define_help_flags()  # --help, --helpshort, --helpfull (absl's app.run does it too)
        rest = _parse(argv)
        absl_logging.use_absl_handler()
        main(rest)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every error ends as one line (the traceback: --debug)
        if debug:
            traceback.print_exc()
        refusal = _refusal(e)
        line = refusal if refusal is not None else f"{type(e).__name__}: {_one_line(str(e))}"
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(REFUSED if refusal is not None else FAILED)
    sys.exit(0)


def _parse(argv: list[str]) -> list[str]:
    """`FLAGS(argv)`, after checking that each config file given exists; an override of a config
    field that does not exist becomes a `ConfigError` naming the nearest valid field
    (ml_collections raises `KeyError` or `AttributeError` there)."""
    for name in _config_flags():
        source = _value(argv, name)
        if source is not None and not os.path.isfile(source.split(":", 1)[0]):
            raise flags.IllegalFlagValueError(f"--{name}={source}: no such config file")
    try:
        return FLAGS(argv)
    except (KeyError, AttributeError, IndexError):
        _check_overrides(argv)  # raises the ConfigError when an override names no field
        raise


def _config_flags() -> list[str]:
    """The names of the flags defined with `config_flags.DEFINE_config_file`."""
    return [name for name in FLAGS if isinstance(FLAGS[name].parser, ConfigFileFlagParser)]


def _check_overrides(argv: list[str]) -> None:
    """Loads each config flag's file again and checks every `--<flag>.<path>=...` against it."""
    for arg in argv[1:]:
        match = re.match(r"^--?(?:no)?([A-Za-z_]\w*)\.([\w.]+)", arg)
        if match is None or match.group(1) not in FLAGS:
            continue
        name, path = match.groups()
        source = _value(argv, name)
        if source is None:
            continue
        check_field(FLAGS[name].parser.parse(source), path)


def _value(argv: list[str], name: str) -> str | None:
    """The value given to `--name` in `argv` (`--name=value` or `--name value`), or None."""
    for i, arg in enumerate(argv):
        if re.match(rf"^--?{name}=", arg):
            return arg.split("=", 1)[1]
        if re.match(rf"^--?{name}$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _refusal(error: BaseException) -> str | None:
    """The one-line message when `error` is a refused input, None for a failure during the run."""
    if isinstance(error, ConfigError):
        return _one_line(str(error))
    # DatasetNotFoundError lives in nr_jax.data (imports tfds): an error of that class can only
    # exist once the module is loaded, so it is looked up, not imported.
    paths = sys.modules.get("nr_jax.data.paths")
    if paths is not None and isinstance(error, paths.DatasetNotFoundError):
        return _one_line(str(error))
    if isinstance(error, flags.Error | app.UsageError):
        return _flag_message(str(error))
    if isinstance(error, OSError) and "failure to load" in str(error):  # a config file
        return _one_line(str(error))
    return None


def _flag_message(text: str) -> str:
    """absl's message, with the traceback ml_collections puts into a failed config file's."""
    if "Traceback (most recent call last)" in text:
        head = text.split("Error whilst parsing config file")[0].strip().rstrip(":")
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return _one_line(f"{head}: cannot load the config file: {last}")
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"
