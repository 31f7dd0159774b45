"""Deadlines of the accelerator check and the outcomes a section can end with.

A section checks its `Deadline` between measurements (`check`, cooperative) and runs under
`Deadline.alarm`, a SIGALRM a grace period after the deadline that interrupts Python code which
did not check in time (a long compilation in C++ delays it until it returns).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator


class SectionTimeout(Exception):
    """A section ran out of its time; what it measured so far is kept."""


class SkipSection(Exception):
    """A section cannot run here (e.g. the feature it times does not exist); the message says
    why."""


class Deadline:
    """A point in time `seconds` from now, on a monotonic clock.

    Args:
      seconds: time allowed from now.
      clock: the clock (seconds; `time.monotonic` unless a test passes its own).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seconds = float(seconds)
        self.end = clock() + self.seconds

    def left(self) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        return self.end - self.clock()

    def check(self, what: str = "") -> None:
        """Raises `SectionTimeout` once the deadline has passed (`what`: the step not started)."""
        if self.left() <= 0:
            where = f" before {what}" if what else ""
            raise SectionTimeout(f"deadline of {self.seconds:.0f} s reached{where}")

    @contextlib.contextmanager
    def alarm(self, grace_s: float) -> Iterator[None]:
        """Raises `SectionTimeout` in the block `grace_s` seconds after the deadline (SIGALRM; in
        the main thread only, elsewhere the block runs without it)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: object) -> None:
            raise SectionTimeout(
                f"stopped {grace_s:.0f} s after its deadline of {self.seconds:.0f} s"
            )

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left() + grace_s))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
