"""Example: a multi-token-prediction head with another loss weighting, by subclassing the MTP head.

DeepSeek-V3 weights its D MTP depths equally, ``λ / D · Σ_k L_k``. With D > 1 the far depths are
harder (their targets lie further ahead) and their losses larger; this head lets nearer depths count
more, with a geometric decay γ:

    L_MTP = λ · Σ_k γ^(k−1) · L_k / Σ_k γ^(k−1)          k = 1..D

γ = 1 is V3's weighting; γ = 0 trains depth 1 only (the deeper modules then learn nothing). λ keeps
V3's schedule (``loss_weight``, then ``later_loss_weight`` from ``switch_at_step``): only
``weighted_loss``, the documented extension point of ``MultiTokenPrediction``, changes. The logged
``train/mtp_loss`` stays the plain mean over depths, so runs with different weightings compare.

    dsv3 fit --config configs/tiny.yaml --config plugins/examples/mtp_depth_decay.yaml
"""

from __future__ import annotations

import torch
from dsv3_lightning.plugins.mtp import MultiTokenPrediction
from typing_extensions import override

_KEY = "model.heads[DepthDecayMTP]"


class DepthDecayMTP(MultiTokenPrediction):
    """``MultiTokenPrediction`` whose depth k weighs γ^(k−1) (normalised), see the module docstring.

    Args:
        depth: D, the number of extra tokens predicted.
        loss_weight: λ, the weight of the whole MTP loss.
        decay: γ in [0, 1], the weight of each depth relative to the one before.
        later_loss_weight: λ after ``switch_at_step``, as ``MultiTokenPrediction``.
        switch_at_step: The optimizer step at which λ becomes ``later_loss_weight``.
    """

    def __init__(
        self,
        depth: int = 2,
        loss_weight: float = 0.3,
        *,
        decay: float = 0.5,
        later_loss_weight: float | None = None,
        switch_at_step: int | None = None,
    ) -> None:
        super().__init__(depth, loss_weight, later_loss_weight=later_loss_weight, switch_at_step=switch_at_step)
        if not 0 <= decay <= 1:
            raise ValueError(f"{_KEY}.decay ({decay}) must be in [0, 1]; 1 is DeepSeek-V3's equal weighting")
        self.decay = decay

    def depth_weights(self) -> torch.Tensor:
        """The normalised weight of each depth, [D], summing to 1."""
        weights_D = self.decay ** torch.arange(self.depth, dtype=torch.float32)
        return weights_D / weights_D.sum()

    @override
    def weighted_loss(self, losses_D: torch.Tensor, step: int) -> torch.Tensor:
        return self.current_weight(step) * (self.depth_weights().to(losses_D) * losses_D).sum()
