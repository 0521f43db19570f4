"""NonFiniteGuard: a NaN or infinite loss or gradient stops the run (or skips the step) before the
optimizer applies it, so no checkpoint ever holds what it would have done.

    after each backward:  bad = not finite(loss) or not finite(Σ_p ‖grad_p‖²)     this rank
                          bad = Σ_ranks bad > 0                                  one scalar all-reduce
    action "raise":       NonFiniteError naming the step, the loss and the first non-finite gradient
    action "skip":        the optimizer step is dropped (every .grad set to None: AdamW, fused or
                          not, and AdamWBF16 leave such parameters and their moments untouched),
                          the step's router counts are dropped (a bias update sees no load and moves
                          nothing), ``train/skipped_steps`` counts it; after ``max_consecutive_skips``
                          skipped steps in a row the run stops as with "raise" (a diverged run is not
                          a spike)

Where: the module's ``on_before_backward`` keeps the loss, ``on_after_backward`` checks, and
``on_before_optimizer_step`` drops a skipped step's gradients. Lightning calls those three hooks under
every strategy (the pipeline strategy's backward included), and ``on_after_backward`` runs before any
callback's ``on_before_optimizer_step``, which is where the bias update consumes the counts.

The decision is global: every rank all-reduces its flag, so all raise (or skip) at the same step and
none waits in a collective the others left. The cost is that reduction and one host sync per
micro-batch, plus one fused norm over the local gradients. Each rank names its own first non-finite
gradient. With a gradient scaler (``16-mixed``), gradients are scaled and infinite ones are the
scaler's business (it skips those steps itself): only the loss is checked.

``check_state`` is the last line of defence at checkpoint time: a state dict holding a non-finite
floating-point tensor is refused before anything is written, so the previous checkpoint stays the
last good one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch

from dsv3_lightning.collectives import sum_over_processes

from dsv3_lightning.model.router import Router

Action = Literal["raise", "skip"]


class NonFiniteError(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient (or the model holds one)."""


@dataclass(kw_only=True)
class NonFiniteGuard:
    """What a NaN or infinite loss or gradient does to the run.

    Attributes are the YAML keys under ``model.nonfinite``.
    """

    action: Action = "raise"
    """"raise": stop with an error naming the step, before the optimizer applies it. "skip": drop the
    step (no weight, moment or bias change), count it in ``train/skipped_steps`` and go on."""

    max_consecutive_skips: int = 10
    """With "skip": this many skipped steps in a row stop the run as "raise" would."""

    skipped_steps: int = field(default=0, init=False)
    consecutive_skips: int = field(default=0, init=False)
    _loss: torch.Tensor | None = field(default=None, init=False, repr=False)
    _bad: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ("raise", "skip"):
            raise ValueError(f"model.nonfinite.action ({self.action!r}) must be 'raise' or 'skip'")
        if self.max_consecutive_skips < 1:
            raise ValueError(
                f"model.nonfinite.max_consecutive_skips ({self.max_consecutive_skips}) must be >= 1"
            )

    def options(self) -> dict[str, object]:
        """The YAML options (what ``model.nonfinite`` holds in a checkpoint's hyperparameters)."""
        return {"action": self.action, "max_consecutive_skips": self.max_consecutive_skips}

    # ------------------------------------------------------------------ the hooks' halves
    def keep_loss(self, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    @torch.no_grad()
    def check(self, module: L.LightningModule) -> None:
        """After a backward: decide, with every rank, whether this step is finite."""
        trainer = module.trainer
        grads = _grads(module)
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        local_bad = torch.zeros((), device=module.device)
        if self._loss is not None:
            local_bad = local_bad + (~torch.isfinite(self._loss.float())).to(local_bad)
        if check_grads and grads:
            norms_sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
            local_bad = local_bad + (~torch.isfinite(norms_sq)).to(local_bad)
        bad = sum_over_processes(trainer, local_bad)
        if bad.item() == 0:  # the one host sync
            return
        self._bad = True
        loss = float(self._loss) if self._loss is not None else math.nan
        if self.action == "raise" or self.consecutive_skips + 1 >= self.max_consecutive_skips:
            raise NonFiniteError(self._message(module, loss, check_grads))
        for router in (m for m in module.modules() if isinstance(m, Router)):  # the model's and the heads'
            router.pop_tokens_per_expert()  # the step's load must not move the selection bias

    def drop_if_skipped(self, module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Before the optimizer step: a skipped step's gradients are removed, so nothing is updated."""
        if self._bad:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            module.print(
                f"step {module.trainer.global_step}: non-finite loss or gradient, optimizer step skipped "
                f"({self.skipped_steps} skipped so far; model.nonfinite.action is 'skip')"
            )
        else:
            self.consecutive_skips = 0
        self._bad = False
        self._loss = None
        if self.action == "skip":
            module.log("train/skipped_steps", float(self.skipped_steps))

    def _message(self, module: L.LightningModule, loss: float, checked_grads: bool) -> str:
        step = module.trainer.global_step
        first = first_nonfinite({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
        where = f"; first non-finite gradient on rank {module.global_rank}: {first}" if first else ""
        if not checked_grads:
            where += " (gradients not checked: the gradient scaler handles them)"
        if self.action == "skip":
            why = (
                f"{self.consecutive_skips + 1} steps in a row were non-finite "
                "(model.nonfinite.max_consecutive_skips)"
            )
        else:
            why = "model.nonfinite.action is 'raise'"
        return (
            f"step {step}: the training loss is {loss:.6g}{where}. Stopped before the optimizer step "
            f"({why}); no checkpoint of this state was written (any earlier one is the last good state). "
            "Lower model.learning_rate or trainer.gradient_clip_val, check the data, or set "
            "model.nonfinite.action: skip to drop such steps"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def first_nonfinite(state: Mapping[str, object]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or an infinity."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta:
            if not torch.isfinite(value).all():
                return name
    return None


def check_state(trainer: L.Trainer, state: Mapping[str, object], device: torch.device) -> None:
    """Refuses (on every rank together) to checkpoint a state dict with a non-finite tensor."""
    name = first_nonfinite(state)
    bad = torch.tensor(float(name is not None), device=device)
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    if bad.item():
        here = f" ({name} on rank {trainer.global_rank})" if name else ""
        raise NonFiniteError(
            f"step {trainer.global_step}: refusing to write a checkpoint of a model with non-finite "
            f"weights{here}; the previous checkpoint is kept as the last good state"
        )


__all__ = ["NonFiniteError", "NonFiniteGuard", "check_state", "first_nonfinite"]
