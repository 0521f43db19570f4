"""The heads seam: extra prediction losses computed from the trunk's final hidden states.

A head (multi-token prediction is the one DeepSeek-V3 has) is an ``nn.Module`` attached to the
LightningModule from YAML (``model.heads``). It owns its parameters, so they are trained and
checkpointed with the model; it borrows the model's shared pieces (embedding, output head, layer
construction) through ``attach``. The module adds each head's ``loss`` to the next-token loss.

    class MyHead(PredictionHead):
        extra_tokens = 2                            # the data windows must carry 2 more tokens
        def attach(self, model): self.proj = nn.Linear(model.config.hidden_size, ...)
        def forward(self, hidden_states, tokens, model, *, stage, step):
            return HeadOutput(loss, {"acc": ...})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dsv3_lightning.model.transformer import DeepSeekV3


@dataclass
class HeadOutput:
    loss: torch.Tensor
    """Already weighted: the module adds it to the training loss as it is."""
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scalars logged as ``{stage}/{key}`` (e.g. ``train/mtp_loss``)."""


class PredictionHead(nn.Module):
    """Base class of the heads the LightningModule sums into its loss."""

    extra_tokens: int = 0
    """Tokens each data window needs beyond ``seq_len + 1`` (``data.extra_tokens`` must be at least this)."""

    def attach(self, model: DeepSeekV3) -> None:
        """Called once by the LightningModule with the model, before the optimizer is built."""

    def forward(
        self, hidden_states: torch.Tensor, tokens: torch.Tensor, model: DeepSeekV3, *, stage: str, step: int
    ) -> HeadOutput:
        """``hidden_states`` [B, S, D] (before the final norm), ``tokens`` the whole window [B, S + 1 + extra].

        ``stage`` is "train", "val" or "test"; ``step`` the optimizer step, for loss-weight schedules.
        """
        raise NotImplementedError


__all__ = ["HeadOutput", "PredictionHead"]
