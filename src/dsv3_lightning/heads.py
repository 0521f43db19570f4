"""The heads seam: extra prediction losses computed from the trunk's final hidden states.

A head (multi-token prediction is the one DeepSeek-V3 has) is an ``nn.Module`` attached to the
LightningModule from YAML (``model.heads``). It owns its parameters, so they are trained and
checkpointed with the model; it borrows the model's shared pieces (embedding, output head, layer
construction) through ``attach``. The module adds each head's ``loss`` to the next-token loss.

    class MyHead(PredictionHead):
        extra_tokens = 2                            # the data windows must carry 2 more tokens
        def attach(self, model): self.proj = nn.Linear(model.config.hidden_size, ...)
        def forward(self, hidden_states, batch, model, *, stage, step):
            logits = ...                            # [B, S, V] predicting batch.targets(offset=3)
            return HeadOutput(batch.cross_entropy(logits, offset=3), {"acc": ...})

``batch`` (dsv3_lightning.batch) holds the windows' tokens and, when fine-tuning on conversations, the
loss mask and the packed documents: ``batch.cross_entropy`` and ``batch.mean`` take the loss on the
targets alone, ``model.attention_inputs(S, device, batch.input_documents)`` keeps attention inside
each document.

Checkpoints rebuild heads from ``init_args()`` (their constructor arguments, stored in the
LightningModule's hyperparameters), so ``load_from_checkpoint`` and ``dsv3 generate`` need no YAML.
Two optional abilities are documented methods: ``hf_state_dict`` (export in the Hugging Face layout)
and ``speculative_generate`` (decoding with the head's drafts, when ``can_draft``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from dsv3_lightning.batch import Batch
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
        self, hidden_states: torch.Tensor, batch: Batch, model: DeepSeekV3, *, stage: str, step: int
    ) -> HeadOutput:
        """``hidden_states`` [B, S, D] (before the final norm), ``batch`` the windows [B, S + 1 + extra]
        (``batch.tokens``) with their loss mask and packed documents when fine-tuning.

        ``stage`` is "train", "val" or "test"; ``step`` the optimizer step, for loss-weight schedules.
        """
        raise NotImplementedError

    def log_names(self, stage: str) -> list[str] | None:
        """The keys of ``HeadOutput.logs`` at ``stage``, fixed for the run, or None when they are only known
        by running the head. A pipeline, whose other ranks never run the head, reduces the logs in one
        tensor by these names; with None it learns them from the last stage at the first step (one object
        collective per run). Override to return them."""
        return None

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this head, stored in checkpoints.

        By default each ``__init__`` parameter is read from the attribute of the same name; override
        when a head stores its arguments under other names.
        """
        args = {}
        for name in list(inspect.signature(type(self).__init__).parameters)[1:]:
            if not hasattr(self, name):
                raise TypeError(
                    f"{type(self).__name__} keeps no attribute {name!r} for its __init__ argument; store it "
                    "under that name or override init_args() so that checkpoints can rebuild the head"
                )
            args[name] = getattr(self, name)
        return args

    def hf_state_dict(self, model: DeepSeekV3) -> dict[str, torch.Tensor]:
        """The head's tensors under Hugging Face checkpoint keys (none by default: not exported)."""
        return {}

    @property
    def can_draft(self) -> bool:
        """Whether ``speculative_generate`` is available (multi-token prediction heads draft tokens)."""
        return False

    def speculative_generate(self, model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int, *,
                             on_token=None) -> tuple[torch.Tensor, Any]:
        """Greedy decoding with this head's drafts verified by ``model``: (ids, statistics)."""
        raise NotImplementedError(f"{type(self).__name__} cannot draft tokens")


def head_spec(head: PredictionHead) -> dict[str, Any]:
    """``{"class_path", "init_args"}``: a head as YAML names it, for the checkpoint's hyperparameters."""
    return {"class_path": f"{type(head).__module__}.{type(head).__qualname__}", "init_args": head.init_args()}


def build_head(spec: PredictionHead | dict[str, Any]) -> PredictionHead:
    """A head from its ``head_spec`` (heads given as objects are returned as they are)."""
    if isinstance(spec, PredictionHead):
        return spec
    import importlib

    module_name, _, class_name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))


__all__ = ["HeadOutput", "PredictionHead", "build_head", "head_spec"]
