"""TrainingFlopsSummary: Lightning's model summary with the model's training FLOPs instead of zeros.

Lightning's ``ModelSummary`` measures FLOPs by running the module's ``example_input_array`` under
torch's ``FlopCounterMode``. ``DSV3LightningModule`` has no example input (a forward pass of a large
model at start-up, under expert or pipeline parallelism, is not free), so Lightning printed a FLOPs
column of zeros and "Total FLOPs: 0". This summary keeps Lightning's layer table and totals, drops
the FLOPs column, and states the analytic figure that the module already computes for
``ThroughputMonitor``: ``flops_per_token`` = 6 × activated parameters without the embedding lookup
(forward and backward of every matrix a token passes through; attention scores, QKᵀ and AV, are not
counted), and per optimizer step, times the tokens of the global batch (``data.batch_size`` ×
``data.seq_len`` × ``accumulate_grad_batches`` × the data-parallel replicas).

The table is plain text through the ``dsv3_lightning.summary`` logger, so that a log file reads like
the terminal. It is what ``dsv3`` installs unless ``trainer.enable_model_summary`` is false or
``trainer.callbacks`` has a summary of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from typing_extensions import override

from dsv3_lightning.data import DSV3DataModule, data_replicas
from dsv3_lightning.module import DSV3LightningModule

log = logging.getLogger(__name__)


class TrainingFlopsSummary(ModelSummary):
    """Lightning's ``ModelSummary`` (same arguments) without the FLOPs column, with training FLOPs."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth, **summarize_kwargs)
        self._flops_line: str | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flops_line = training_flops(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def summarize(  # an instance method here: Lightning calls it as self.summarize(...)
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
        rule = "-" * (sum(widths) + 3 * len(widths))
        lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths)), rule]
        for row in zip(*(values for _, values in columns)):
            lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        lines.append(rule)
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
            (get_human_readable_count(total_parameters), "Total params"),
            (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
            (str(total_training_modes["train"]), "Modules in train mode"),
            (str(total_training_modes["eval"]), "Modules in eval mode"),
        ]
        lines += [f"{value:<10}{label}" for value, label in totals]
        if self._flops_line:
            lines.append(self._flops_line)
        log.info("\n" + "\n".join(lines))


def training_flops(trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
    """``"1.4 M     Training FLOPs per token, 11.5 G per optimizer step of 8,192 tokens (...)"``, or
    None for a module that does not state its FLOPs."""
    if not isinstance(pl_module, DSV3LightningModule):
        return None
    per_token = pl_module.flops_per_token
    text = f"{_flops(per_token):<10}Training FLOPs per token"
    datamodule = trainer.datamodule
    if isinstance(datamodule, DSV3DataModule):
        replicas, _ = data_replicas(trainer)
        tokens = datamodule.batch_size * datamodule.seq_len * trainer.accumulate_grad_batches * replicas
        text += f", {_flops(per_token * tokens)} per optimizer step of {tokens:,} tokens"
    return text + " (6 x activated parameters without the embedding; attention scores not counted)"


def _flops(count: float) -> str:
    """``269 K``, ``11.5 G``, ``3.1 P``: SI prefixes, as FLOPs are counted."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {prefix}"
    return f"{count:.0f}"


__all__ = ["TrainingFlopsSummary", "training_flops"]
