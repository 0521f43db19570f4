"""Packed documents: attention kept inside each one, positions restarting at each one.

Fine-tuning packs several conversations into one window (``data.conversations.packing``). ``documents``
[B, S] names the document of every position (any integers; a document is a run of equal values, and
padding is a run of its own), and the model then computes every packed document exactly as if it
were alone in the window: a position attends only to earlier positions of its own run (a boolean
``scaled_dot_product_attention`` mask, causal inside each run), and its RoPE position counts from the
start of its run. Without ``documents`` (pre-training, which packs without a mask as DeepSeek-V3
does) the model runs the plain causal path, unchanged.
"""

from __future__ import annotations

import torch


def document_starts(documents_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: where a new run of equal values begins (always at position 0)."""
    starts = torch.ones_like(documents_BS, dtype=torch.bool)
    starts[:, 1:] = documents_BS[:, 1:] != documents_BS[:, :-1]
    return starts


def document_positions(documents_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] int64: each position's offset from the start of its run."""
    index = torch.arange(documents_BS.shape[1], device=documents_BS.device).expand_as(documents_BS)
    start_index = torch.where(document_starts(documents_BS), index, torch.zeros_like(index))
    return index - start_index.cummax(dim=1).values


def document_mask(documents_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool for ``scaled_dot_product_attention``: True where query i may attend to key j,
    i.e. j <= i and j in i's run. Runs are told apart by their start count, so two runs holding the
    same value (a document id reused later in the window) stay apart too."""
    run = document_starts(documents_BS).cumsum(dim=1)
    S = documents_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=documents_BS.device).tril()
    return ((run[:, :, None] == run[:, None, :]) & causal)[:, None]


__all__ = ["document_mask", "document_positions", "document_starts"]
