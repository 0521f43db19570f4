"""Curves of a sweep: one PNG per plotted metric, one line per variant.

A variant's line is the mean over its finished seeds at the steps all of them logged, smoothed by an
exponential moving average (``smoothing`` in the sweep file; 0 plots the raw values); with several
seeds a band shows their minimum and maximum. Files are ``plot_<metric>.png`` with ``/`` as ``_``
(``plot_train_loss.png``, ``plot_train_max_vio.png``).

matplotlib is optional (not a dependency of the package): without it ``draw`` returns no files and
says how to install it; the table is written either way.
"""

from __future__ import annotations

from pathlib import Path

from dsv3_lightning.sweep.results import RunResult, curve, read_metrics
from dsv3_lightning.sweep.spec import Sweep

MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install matplotlib); the tables are written"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def ema(values: list[float], beta: float) -> list[float]:
    out, avg = [], values[0] if values else 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every curve logged, and the mean, minimum and maximum over the curves at each."""
    per_curve = [dict(c) for c in curves]
    steps = sorted(set.intersection(*(set(c) for c in per_curve))) if per_curve else []
    at = [[c[s] for c in per_curve] for s in steps]
    return steps, [sum(v) / len(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def draw(sweep: Sweep, results: list[RunResult], out: Path) -> list[Path]:
    """Writes one PNG per metric of ``sweep.plots`` that some finished run logged; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    finished = [r for r in results if r.status == "finished"]
    rows = {r.run.label: read_metrics(r.run.directory / "metrics.csv") for r in finished}
    written = []
    for metric in sweep.plots:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = False
        for variant in sweep.variants:
            curves = [curve(rows[r.run.label], metric) for r in finished if r.run.variant is variant]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps, mean, low, high = mean_curve(curves)
            (line,) = ax.plot(steps, ema(mean, sweep.smoothing), label=variant.name, linewidth=1.5)
            if len(curves) > 1:
                ax.fill_between(steps, ema(low, sweep.smoothing), ema(high, sweep.smoothing),
                                color=line.get_color(), alpha=0.15, linewidth=0)
            drawn = True
        if drawn:
            seeds = f", mean of {len(sweep.seeds)} seeds (band: min-max)" if sweep.seeds and len(sweep.seeds) > 1 else ""
            smooth = f", EMA {sweep.smoothing:g}" if sweep.smoothing else ""
            ax.set(xlabel="step", ylabel=metric, title=f"{sweep.name}: {metric}{seeds}{smooth}")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out / f"plot_{metric.replace('/', '_')}.png"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written
