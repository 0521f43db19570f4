"""How a sweep knows that a run finished: a marker file the run itself writes when ``fit`` ends.

Every run of a sweep carries the ``FinishedMarker`` callback (``--trainer.callbacks+=``). When
``Trainer.fit`` ends normally (not interrupted by Ctrl-C, not crashed: Lightning skips
``on_fit_end`` then) it writes ``sweep_finished.json`` into the run's log directory: the run's
``dsv3 fit`` arguments, its last optimizer step and its wall time.

Because the run writes it, not the sweep process, a run started from ``dsv3 sweep --print_commands``
on a cluster counts as finished too, and ``dsv3 sweep --report_only`` then tabulates it. A run is
skipped when its marker holds exactly the arguments the sweep would run it with now; a marker with
other arguments (the sweep file or the extra arguments changed) means the run is stale and runs again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L

from dsv3_lightning.rank_local import log_dir

if TYPE_CHECKING:
    from dsv3_lightning.sweep.spec import Run

MARKER = "sweep_finished.json"


class FinishedMarker(L.Callback):
    """Writes ``sweep_finished.json`` (arguments, step, seconds) into the log directory once fit ends."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:  # rank 0 only: no trainer.log_dir (a broadcast)
            return
        record = {
            "fit_args": _fit_args(sys.argv),
            "global_step": trainer.global_step,
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        (log_dir(trainer) / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def _fit_args(argv: list[str]) -> list[str]:
    """The arguments after ``fit``, however the run was launched (``dsv3 fit``, ``python -m ...cli fit``)."""
    return argv[argv.index("fit") + 1 :] if "fit" in argv else argv[1:]


def read_marker(directory: Path) -> dict | None:
    """The marker of the run logging in ``directory``, or None if it has not finished."""
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a marker cut short (disk full, a killed write): treat the run as unfinished


def is_finished(run: Run) -> bool:
    """Whether ``run`` finished with exactly its current arguments (else it is missing or stale)."""
    marker = read_marker(run.directory)
    return marker is not None and marker.get("fit_args") == list(run.fit_args)
