"""Expert-load metrics: MaxVio per step and over the validation set, dead experts, a load heat map.

    MaxVio = (max_i Load_i − mean_i Load_i) / mean_i Load_i         (SPEC.md §10, per MoE layer)

- ``train/max_vio``: MaxVio_batch of each training micro-batch (summed over ranks), averaged over
  MoE layers; ``train/max_vio/layer_{i}`` per layer (i is the decoder layer index).
- ``train/dead_experts``: (layer, expert) pairs that received no token in the last ``window`` steps.
- ``val/max_vio``: MaxVio_global, from the loads summed over the whole validation set by a
  torchmetrics ``Metric`` (so every rank's batches count), averaged over layers; per layer too.
- A layer × expert heat map of the validation load, load/mean on a log2 colour scale: an image in
  TensorBoard when it is a logger, otherwise ``expert_load_step{N}.png`` in the run's log directory.

Works alone (no balancing) and beside any balancing plugin, under every strategy: a batch's load is
the difference of the routers' running totals (``router.tokens_routed_total``) around the batch, so it
covers every forward a strategy runs for it (a pipeline's micro-batches, on whichever rank each layer
lives: the other ranks add zeros), summed over all processes; it never touches the counts the bias
update consumes.
"""

from __future__ import annotations

from collections import deque

import lightning as L
import torch
import torchmetrics
from dsv3_lightning.plugins.load_balancing._common import global_sum, moe_routers
from dsv3_lightning.plugins.load_balancing.heatmap import load_heatmap, write_png
from dsv3_lightning.rank_local import log_dir
from lightning.pytorch.loggers import TensorBoardLogger


def max_violation(load_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio of each row: (max − mean) / mean of the per-expert loads."""
    load_LE = load_LE.float()
    mean = load_LE.mean(-1)
    return (load_LE.amax(-1) - mean) / mean.clamp_min(1e-12)


class ExpertLoad(torchmetrics.Metric):
    """Tokens routed to each (layer, expert), summed over updates and, on compute, over ranks."""

    full_state_update = False

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__()
        self.add_state("load", default=torch.zeros(num_layers, num_experts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, load_LE: torch.Tensor) -> None:
        self.load += load_LE.to(self.load)

    def compute(self) -> torch.Tensor:
        return self.load


class ExpertLoadMonitor(L.Callback):
    """Logs how evenly the routed experts are loaded (see the module docstring).

    Args:
        window: Steps over which an expert with no token counts as dead.
        heatmap: Write the validation load heat map.
    """

    def __init__(self, window: int = 100, heatmap: bool = True) -> None:
        if window < 1:
            raise ValueError(f"trainer.callbacks[ExpertLoadMonitor].window ({window}) must be >= 1")
        self.window = window
        self.heatmap = heatmap
        self._recent: deque[torch.Tensor] = deque(maxlen=window)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.routers = moe_routers(pl_module, type(self).__name__)
        config = pl_module.model.config
        self.layer_ids = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        self.val_load = ExpertLoad(len(self.routers), config.n_routed_experts)

    def _totals(self) -> torch.Tensor:
        return torch.stack([r.tokens_routed_total for r in self.routers])

    def _batch_load(self) -> torch.Tensor:
        """Tokens per (layer, expert) routed on this process since ``_start`` (this batch's forwards)."""
        return (self._totals() - self._start).float()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._start = self._totals()

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        load_LE = global_sum(trainer, self._batch_load())
        vio_L = max_violation(load_LE)
        self._recent.append(load_LE.cpu())
        dead = (torch.stack(tuple(self._recent)).sum(0) == 0).sum()
        logs = {"train/max_vio": vio_L.mean(), "train/dead_experts": dead.float()}
        logs.update({f"train/max_vio/layer_{i}": v for i, v in zip(self.layer_ids, vio_L)})
        pl_module.log_dict(logs)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_load.reset()
        self.val_load.to(pl_module.device)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._start = self._totals()

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self.val_load.update(self._batch_load())

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        load_LE = self.val_load.compute()
        vio_L = max_violation(load_LE)
        logs = {"val/max_vio": vio_L.mean()}
        logs.update({f"val/max_vio/layer_{i}": v for i, v in zip(self.layer_ids, vio_L)})
        pl_module.log_dict({k: v.float() for k, v in logs.items()})
        if self.heatmap and trainer.is_global_zero:  # no collective below: rank_local.log_dir
            self._write_heatmap(trainer, load_LE)

    def _write_heatmap(self, trainer: L.Trainer, load_LE: torch.Tensor) -> None:
        image_HW3 = load_heatmap(load_LE)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/expert_load", image_HW3, trainer.global_step, dataformats="HWC")
                return
        write_png(log_dir(trainer) / f"expert_load_step{trainer.global_step}.png", image_HW3)

    def state_dict(self) -> dict:
        return {"recent": list(self._recent)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._recent = deque(state_dict.get("recent", []), maxlen=self.window)
