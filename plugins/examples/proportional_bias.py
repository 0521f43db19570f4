"""Example: a load-balancing callback with another bias-update rule, by subclassing the bias callback.

DeepSeek-V3 moves each expert's selection bias by a fixed step, ``u · sign(mean − c_i)``: an expert
10% over the mean and one 300% over move alike. This rule moves it in proportion to the relative
load error, a proportional controller:

    b_i <- b_i + u · (mean(c) − c_i) / mean(c)

so an idle expert (c_i = 0) gains u, an expert at twice the mean loses u, and one at four times the
mean loses 3u. Per layer the steps sum to zero (Σ_i (mean − c_i) = 0): the biases keep a zero mean,
which V3's rule does not guarantee. This is an illustration of the extension point, not a claim that
it balances better; ``configs/sweeps/load_balancing.yaml`` plus a variant with this file is how to find out.

Everything else (when the counts are taken, the all-reduce over ranks, the freeze schedule, logging)
is inherited: only ``bias_step``, the documented extension point of ``AuxLossFreeBalancing``, changes.

    dsv3 fit --config configs/tiny.yaml --config plugins/examples/proportional_bias.yaml
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing
from typing_extensions import override


class ProportionalBiasBalancing(AuxLossFreeBalancing):
    """``AuxLossFreeBalancing`` whose bias step is ``update_rate · (mean − load) / mean`` (see the module docstring)."""

    @override
    def bias_step(self, counts_LE: torch.Tensor, rate: float) -> torch.Tensor:
        counts_LE = counts_LE.float()
        mean_L1 = counts_LE.mean(-1, keepdim=True)
        # A layer that routed no token this step (empty batch) has no error to correct.
        return torch.where(mean_L1 > 0, rate * (mean_L1 - counts_LE) / mean_L1.clamp_min(1e-12), 0.0)
