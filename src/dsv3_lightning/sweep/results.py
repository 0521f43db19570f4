"""A sweep's results: every run's metrics.csv, summarised into results.csv and results.md.

Each run logs with Lightning's CSVLogger: one row per logging call, a ``step`` column, one column
per metric, empty where a row did not log it. ``curves`` reads one metric's (step, value) pairs.
A ``Metric`` of the sweep file summarises a run as the metric's last logged value, or as the mean of
the values logged in the run's last N steps (``last_steps``: e.g. MaxVio_batch over 100 steps).

- ``results.csv``: one row per run (variant, seed, status, seconds, one column per table metric),
  the raw numbers for any later analysis.
- ``results.md``: one row per variant, mean ± sample standard deviation over its finished seeds
  (the value alone for one seed), the command that made it on top.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from dsv3_lightning.sweep.marker import is_finished, read_marker
from dsv3_lightning.sweep.spec import Metric, Run, Sweep


@dataclass(frozen=True, kw_only=True)
class RunResult:
    run: Run
    status: str
    """``finished``, ``failed`` or ``not run``."""
    seconds: float
    """Wall time of ``fit`` (from the run's marker), NaN when unknown."""
    values: dict[str, float]
    """Table metric label -> summary, NaN when the run did not log it."""


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def curve(rows: list[dict[str, str]], metric: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged ``metric``, in logging order."""
    return [(int(float(r["step"])), float(r[metric])) for r in rows if r.get(metric) not in (None, "")]


def summarise(rows: list[dict[str, str]], metric: Metric) -> float:
    points = curve(rows, metric.metric)
    if not points:
        return math.nan
    if metric.last_steps is None:
        return points[-1][1]
    last_step = points[-1][0]
    window = [v for s, v in points if s > last_step - metric.last_steps]
    return sum(window) / len(window)


def collect(sweep: Sweep, runs: list[Run], failed: set[str]) -> list[RunResult]:
    """The result of every run: those finished with these arguments (their marker) summarised, the others marked.

    A run whose marker holds other arguments (made by another version of the sweep) is not reported.
    """
    results = []
    for run in runs:
        metrics = run.directory / "metrics.csv"
        if is_finished(run) and metrics.is_file():
            marker = read_marker(run.directory)
            rows = read_metrics(metrics)
            values = {m.label: summarise(rows, m) for m in sweep.table}
            results.append(RunResult(run=run, status="finished", seconds=float(marker.get("seconds", math.nan)),
                                     values=values))
        else:
            status = "failed" if run.label in failed else "not run"
            results.append(RunResult(run=run, status=status, seconds=math.nan,
                                     values={m.label: math.nan for m in sweep.table}))
    return results


def write_csv(path: Path, sweep: Sweep, results: list[RunResult]) -> None:
    labels = [m.label for m in sweep.table]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "status", "seconds", *labels])
        for r in results:
            seed = "" if r.run.seed is None else r.run.seed
            writer.writerow([r.run.variant.name, seed, r.status, _raw(r.seconds), *(_raw(r.values[k]) for k in labels)])


def markdown_table(sweep: Sweep, results: list[RunResult]) -> str:
    """One row per variant: mean ± std over its finished runs, and how many of its runs finished."""
    labels = [m.label for m in sweep.table]
    described = any(v.description for v in sweep.variants)
    header = ["variant", *(["description"] if described else []), "runs", *labels, "fit time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in sweep.variants:
        mine = [r for r in results if r.run.variant is variant]
        done = [r for r in mine if r.status == "finished"]
        cells = [variant.name, *([variant.description] if described else []), f"{len(done)}/{len(mine)}"]
        cells += [mean_std([r.values[k] for r in done]) for k in labels]
        cells.append(mean_std([r.seconds for r in done], digits=3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, sweep: Sweep, results: list[RunResult], command: str) -> None:
    seeds = f"seeds {', '.join(map(str, sweep.seeds))}" if sweep.seeds else "the base config's seed"
    text = (
        f"# Sweep `{sweep.name}`\n\n"
        f"```bash\n{command}\n```\n\n"
        f"{len(sweep.variants)} variants × {seeds}; mean ± standard deviation over the finished seeds.\n\n"
        f"{markdown_table(sweep, results)}\n"
    )
    path.write_text(text)


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` with ``digits`` significant digits for the mean; ``-`` when nothing is known."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.2g}"


def _raw(value: float) -> str:
    return "" if math.isnan(value) else repr(value)
