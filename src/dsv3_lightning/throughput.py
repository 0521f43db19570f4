"""ThroughputMonitor: Lightning's, with its running counts carried across a resume.

Lightning's ``ThroughputMonitor`` logs ``train/batches``, ``train/samples`` and ``train/lengths``
(here windows and target tokens: ``data.windows_in_batch`` / ``data.targets_in_batch``) as counts since
training started in this process, so a run resumed from a checkpoint logs them from zero again: the
tokens-seen curve of a resumed run restarts. This subclass saves the three training counts in the
checkpoint (``state_dict``; Lightning keeps callback states by class name) and starts from them after
a resume. Rates (``*_per_sec``) and times are unchanged: they are about this process.

The counts are global rank 0's, as Lightning's are (its hooks run on rank zero only).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor as _LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from typing_extensions import override


class ThroughputMonitor(_LightningThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (same arguments) whose training counts survive a resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored: dict[str, int] | None = None

    @override
    def state_dict(self) -> dict[str, int]:
        stage = RunningStage.TRAINING
        return {
            "batches": self._batches.get(stage, 0),
            "samples": self._samples.get(stage, 0),
            "lengths": self._lengths.get(stage, 0),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    @override
    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        stage = RunningStage.TRAINING
        if trainer.state.stage == stage and self._restored is not None:
            self._batches[stage] = self._restored["batches"]
            self._samples[stage] = self._restored["samples"]
            self._lengths[stage] = self._restored["lengths"]
            self._restored = None


__all__ = ["ThroughputMonitor"]
