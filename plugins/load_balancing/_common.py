"""What every load-balancing plugin needs: the routers, checked, and a global sum.

The routers are the model's MoE layers in order, then those inside prediction heads (the MTP modules
are MoE blocks too, and DeepSeek-V3 balances them like the others).
"""

from __future__ import annotations

import lightning as L
import torch

from dsv3_lightning.collectives import sum_over_processes
from dsv3_lightning.model.router import Router


def moe_routers(pl_module: L.LightningModule, plugin: str) -> list[Router]:
    """The routers of ``pl_module.model`` and its heads, or a clear error when there is nothing to balance."""
    model = getattr(pl_module, "model", None)
    routers = model.routers() if model is not None and hasattr(model, "routers") else []
    if not routers:
        raise ValueError(
            f"{plugin} balances MoE layers, but the model has none (model.config.first_k_dense_replace >= "
            "num_hidden_layers?): lower first_k_dense_replace or remove the callback"
        )
    heads = getattr(pl_module, "heads", [])
    return routers + [m for head in heads for m in head.modules() if isinstance(m, Router)]


def global_sum(trainer: L.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over every process of the run (data, expert and pipeline ranks alike), in one
    all-reduce of a copy (the core's ``sum_over_processes``: no barrier); nothing on one process."""
    return sum_over_processes(trainer, tensor.clone())
