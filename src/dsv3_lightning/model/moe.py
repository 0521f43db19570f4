"""DeepSeekMoE (SPEC.md §4.1): routed experts stored stacked, a token dispatcher, a shared expert.

Legend: T tokens, D hidden, E routed experts, K experts per token, I expert hidden size,
N = T·K routed token copies.

    ids, w  = gate(x)                                  Router, [T, K] each
    x_ND, tokens_per_expert_E, plan = dispatcher.dispatch(x_TD, ids)   copies grouped by expert
    y_ND    = experts(x_ND, tokens_per_expert_E)       one grouped SwiGLU over all experts
    out_TD  = dispatcher.combine(y_ND, w, plan) + shared_experts(x)

Two seams, both documented methods that a plugin replaces without touching ``forward``:
- ``GroupedExperts.grouped_mm`` (the grouped matmul: FP8 swaps it for a block-scaled one);
- ``MoE.dispatcher`` (any object with ``dispatch``/``combine``: expert parallelism installs an
  all-to-all dispatcher; the default sorts the token copies by expert on this process).
Experts are stored stacked as in Hugging Face's in-memory layout: ``gate_up_proj`` [E, 2I, D] (gate
rows first) and ``down_proj`` [E, D, I]. The released checkpoint's per-expert keys are a converter
detail (``dsv3_lightning.hf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lightning.config import ModelConfig
from dsv3_lightning.model.router import Router


class MLP(nn.Module):
    """SwiGLU ``down_proj(silu(gate_proj(x)) * up_proj(x))``: the dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


class GroupedExperts(nn.Module):
    """All routed experts of one layer as stacked weights, applied to tokens already sorted by expert.

    ``expert_offset`` is the global id of row 0. It is 0 unless a strategy keeps only a shard (rows
    offset .. offset + num_experts of the layer's experts), and then it must set it, as initialisation
    seeds each row by its global id (init.py): a shard materialised from the meta device then holds
    exactly those rows of the full model.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset: int = 0
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def grouped_mm(self, x_NI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """The grouped-matmul seam: rows offsets[e-1]:offsets[e] of x times w[e]^T, for every expert e.

        Uses ``torch.nn.functional.grouped_mm`` where this torch has it (one kernel, CPU and GPU), else a
        loop over experts. Override to change the arithmetic (FP8) of every expert at once.
        """
        if hasattr(F, "grouped_mm") and x_NI.dtype in (torch.float32, torch.bfloat16):
            y = F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E)
            if y.requires_grad:  # grouped_mm's backward rejects broadcast (stride-0) gradients
                y.register_hook(_contiguous_grad)
            return y
        starts = [0, *offsets_E.tolist()]
        return torch.cat([x_NI[starts[e] : starts[e + 1]] @ w_EOI[e].T for e in range(len(w_EOI))])

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        offsets = tokens_per_expert_E.cumsum(0).to(torch.int32)
        gate, up = self.grouped_mm(x_ND, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return self.grouped_mm(F.silu(gate) * up, self.down_proj, offsets)


@dataclass
class DispatchPlan:
    """How the local dispatcher permuted the token copies, so that combine can undo it."""

    order_N: torch.Tensor
    num_tokens: int


class TokenDispatcher(Protocol):
    """Moves token copies to their experts and the results back (the token-dispatch seam)."""

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Returns the copies grouped by local expert, tokens per local expert, and a plan for combine."""
        ...

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, plan: object) -> torch.Tensor:
        """Weights each expert output by its gate value and sums the K copies of each token: [T, D]."""
        ...


def gather_copies(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """The N = T·K token copies in dispatch order: row n is token ``order_N[n] // top_k``.

    Written as K copies of each token, then a permutation, rather than as ``x_TD[order_N // top_k]``:
    the backward of an index with repeated rows is an accumulating scatter whose additions multithreaded
    CPU kernels run in no fixed order (gradients differed in the last bits from run to run, which the
    sign of the bias update then amplifies). Here the permutation writes each row once and the K copies
    are summed by a reduction in a fixed order, so two runs, and a run and its resume, agree bitwise.
    """
    copies_ND = x_TD.unsqueeze(1).expand(-1, top_k, -1).flatten(0, 1)
    return copies_ND[order_N]


class LocalTokenDispatcher:
    """All experts on this process: a stable sort of the T·K copies by expert id."""

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        flat_ids = topk_ids_TK.flatten()
        order = flat_ids.argsort(stable=True)
        tokens_per_expert = torch.bincount(flat_ids, minlength=num_experts)
        x_ND = gather_copies(x_TD, order, topk_ids_TK.shape[1])
        return x_ND, tokens_per_expert, DispatchPlan(order, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        y_unsorted = torch.empty_like(y_ND)
        y_unsorted[plan.order_N] = y_ND
        y_TKD = y_unsorted.view(plan.num_tokens, -1, y_ND.shape[-1])
        weights = topk_weights_TK.to(y_ND.dtype).unsqueeze(1)  # [T, 1, K]
        return torch.bmm(weights, y_TKD).squeeze(1)


class MoE(nn.Module):
    """Routed experts plus the shared expert; the residual is added by the decoder layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = GroupedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatcher: TokenDispatcher = LocalTokenDispatcher()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x_BSD)
        x_TD = x_BSD.flatten(0, -2)
        x_ND, tokens_per_expert, plan = self.dispatcher.dispatch(x_TD, topk_ids, self.experts.num_experts)
        y_ND = self.experts(x_ND, tokens_per_expert)
        out = self.dispatcher.combine(y_ND, topk_weights, plan).view_as(x_BSD)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BSD)
        return out
