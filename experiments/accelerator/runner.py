"""Runs the sections of the accelerator check in priority order, each within its own deadline,
and writes the report after every one of them.

Every section gets its budget plus the time earlier sections left unused, capped by its own
maximum and by the overall deadline; one with less than `MIN_SECTION_S` left is skipped ("no time
left"). A section ends as `ok`, `skipped` (it raised `SkipSection`, or no time was left),
`timeout` (`SectionTimeout`: its figures so far are kept) or `failed` (any other exception: the
error in one line and the end of its traceback). `watchdog` ends the process shortly after the
overall deadline if a section is stuck where no signal reaches it, after writing the report.
"""

from __future__ import annotations

import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from experiments.accelerator.deadline import Deadline, SectionTimeout, SkipSection

MIN_SECTION_S = 2.0
STATUSES = ("pending", "running", "ok", "skipped", "timeout", "failed")
WATCHDOG_EXIT = 3  # exit status when the watchdog ended the process


class Section(NamedTuple):
    """One section: `run(deadline, result)` fills the dict `result` as it measures.

    Attributes:
      name: its key in the report.
      run: the measurement; raises `SkipSection` or `SectionTimeout` to end early.
      budget_s: its share of the overall deadline, seconds.
      max_s: seconds it may never exceed, slack included.
      skip: if set, the section is not run and is reported skipped for this reason (its budget
        goes to the next sections).
    """

    name: str
    run: Callable[[Deadline, dict[str, Any]], None]
    budget_s: float
    max_s: float = math.inf
    skip: str = ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def run_sections(
    sections: Sequence[Section],
    report: dict[str, Any],
    write: Callable[[], None],
    total: Deadline,
    grace_s: float = 10.0,
    min_s: float = MIN_SECTION_S,
) -> None:
    """Runs `sections` in order into `report["sections"]`, calling `write()` before the first
    and after every section (and when one starts, so that a killed run names it).

    Args:
      sections: the sections, in priority order.
      report: the report; `report["sections"][name]` gets each section's entry: status,
        budget_s, allowed_s, seconds, reason or error, and `result` (its figures).
      write: writes the report (JSON and markdown).
      total: the overall deadline.
      grace_s: how long after its deadline a section is interrupted by SIGALRM.
      min_s: a section allowed less than this is skipped ("no time left").
    """
    entries = report.setdefault("sections", {})
    for s in sections:
        entries[s.name] = {"status": "pending", "budget_s": s.budget_s, "result": {}}
    write()
    slack = 0.0
    for s in sections:
        entry = entries[s.name]
        if s.skip:
            entry.update(status="skipped", reason=s.skip)
            slack += s.budget_s
            continue
        allowed = min(s.budget_s + slack, s.max_s, total.left())
        if allowed < min_s:
            entry.update(status="skipped", reason=f"no time left ({max(total.left(), 0):.0f} s)")
            write()
            continue
        entry.update(status="running", allowed_s=round(allowed, 1))
        write()
        deadline, t0 = Deadline(allowed), time.monotonic()
        try:
            with deadline.alarm(grace_s):
                s.run(deadline, entry["result"])
            entry["status"] = "ok"
        except SectionTimeout as e:
            entry.update(status="timeout", reason=_one_line(e))
        except SkipSection as e:
            entry.update(status="skipped", reason=_one_line(e))
        except Exception as e:  # noqa: BLE001 - a failed section must not stop the others
            entry.update(status="failed", error=f"{type(e).__name__}: {_one_line(e)}")
            entry["traceback"] = traceback.format_exc().splitlines()[-12:]
        entry["seconds"] = round(time.monotonic() - t0, 2)
        slack = max(0.0, s.budget_s + slack - entry["seconds"])
        write()


def watchdog(
    report: dict[str, Any], write: Callable[[], None], total: Deadline, grace_s: float
) -> threading.Timer:
    """A started daemon timer that, `grace_s` after the overall deadline, marks the running
    section `timeout`, writes the report and ends the process (exit status `WATCHDOG_EXIT`);
    cancel it when the sections are done."""

    def stop() -> None:
        for entry in report.get("sections", {}).values():
            if entry.get("status") == "running":
                entry.update(status="timeout", reason="ended by the watchdog after the deadline")
        report["watchdog"] = f"process ended {grace_s:.0f} s after the overall deadline"
        try:
            write()
        finally:
            os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(max(0.0, total.left()) + grace_s, stop)
    timer.daemon = True
    timer.start()
    return timer
