"""Running a sweep's runs: each its own `dsv3 fit` process, ``jobs`` at a time, one line per event.

Each run is ``python -m dsv3_lightning.cli fit ARGS`` in a fresh process, so that runs share no state
(random generators, the CUDA context, a plugin's module-level caches, a crash). Its stdout and stderr
go to ``<out>/logs/<variant>[_seed<N>].log``; the sweep prints one line when a run starts, is skipped,
finishes or fails, with the count done and an estimate of the time left, and a line on what is
running when nothing else happened for a while (``--heartbeat``, 60 s), e.g.

    [3/8] bias/seed1 finished in 3m52s: val/loss 4.631, val/max_vio 0.39 (about 12m left)
    [3/8] running: bias/seed2 (1m00s, step 99), bias_seq/seed1 (0m58s)

A run is skipped when its directory holds the marker of a finished run with the same arguments
(``marker.py``). Any other existing directory (an interrupted run, or one made with other arguments)
is removed before the run starts again: Lightning would otherwise mix old and new metrics and
checkpoints. With ``jobs`` > 1 each process gets ``OMP_NUM_THREADS = cpu_count // jobs`` (unless the
environment sets it), so that parallel runs do not fight over the cores.

A failed run does not stop the others; ``run_all`` returns the labels of the failed runs.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from dsv3_lightning.sweep.marker import is_finished, read_marker
from dsv3_lightning.sweep.results import Metric, read_metrics, summarise
from dsv3_lightning.sweep.spec import Run


def log_path(out: Path, run: Run) -> Path:
    return out / "logs" / (run.label.replace("/", "_") + ".log")


@dataclass
class Progress:
    """Prints one line per event, prefixed [runs done/runs in all]; thread-safe (runs end on worker threads)."""

    total: int
    jobs: int
    echo: Callable[[str], None]

    def __post_init__(self) -> None:
        self.done = 0
        self.durations: list[float] = []
        self.running: dict[str, tuple[Run, float]] = {}
        self.lock = threading.Lock()

    def started(self, run: Run, log: Path, note: str = "") -> None:
        with self.lock:
            self.running[run.label] = (run, time.perf_counter())
            self.echo(f"[{self.done}/{self.total}] {run.label} started (log: {log}{note})")

    def event(self, run: Run, text: str, *, seconds: float | None = None) -> None:
        """A run is done: skipped, finished (``seconds`` it took) or failed."""
        with self.lock:
            self.running.pop(run.label, None)
            self.done += 1
            if seconds is not None:
                self.durations.append(seconds)
            left = self.total - self.done
            eta = ""
            if self.durations and left:
                eta = f" (about {duration(sum(self.durations) / len(self.durations) * left / self.jobs)} left)"
            self.echo(f"[{self.done}/{self.total}] {run.label} {text}{eta}")

    def heartbeat(self) -> None:
        """What is running, for how long, and the last step its metrics.csv shows."""
        with self.lock:
            now = time.perf_counter()
            parts = []
            for label, (run, start) in self.running.items():
                step = last_step(run.directory / "metrics.csv")
                parts.append(f"{label} ({duration(now - start)}{'' if step is None else f', step {step}'})")
            if parts:
                self.echo(f"[{self.done}/{self.total}] running: {', '.join(parts)}")


def run_all(
    runs: list[Run],
    out: Path,
    jobs: int,
    table: tuple[Metric, ...],
    echo: Callable[[str], None] = print,
    heartbeat: float = 60.0,
) -> set[str]:
    """Runs every unfinished run, ``jobs`` at a time; returns the labels of those that failed.

    Every ``heartbeat`` seconds without another event, a line says what is running.
    """
    progress = Progress(total=len(runs), jobs=jobs, echo=echo)
    todo = []
    for run in runs:
        if is_finished(run):
            progress.event(run, "skipped: finished earlier with the same arguments")
        else:
            todo.append(run)
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    failed: set[str] = set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_run_one, run, out, env, progress): run for run in todo}
        pending = set(futures)
        while pending:
            ended, pending = wait(pending, timeout=heartbeat, return_when=FIRST_COMPLETED)
            if not ended:
                progress.heartbeat()
            for future in ended:
                run = futures[future]
                code, seconds = future.result()
                log = log_path(out, run)
                if code == 0 and is_finished(run):
                    progress.event(run, f"finished in {duration(seconds)}{_headline(run, table)}", seconds=seconds)
                else:
                    failed.add(run.label)
                    tail = "\n".join("    " + line for line in _tail(log, 8))
                    progress.event(run, f"FAILED (exit code {code}) after {duration(seconds)}; log: {log}\n{tail}")
    return failed


def _run_one(run: Run, out: Path, env: dict[str, str], progress: Progress) -> tuple[int, float]:
    replaced = ""
    if run.directory.exists():
        stale = read_marker(run.directory) is not None
        replaced = f", replacing {'a run made with other arguments' if stale else 'an unfinished run'}"
        shutil.rmtree(run.directory)
    log = log_path(out, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    progress.started(run, log, replaced)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(
            [sys.executable, "-m", "dsv3_lightning.cli", "fit", *run.fit_args],
            stdout=f, stderr=subprocess.STDOUT, env=env, check=False,
        ).returncode
    return code, time.perf_counter() - start


def last_step(metrics: Path) -> int | None:
    """The step of the last row of a run's metrics.csv so far (CSVLogger writes it every 100 steps by
    default), or None while there is none or the file is being rewritten."""
    try:
        rows = read_metrics(metrics)
        return int(float(rows[-1]["step"])) if rows else None
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _headline(run: Run, table: tuple[Metric, ...]) -> str:
    rows = read_metrics(run.directory / "metrics.csv")
    values = [(m.label, summarise(rows, m)) for m in table]
    shown = [f"{label} {value:.4g}" for label, value in values if not math.isnan(value)]  # NaN: not logged
    return ": " + ", ".join(shown) if shown else ""


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip().splitlines()[-lines:]
    except FileNotFoundError:
        return []


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
