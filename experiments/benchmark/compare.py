"""Speed of one commit against another from alternated benchmark runs.

`python -m experiments.benchmark.compare DIR` reads `DIR/old-<i>.json` and `DIR/new-<i>.json`
(`benchmark.json` files of runs that alternated old, new, old, new, ... in separate processes) and
prints, per figure, the new/old speed ratio of every alternation and their median (speed: the
inverse of a time, or a rate as it is). The redesign's A/B run is in
`experiments/results/redesign_ab/`.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
from typing import Any

# figure path in benchmark.json -> "time" (lower is faster) or "rate" (higher is faster)
FIGURES = {
    **{f"watching/vgg_fmnist/ms_per_step/{k}": "time" for k in ("nr", "no_nr", "plain_flax")},
    **{f"watching/resnet_fmnist/ms_per_step/{k}": "time" for k in ("nr", "no_nr")},
    **{f"latency/{m}/seconds_median": "time" for m in ("resnet50", "densenet121")},
    **{
        f"post/{m}/ms_per_step/{k}": "time"
        for m in ("vgg_fmnist", "resnet_fmnist")
        for k in ("removed", "attention", "dense")
    },
    **{
        f"efficiency/{m}/{k}": "time"
        for m in ("vgg_fmnist", "resnet_fmnist")
        for k in ("ms_per_step", "ms_per_step_xla_kernel_grad")
    },
    "pipeline/augment=False/vs_step": "rate",
    "pipeline/augment=True/vs_step": "rate",
}


def figure(result: dict[str, Any], path: str) -> float | None:
    """The figure at `path`, or None when its section was not run (`--sections`)."""
    for key in path.split("/"):
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return float(result)


def table(directory: str) -> str:
    """The markdown table of new/old speed ratios for the runs in `directory`."""
    runs: dict[str, list[dict]] = {}
    for side in ("old", "new"):
        for path in sorted(glob.glob(os.path.join(directory, f"{side}-*.json"))):
            with open(path) as f:
                runs.setdefault(side, []).append(json.load(f))
    n = min(len(runs.get("old", [])), len(runs.get("new", [])))
    if n == 0:
        raise SystemExit(f"error: no old-<i>.json / new-<i>.json pairs in {directory}")
    lines = [
        f"{n} alternations (old, new in separate processes, in turn)",
        "",
        "| figure | old (median) | new (median) | new/old speed per alternation | median |",
        "|---|---|---|---|---|",
    ]
    skipped = []
    for path, kind in FIGURES.items():
        old = [figure(r, path) for r in runs["old"][:n]]
        new = [figure(r, path) for r in runs["new"][:n]]
        if None in old or None in new:
            skipped.append(path)
            continue
        ratios = [o / w if kind == "time" else w / o for o, w in zip(old, new, strict=True)]
        lines.append(
            f"| {path} | {statistics.median(old):.4g} | {statistics.median(new):.4g} | "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + f" | {statistics.median(ratios):.3f} |"
        )
    if skipped:
        lines.append(f"- not in every run (section not run): {', '.join(skipped)}")
    for side in ("old", "new"):
        for i, r in enumerate(runs[side][:n], 1):
            traces = r.get("compilations", {}).get("traces", "not run")
            lines.append(
                f"- {side} {i}: traces {traces}, wall {r['wall_s']:.0f} s, "
                f"load average at start {[round(x, 2) for x in r['load_average_start']]}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/redesign_ab"))
