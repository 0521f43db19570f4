"""Loss terms computed by each router in its forward and attached to its output, as DeepSeek's MoE code does.

A balance loss needs every MoE layer's routing statistics. Added to the final loss, it would need all
layers on the process that computes the loss, which a pipeline does not have. So each router computes
its own term right after routing and hands it to autograd on its output:

    weights = AttachLoss(weights, term(stats, router), scale)   # forward: weights unchanged
    backward: d weights as received, d term = scale              # the term's gradient starts here

which gives the layer the gradient ``scale · d term`` that adding the term to the loss would give,
wherever the layer runs (a pipeline stage, an expert-parallel rank). ``scale`` is the weight the main
loss's gradient has in one backward: 1 / ``accumulate_grad_batches`` in a plain step (Lightning
divides the loss by it), 1 / ``num_microbatches`` in a pipeline schedule; who runs the step sets it.

``RouterLosses`` is the registry one LightningModule shares with all its routers (``Router.losses``):
the terms by name, the scale, and the terms' detached values summed since the last ``pop`` (over
routers and forwards), for the logs. Terms run in training forwards with autograd on, not in
evaluation and not in activation recomputation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsv3_lightning.model.router import Router, RouterStats

RouterLoss = Callable[["RouterStats", "Router"], torch.Tensor]
"""One router's term from its forward's statistics: a scalar with autograd (through ``stats.scores_TE``)."""


class AttachLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also starts ``loss``'s backward with gradient ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


class RouterLosses:
    """The loss terms of a module's routers, their gradient scale and their logged sums."""

    def __init__(self) -> None:
        self.terms: dict[str, RouterLoss] = {}
        self.scale = 1.0
        self._sums: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.terms)

    def attach(self, router: Router, stats: RouterStats, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` carrying every term of this forward (the router calls it)."""
        for name, term in self.terms.items():
            value = term(stats, router)
            weights = AttachLoss.apply(weights, value, self.scale)
            detached = value.detach().float()
            self._sums[name] = self._sums[name] + detached if name in self._sums else detached
        return weights

    def pop(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Each term's value summed over routers and forwards since the last call (0 where none ran here),
        every registered name present, so that all processes log the same keys."""
        sums = {name: self._sums.get(name, torch.zeros((), device=device)).to(device) for name in self.terms}
        self._sums = {}
        return sums
