"""Self-speculative greedy decoding: the MTP modules draft, the main model verifies, all cached.

Notation: t_0..t_m are the tokens known to be the greedy continuation (t_m chosen by the main model
at position m - 1); h^0_i is the main model's last hidden state at position i, h^k_i depth k's.
Depth k at position i reads h^{k-1}_i and the embedding of t_{i+k}, as in training. Each round:

1. draft: for k = 1..D, depth k runs over the positions it has not cached yet up to m - 1, and its
   logits at m - 1 give the draft d_k of t_{m+k} (inputs beyond t_m are the earlier drafts);
2. verify: one cached main-model forward over [t_m, d_1, ..., d_D] (positions m..m+D) gives the main
   model's own greedy choice v_j after each of them; d_k is accepted while it equals v_{k-1}, and the
   first disagreement is replaced by v: the round emits 1 + accepted tokens, each the main model's
   greedy token, so the output equals plain greedy decoding (tested);
3. roll back: the main cache keeps positions up to the last accepted token. Depth k's position i
   read t_{i+k}; it stays cached only if that token was confirmed when it was read (i + k <= m' - 1,
   with m' the new m), and the rest is recomputed next round.

Every cache is MLA's latent cache (``dsv3_lightning.model.kv_cache``). A round costs one main forward
over D + 1 tokens plus D one-block MTP steps and emits on average 1 + Σ accepted tokens, which is
where the speed-up over one main forward per token comes from (``benchmarks/mtp_acceptance.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv3_lightning.generation import ModelCache, decoder_layer_cached, forward_cached
from dsv3_lightning.model.transformer import DeepSeekV3


@dataclass
class SpeculativeStats:
    proposed: list[int] = field(default_factory=list)
    """Drafts proposed at each depth."""
    accepted: list[int] = field(default_factory=list)
    """Drafts accepted at each depth."""
    rounds: int = 0
    """Main-model forwards after the prefill (plain greedy decoding needs one per token)."""

    def acceptance(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]


class _DepthState:
    """One MTP depth's cache and the output states h^k of the positions it holds."""

    def __init__(self, layer, k: int, max_length: int) -> None:
        self.layer, self.k = layer, k
        self.cache = ModelCache.for_layers([layer], batch_size=1, max_length=max_length)
        self.states: torch.Tensor | None = None

    def truncate(self, length: int) -> None:
        length = min(length, self.cache.length)
        self.cache.truncate(length)
        self.states = self.states[:, :length] if self.states is not None else None

    def extend(self, model: DeepSeekV3, h_prev: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Runs the uncached positions ``cache.length`` .. up to ``h_prev``'s; returns the new states."""
        start, end, k = self.cache.length, h_prev.shape[1], self.k
        cos, sin = model.rotary(end - start, h_prev.device, offset=start)
        x = self.layer.fuse(h_prev[:, start:end], model.embed(tokens[:, start + k : end + k]))
        h = decoder_layer_cached(self.layer, x, cos, sin, self.cache.layers[0])
        self.states = h if self.states is None else torch.cat([self.states, h], dim=1)
        return h


@torch.no_grad()
def speculative_generate(
    model: DeepSeekV3,
    mtp,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of ``input_ids`` [1, T] by ``max_new_tokens`` tokens, drafting with ``mtp``.

    ``on_token`` is called with each emitted token id ([1]) in order; returning True stops decoding.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("speculative_generate decodes one sequence at a time (batch size 1)")
    depth, T = mtp.depth, input_ids.shape[1]
    limit = model.config.max_position_embeddings
    if T + max_new_tokens + depth > limit:
        raise ValueError(
            f"a prompt of {T} tokens plus max_new_tokens={max_new_tokens} and {depth} draft position(s) exceeds "
            f"model.config.max_position_embeddings ({limit}); shorten the prompt or lower max_new_tokens"
        )
    stats = SpeculativeStats([0] * depth, [0] * depth)
    if max_new_tokens == 0:
        return input_ids, stats
    length = T + max_new_tokens + depth + 1
    main = ModelCache.for_layers(model.model.layers, batch_size=1, max_length=length)
    depths = [_DepthState(layer, k, length) for k, layer in enumerate(mtp.layers, start=1)]
    out = forward_cached(model, input_ids, main)
    h0 = out.hidden_states
    ids = torch.cat([input_ids, out.logits[:, -1:].argmax(-1)], dim=1)  # t_0..t_m, m = T
    target = T + max_new_tokens
    stop = on_token is not None and on_token(ids[0, -1:])
    while ids.shape[1] < target and not stop:
        m = ids.shape[1] - 1
        seq, h_prev = ids, h0
        for state in depths:
            state.truncate(m - state.k)  # the positions that read only confirmed tokens
            h = state.extend(model, h_prev, seq)
            draft = model.lm_head(state.layer.shared_head.norm(h[:, -1:])).argmax(-1)
            seq, h_prev = torch.cat([seq, draft], dim=1), state.states
        verify = forward_cached(model, seq[:, m:], main)
        stats.rounds += 1
        choice = verify.logits.argmax(-1)  # v_0..v_D
        accepted = 0
        for k in range(1, depth + 1):
            stats.proposed[k - 1] += 1
            if seq[0, m + k] != choice[0, k - 1]:
                break
            stats.accepted[k - 1] += 1
            accepted += 1
        emitted = torch.cat([seq[:, m + 1 : m + 1 + accepted], choice[:, accepted : accepted + 1]], dim=1)
        main.truncate(m + accepted + 1)
        h0 = torch.cat([h0, verify.hidden_states[:, : accepted + 1]], dim=1)
        for j in range(emitted.shape[1]):
            if ids.shape[1] == target:
                break
            ids = torch.cat([ids, emitted[:, j : j + 1]], dim=1)
            if on_token is not None and on_token(emitted[0, j : j + 1]):
                stop = True
                break
    return ids[:, :target], stats


__all__ = ["SpeculativeStats", "speculative_generate"]
