"""What every load-balancing plugin needs: the routers, checked, and a global sum.

The routers are the model's MoE layers in order, then those inside prediction heads (the MTP modules
are MoE blocks too, and DeepSeek-V3 balances them like the others).
"""

from __future__ import annotations

import lightning as L
import torch

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
    """Sums ``tensor`` over every process of the run (data and expert parallel ranks alike).

    Goes through the strategy, so that a single-device run is a no-op and any strategy that can
    reduce (DDP, expert parallel, ...) is used as it is.
    """
    if trainer.world_size == 1:
        return tensor
    return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
