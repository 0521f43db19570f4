"""Self-speculative greedy decoding: the MTP modules draft, the main model verifies.

Each round, for a sequence t_0..t_{T-1}:
1. the main model gives t_T = argmax (what plain greedy decoding would emit) and the hidden states;
2. MTP depth k drafts d_k = t_{T+k} from depth k-1's states and the embedding of t_{T+k-1} (t_T for
   k = 1, then the previous draft), reading the same positions as in training;
3. one main-model forward over t_0..t_T, d_1..d_D checks the drafts left to right: d_k is accepted
   while it equals the main model's own greedy choice at its position; the first disagreement is
   replaced by the main model's choice. Every emitted token is the main model's greedy token, so the
   output equals plain greedy decoding (tested), and each round emits 1 + (accepted drafts) tokens.

This implementation recomputes full forwards (no KV cache), so it measures acceptance, not speed; a
cached generation path turns acceptance into tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv3_lightning.model.transformer import DeepSeekV3
from dsv3_lightning.plugins.mtp.head import MultiTokenPrediction


@dataclass
class SpeculativeStats:
    proposed: list[int] = field(default_factory=list)
    """Drafts proposed at each depth."""
    accepted: list[int] = field(default_factory=list)
    """Drafts accepted at each depth."""

    def acceptance(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]


@torch.no_grad()
def greedy_generate(model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Plain greedy decoding (the reference), one full forward per token."""
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.no_grad()
def speculative_generate(
    model: DeepSeekV3, mtp: MultiTokenPrediction, input_ids: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of ``input_ids`` [1, T] by ``max_new_tokens`` tokens, drafting with ``mtp``."""
    if input_ids.shape[0] != 1:
        raise ValueError("speculative_generate decodes one sequence at a time (batch size 1)")
    depth = mtp.depth
    stats = SpeculativeStats([0] * depth, [0] * depth)
    ids = input_ids
    target = input_ids.shape[1] + max_new_tokens
    while ids.shape[1] < target:
        T = ids.shape[1]
        out = model(ids)
        seq = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)  # t_T: the main model's token
        h = out.hidden_states
        cos, sin = model.rotary(T, ids.device)
        for k, layer in enumerate(mtp.layers, start=1):
            h = layer(h, model.embed(seq[:, k : k + T]), cos, sin)
            draft = model.lm_head(layer.shared_head.norm(h[:, -1:])).argmax(-1)
            seq = torch.cat([seq, draft], dim=1)
        verify = model(seq).logits[:, T:].argmax(-1)  # main model's choice after t_T, d_1, ..., d_D
        emitted = seq[:, : T + 1]
        for k in range(1, depth + 1):
            stats.proposed[k - 1] += 1
            if seq[0, T + k] != verify[0, k - 1]:
                emitted = torch.cat([emitted, verify[:, k - 1 : k]], dim=1)
                break
            stats.accepted[k - 1] += 1
            emitted = torch.cat([emitted, seq[:, T + k : T + k + 1]], dim=1)
        else:
            emitted = torch.cat([emitted, verify[:, depth : depth + 1]], dim=1)
        ids = emitted[:, :target]
    return ids, stats
