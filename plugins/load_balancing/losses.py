"""Balance losses added to the training loss: DeepSeek-V3's sequence-wise one and the classic one.

Both are α · Σ_i f_i · P_i per MoE layer, summed over layers (SPEC.md §4.3), with

    f_i = N / (K · T) · #{tokens t routed to expert i}       (no gradient: routing is discrete)
    P_i = 1 / T · Σ_t s'_{i,t},   s'_{i,t} = s_{i,t} / Σ_j s_{j,t}   (the gradient flows through P)

and differ in what T is:
- ``SequenceBalanceLoss`` (V3, α = 1e-4): T is one sequence; the loss is averaged over sequences. A
  safety net against one sequence flooding a few experts, not the main balancing mechanism.
- ``AuxBalanceLoss`` (the classic batch-level auxiliary loss DeepSeek compared against, α ≈ 1e-3):
  T is every token of the micro-batch.

f counts the routed top-k (the experts actually chosen, with the selection bias), as DeepSeek's
and most implementations do; s' normalises the unbiased scores over all experts, so it is the same
for sigmoid and softmax routers. Each loss is a per-router term registered with the LightningModule
(``register_loss_term``): every router computes α·Σ f·P from its own forward's statistics and attaches
it to its layer's output (the core's router_losses.py), so the loss works on one process and under a
pipeline alike. Logged as ``train/seq_balance_loss`` or ``train/aux_balance_loss``: the sum over the
MoE layers (and the MTP blocks'), the global batch's value.

In a pipeline or gradient-accumulation micro-batch, T is that micro-batch's tokens (``AuxBalanceLoss``)
or one of its sequences (``SequenceBalanceLoss``, unchanged by how the batch is cut), as in DeepSeek's
and Megatron's code.
"""

from __future__ import annotations

import lightning as L
import torch
from dsv3_lightning.plugins.load_balancing._common import moe_routers

from dsv3_lightning.model.router import Router, RouterStats


def balance_loss(stats: RouterStats, num_experts: int, *, per_sequence: bool) -> torch.Tensor:
    """Σ_i f_i · P_i for one layer (without α), averaged over sequences when ``per_sequence``."""
    scores_TE = stats.scores_TE
    top_k = stats.topk_ids_TK.shape[-1]
    groups = stats.batch_shape[0] if per_sequence else 1
    scores_GTE = scores_TE.reshape(groups, -1, num_experts)
    ids_GTK = stats.topk_ids_TK.reshape(groups, -1, top_k)
    tokens = scores_GTE.shape[1]
    routed_GE = torch.zeros(groups, num_experts, device=scores_TE.device).scatter_add_(
        1, ids_GTK.flatten(1), torch.ones(ids_GTK.flatten(1).shape, device=scores_TE.device)
    )
    f_GE = routed_GE * num_experts / (top_k * tokens)
    P_GE = (scores_GTE / scores_GTE.sum(-1, keepdim=True)).mean(1)
    return (f_GE * P_GE).sum(-1).mean()


class _BalanceLoss(L.Callback):
    name: str
    per_sequence: bool

    def __init__(self, alpha: float) -> None:
        if not alpha >= 0:
            raise ValueError(f"trainer.callbacks[{type(self).__name__}].alpha ({alpha}) must be >= 0")
        self.alpha = alpha

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        moe_routers(pl_module, type(self).__name__)  # a clear error when there is nothing to balance
        if stage != "fit" or not hasattr(pl_module, "register_loss_term"):
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"trainer.callbacks[{type(self).__name__}] does not support a gradient scaler (trainer.precision "
                f"{trainer.precision!r}): the balance loss's gradient starts inside each layer, unscaled; use "
                "precision bf16-mixed or 32"
            )
        alpha, per_sequence = self.alpha, self.per_sequence

        def term(stats: RouterStats, router: Router) -> torch.Tensor:
            return alpha * balance_loss(stats, router.num_experts, per_sequence=per_sequence)

        pl_module.register_loss_term(self.name, term)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "remove_loss_term"):
            pl_module.remove_loss_term(self.name)


class SequenceBalanceLoss(_BalanceLoss):
    """DeepSeek-V3's complementary sequence-wise balance loss, ``alpha`` = 1e-4 as in the paper."""

    name = "seq_balance_loss"
    per_sequence = True

    def __init__(self, alpha: float = 1e-4) -> None:
        super().__init__(alpha)


class AuxBalanceLoss(_BalanceLoss):
    """The classic batch-level auxiliary balance loss N·Σ f_i·P_i, ``alpha`` = 1e-3 as in the [LF] baseline."""

    name = "aux_balance_loss"
    per_sequence = False

    def __init__(self, alpha: float = 1e-3) -> None:
        super().__init__(alpha)
