"""LogProgress: a training progress bar for logs, one plain line every N optimizer steps.

A terminal gets Lightning's TQDM bar, drawn on stdout; a log file (``dsv3 fit ... > fit.log 2>&1``, a
batch job) got nothing from Lightning's bars until the run ended. ``dsv3`` installs this bar instead
when stdout is not a terminal. Being a ``ProgressBar`` subclass, Lightning treats it as *the* progress bar:
``trainer.enable_progress_bar: false`` turns it off, and a progress bar in ``trainer.callbacks``
replaces it. Every ``every_n_steps`` optimizer steps (default ``trainer.log_every_n_steps``), and at
the last step, rank zero logs::

    step 120/400 (30%) | loss 5.123 | lr 2.90e-03 | 5,120 tok/s | elapsed 1m02s | eta 2m30s

and after each validation of the fit::

    validation at step 200: val/loss 4.639 | val/ppl 103.4 | val/accuracy 0.2131 | took 12s

(the ``val/`` metrics the module logs with ``prog_bar=True``).

- ``loss`` is the latest ``train/loss`` of rank zero (``trainer.progress_bar_metrics``), read only on
  the steps that print: TQDM reads it every step, a host-device sync each time; here it is one
  sync per printed line, which also makes the timing of the window exact without a
  ``cuda.synchronize``. On-step metrics are cached tensors, so reading them runs no collective and
  is safe on one rank.
- ``tok/s`` counts the next-token targets of every training batch since the previous line
  (``data.targets_in_batch``, from the batch's shape: no sync), times the data-parallel replicas
  (``data.data_replicas``, the strategy's sampler replicas: the pipeline ranks of DualPipe read the
  same batch and count once), over the wall time of the window less the validations in it.
- ``eta`` extrapolates the mean time per step of this run (validations included) to
  ``trainer.estimated_stepping_batches``; a resumed run counts from the step it resumed at.
- Lines go to the ``dsv3_lightning.progress`` logger, which the CLI writes to stderr, flushed per
  line (``> fit.log 2>&1`` keeps them with the rest). Other ranks are disabled by
  ``ProgressBar.setup`` and print nothing.

Not shown: sanity-check validation, and the batches of ``validate``/``test``/``predict``, whose
results Lightning prints as a table at the end.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from typing_extensions import override

from dsv3_lightning.data import data_replicas, targets_in_batch

log = logging.getLogger(__name__)


class LogProgress(ProgressBar):
    """Training progress as log lines; see the module docstring for the fields.

    Args:
        every_n_steps: Optimizer steps between lines; ``None`` uses ``trainer.log_every_n_steps``.
        loss_key: The progress-bar metric shown as ``loss``.
    """

    def __init__(self, every_n_steps: int | None = None, loss_key: str = "train/loss") -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"LogProgress.every_n_steps ({every_n_steps}) must be >= 1, "
                "or null for trainer.log_every_n_steps"
            )
        self.every_n_steps = every_n_steps
        self.loss_key = loss_key
        self._enabled = True
        self._start = self._window_start = self._validation_start = 0.0
        self._start_step = self._printed_step = 0
        self._tokens = 0
        self._total: float = math.inf
        self._replicas = 1

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._window_start = time.perf_counter()
        self._start_step = self._printed_step = trainer.global_step
        self._tokens = 0
        self._total = trainer.estimated_stepping_batches
        self._replicas = data_replicas(trainer)[0]

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += targets_in_batch(batch)
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps
        if step == self._printed_step or (step % every and step < self._total):
            return
        if self._enabled:
            log.info(self._step_line(trainer, step))
        self._printed_step = step
        self._tokens = 0
        self._window_start = time.perf_counter()

    def _step_line(self, trainer: L.Trainer, step: int) -> str:
        metrics = trainer.progress_bar_metrics  # the one host sync of this line
        now = time.perf_counter()
        fields = [f"step {step}"]
        if math.isfinite(self._total):
            fields[0] += f"/{int(self._total)} ({100 * step / self._total:.0f}%)"
        if self.loss_key in metrics:
            fields.append(f"loss {float(metrics[self.loss_key]):.3f}")
        if trainer.optimizers:
            fields.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        window = now - self._window_start
        if window > 0:
            fields.append(f"{self._tokens * self._replicas / window:,.0f} tok/s")
        elapsed = now - self._start
        fields.append(f"elapsed {_duration(elapsed)}")
        done = step - self._start_step
        if done > 0 and math.isfinite(self._total):
            fields.append(f"eta {_duration(elapsed / done * max(self._total - step, 0))}")
        return " | ".join(fields)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        took = time.perf_counter() - self._validation_start
        self._window_start += took  # tok/s counts training time only
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._enabled:
            return
        # The metrics the module shows on a progress bar (val/loss, val/ppl, val/accuracy), computed
        # already on every rank by the validation loop: reading them here runs no collective.
        metrics = trainer.progress_bar_metrics
        results = [f"{k} {float(v):.4g}" for k, v in metrics.items() if k.startswith("val/")]
        log.info(f"validation at step {trainer.global_step}: {' | '.join(results)} | took {_duration(took)}")


def _duration(seconds: float) -> str:
    """``45s``, ``1m02s``, ``2h03m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


__all__ = ["LogProgress"]
