"""Auxiliary-loss-free load balancing (SPEC.md §4.2): nudge each expert's selection bias every step.

    c_i  = tokens routed to expert i in one MoE layer, over the whole global batch of the step
           (all gradient-accumulation micro-batches, all data / expert parallel ranks)
    b_i <- b_i + u · sign(mean(c) - c_i)          overloaded experts get less attractive, idle ones more

The bias (``router.e_score_correction_bias``, float32) only changes which experts are selected, never
the gate values, so balance is bought without a loss term that pulls against the language model.

When: ``on_before_optimizer_step``, which Lightning calls once per optimizer step, after the last
micro-batch's backward. The counts come from ``router.pop_tokens_per_expert()``, which the router
fills during training forwards only (not during validation, not during activation recomputation)
and this callback empties; so accumulation is summed and nothing is counted twice. Every rank
all-reduces the same counts and applies the same update: the biases stay identical everywhere.

Schedule: V3 used u = 0.001 and set it to 0 for its last 500B of 14.8T tokens; ``freeze_at_step`` or
``freeze_at_fraction`` (of ``trainer.max_steps``, or of the estimated steps) does the same. The
biases are model buffers, so checkpoints carry them and a resumed run continues with them.
"""

from __future__ import annotations

import lightning as L
import torch
from dsv3_lightning.plugins.load_balancing._common import global_sum, moe_routers

_KEY = "trainer.callbacks[AuxLossFreeBalancing]"


class AuxLossFreeBalancing(L.Callback):
    """Moves each MoE layer's selection bias by ``update_rate · sign(mean load − load)`` every optimizer step.

    Args:
        update_rate: The bias step u (γ in the paper); 0.001 in DeepSeek-V3.
        freeze_at_step: From this optimizer step on, the rate is 0 (V3: the last 500B tokens).
        freeze_at_fraction: The same as a fraction of the run's total optimizer steps.
    """

    def __init__(
        self, update_rate: float = 1e-3, *, freeze_at_step: int | None = None, freeze_at_fraction: float | None = None
    ) -> None:
        if not update_rate >= 0:
            raise ValueError(f"{_KEY}.update_rate ({update_rate}) must be >= 0; DeepSeek-V3 uses 0.001")
        if freeze_at_step is not None and freeze_at_step < 0:
            raise ValueError(f"{_KEY}.freeze_at_step ({freeze_at_step}) must be >= 0")
        if freeze_at_fraction is not None and not 0 <= freeze_at_fraction <= 1:
            raise ValueError(f"{_KEY}.freeze_at_fraction ({freeze_at_fraction}) must be in [0, 1]")
        self.update_rate = update_rate
        self.freeze_at_step = freeze_at_step
        self.freeze_at_fraction = freeze_at_fraction

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.routers = moe_routers(pl_module, type(self).__name__)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for router in self.routers:  # counts left by anything before training (a sanity forward ...)
            router.pop_tokens_per_expert()

    def rate(self, trainer: L.Trainer) -> float:
        """The bias step u for the current optimizer step: ``update_rate``, or 0 once frozen."""
        step = trainer.global_step
        if self.freeze_at_step is not None and step >= self.freeze_at_step:
            return 0.0
        if self.freeze_at_fraction is not None and step >= self.freeze_at_fraction * trainer.estimated_stepping_batches:
            return 0.0
        return self.update_rate

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        counts_LE = global_sum(trainer, torch.stack([r.pop_tokens_per_expert() for r in self.routers]))
        rate = self.rate(trainer)
        if rate > 0:
            step_LE = self.bias_step(counts_LE, rate)
            for router, step_E in zip(self.routers, step_LE):
                router.e_score_correction_bias += step_E.to(router.e_score_correction_bias.device)
        biases = torch.stack([r.e_score_correction_bias for r in self.routers])
        pl_module.log_dict({"train/bias_update_rate": rate, "train/bias_abs_mean": biases.abs().mean()})

    def bias_step(self, counts_LE: torch.Tensor, rate: float) -> torch.Tensor:
        """The extension point for another update rule: the change of every layer's bias this step.

        ``counts_LE`` [len(self.routers), n_routed_experts] holds the tokens each expert received over the
        global batch of the step (already summed over micro-batches and ranks, identical on every rank);
        ``rate`` is ``self.rate(trainer)`` (> 0: not called once frozen). Return a float32 tensor of the
        same shape, added to ``e_score_correction_bias``. The default is DeepSeek-V3's rule,
        ``update_bias``: ``rate · sign(mean load − load)``.
        """
        return update_bias(counts_LE, rate)


def update_bias(counts_LE: torch.Tensor, rate: float) -> torch.Tensor:
    """The bias change per layer and expert: ``rate · sign(mean_i c − c_i)`` (0 for an exactly average expert)."""
    counts_LE = counts_LE.float()
    return rate * torch.sign(counts_LE.mean(-1, keepdim=True) - counts_LE)
