"""The report of the accelerator check: `accelerator_check.json` (every figure) and
`accelerator_check.md` (one table of the sections, then each section's own table).

Both files are replaced atomically (written beside, then renamed), so a reader, or a run cut
short at any moment, never sees half a file. Each section module describes its own figures
(`summary(result)` in one line, `markdown(result)` as lines); a section cut short may lack some
figures, so a description that fails shows as incomplete instead of stopping the report.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

JSON_NAME, MD_NAME = "accelerator_check.json", "accelerator_check.md"
_LOCK = threading.Lock()  # the watchdog thread may write while the main thread is stuck


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _describe(describer: Any, result: dict[str, Any]) -> tuple[str, list[str]]:
    """(summary, markdown lines) of a section's result; the incomplete note if they fail."""
    if describer is None or not result:
        return "", []
    try:
        return describer.summary(result), describer.markdown(result)
    except Exception as e:  # noqa: BLE001 - a cut-short section's figures may be incomplete
        return f"(figures incomplete: {type(e).__name__})", []


def markdown(report: dict[str, Any], describers: Mapping[str, Any]) -> str:
    """The markdown summary: the header, the table of sections, each section's table."""
    d = report.get("device", {})
    lines = [
        "# nr_jax accelerator check",
        "",
        f"Device: {d.get('device_kind', '?')} ({d.get('platform', '?')}, "
        f"{d.get('device_count', '?')} device(s)); mode {report.get('mode', '?')}; jax "
        f"{d.get('jax', '?')}, jaxlib {d.get('jaxlib', '?')}, Python {d.get('python', '?')}; "
        f"started {report.get('started', '?')}; overall deadline {report.get('deadline_s', '?')} s"
        + (f", wall {report['wall_s']:.0f} s" if "wall_s" in report else " (running)")
        + ".",
        "",
        "| section | status | seconds (allowed) | XLA compilations (s) | summary |",
        "|---|---|---|---|---|",
    ]
    details: list[str] = []
    for name, entry in report.get("sections", {}).items():
        describer = describers.get(name)
        summary, body = _describe(describer, entry.get("result", {}))
        note = entry.get("reason") or entry.get("error") or ""
        text = "; ".join(t for t in (summary, note) if t).replace("|", "/")
        seconds = entry.get("seconds")
        allowed = entry.get("allowed_s")
        spent = "-" if seconds is None else f"{seconds:.0f}"
        spent += f" ({allowed:.0f})" if allowed is not None else ""
        result = entry.get("result", {})
        xla = "-"
        if "xla_compilations" in result:
            xla = f"{result['xla_compilations']} ({result.get('xla_compile_s', 0):.0f})"
        lines.append(f"| {name} | {entry.get('status', '?')} | {spent} | {xla} | {text} |")
        if body:
            title = getattr(describer, "TITLE", name)
            details += ["", f"## {title}", "", *body]
    if report.get("goals"):
        lines += ["", "Goals (issue 15, H100/H200-class GPU):", ""]
        for g in report["goals"]:
            verdict = "met" if g["met"] else "missed"
            lines.append(f"- {g['goal']}: measured {g['measured']:,} ({verdict})")
    if "watchdog" in report:
        lines += ["", f"Watchdog: {report['watchdog']}."]
    return "\n".join(lines + details) + "\n"


def write(report: dict[str, Any], out_dir: str, describers: Mapping[str, Any]) -> str:
    """Writes `report` to `out_dir`/accelerator_check.json and its markdown beside it; returns
    the markdown."""
    with _LOCK:
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write(os.path.join(out_dir, JSON_NAME), json.dumps(report, indent=1, default=str))
        text = markdown(report, describers)
        _atomic_write(os.path.join(out_dir, MD_NAME), text)
        return text
