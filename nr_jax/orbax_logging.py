"""Log filters that make orbax's failure reports safe: the workaround for CPython gh-106905.

After a failed read orbax abandons its other in-flight asyncio tasks; when they are
garbage-collected asyncio logs each at ERROR with a traceback. That GC can run inside any
``ast.parse`` call, and formatting a traceback there (CPython 3.11 parses source lines to place
carets) trips CPython bug gh-106905 ("SystemError: AST constructor recursion depth mismatch"),
breaking the unrelated outer parse (seen as random pytest crashes). The records repeat an error
that :class:`nr_jax.checkpoint.Checkpointer` handles and reports.

Nothing is installed at import: :func:`install_filters` adds the filters (once per logger) and
counts its callers, :func:`remove_filters` takes them away when the last caller is done. The
checkpointer holds them while it is open; an entry point may hold them for the whole process.
"""

from __future__ import annotations

import gc
import logging
import time

__all__ = ["install_filters", "remove_filters", "settle_after_failure"]

_SETTLE_SECONDS = 0.1


class _CountedFilter(logging.Filter):
    """A filter shared by several holders; ``users`` counts them."""

    users = 0


class _QuietOrbaxFilter(_CountedFilter):
    """Drops orbax's DEBUG/INFO chatter (routed through the ``absl`` logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


class _OrbaxAbandonedTaskFilter(_CountedFilter):
    """For exceptions from orbax or TensorStore: drops the traceback, demotes the record to DEBUG.

    Message and exception text are kept; the record is emitted only where DEBUG is enabled.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _raised_in_orbax(exc):
            return True
        record.msg = f"{record.getMessage()} [{type(exc).__name__}: {exc}]"
        record.args, record.exc_info, record.exc_text = None, None, None
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_FILTERS = (("absl", _QuietOrbaxFilter), ("asyncio", _OrbaxAbandonedTaskFilter))


def _raised_in_orbax(exc: BaseException) -> bool:
    """True for exceptions from orbax code or TensorStore (orbax's I/O layer)."""
    tb = exc.__traceback__
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return "tensorstore" in str(exc).lower()


def install_filters() -> None:
    """Adds the filters to the ``absl`` and ``asyncio`` loggers (once) and counts one holder."""
    for name, cls in _FILTERS:
        target = logging.getLogger(name)
        found = [f for f in target.filters if isinstance(f, cls)]
        if not found:
            found = [cls()]
            target.addFilter(found[0])
        found[0].users += 1


def remove_filters() -> None:
    """Counts one holder less; removes the filters when the last holder is gone."""
    for name, cls in _FILTERS:
        target = logging.getLogger(name)
        for log_filter in [f for f in target.filters if isinstance(f, cls)]:
            log_filter.users -= 1
            if log_filter.users <= 0:
                target.removeFilter(log_filter)


def settle_after_failure() -> None:
    """Lets orbax's abandoned work finish and be reported now, at a safe point, filters installed.

    When a TensorStore read fails, orbax abandons the other reads and closes its event loop; the
    never-retrieved tasks log whenever the garbage collector gets to them: possibly inside an
    unrelated ``ast.parse`` or after the holder of the filters is gone. Call it (filters
    installed) after catching an orbax failure.
    """
    time.sleep(_SETTLE_SECONDS)
    gc.collect()
