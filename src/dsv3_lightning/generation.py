"""Autoregressive generation with MLA's latent cache: prefill, then one cached step per token.

    cache = ModelCache.for_layers(model.model.layers, batch_size=1, max_length=T + n)
    out = forward_cached(model, prompt_ids, cache)           # prefill: the whole prompt in one chunk
    out = forward_cached(model, next_ids, cache)             # decode: the new token attends to the cache

``forward_cached`` is the model's ``forward`` with each attention replaced by a cached one
(``dsv3_lightning.model.kv_cache``); everything else (norms, MoE routing, the head) is the same
module code, so the logits equal the uncached forward's (tested to 1e-5). ``generate`` adds the
sampling rule (greedy, temperature, top-k, top-p), stop tokens and a per-token callback for
streaming. Prediction heads that can draft tokens (multi-token prediction) decode faster through
``PredictionHead.speculative_generate``, which builds on the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from dsv3_lightning.model.kv_cache import cache_class
from dsv3_lightning.model.transformer import CausalLMOutput, DecoderLayer, DeepSeekV3


class ModelCache:
    """One cache per decoder layer of a stack (the model's layers, or a head's MTP modules)."""

    def __init__(self, caches: list) -> None:
        self.layers = caches

    @classmethod
    def for_layers(
        cls, layers: Iterable[DecoderLayer], *, batch_size: int, max_length: int, kind: str = "latent",
        dtype: torch.dtype | None = None, device: torch.device | None = None,
    ) -> ModelCache:
        layers = list(layers)
        param = layers[0].self_attn.kv_a_proj_with_mqa.weight
        make = cache_class(kind)
        return cls([
            make(layer.self_attn, batch_size, max_length, dtype=dtype or param.dtype, device=device or param.device)
            for layer in layers
        ])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        for cache in self.layers:
            cache.truncate(length)

    def numbers_per_token(self, layers: Iterable[DecoderLayer]) -> int:
        """Cached numbers per token over all layers (576 per layer for V3's latent cache)."""
        return sum(type(c).numbers_per_token(layer.self_attn) for c, layer in zip(self.layers, layers))


def decoder_layer_cached(layer: DecoderLayer, h_BSD: torch.Tensor, cos, sin, cache) -> torch.Tensor:
    """``DecoderLayer.forward`` with the attention reading and extending ``cache``."""
    h_BSD = h_BSD + cache.attend(layer.self_attn, layer.input_layernorm(h_BSD), cos, sin)
    return h_BSD + layer.mlp(layer.post_attention_layernorm(h_BSD))


@torch.no_grad()
def forward_cached(model: DeepSeekV3, input_ids: torch.Tensor, cache: ModelCache) -> CausalLMOutput:
    """Logits and hidden states of ``input_ids`` [B, S] continuing the ``cache.length`` cached positions."""
    past, new = cache.length, input_ids.shape[1]
    if past + new > model.config.max_position_embeddings:
        raise ValueError(
            f"{past + new} positions exceed model.config.max_position_embeddings "
            f"({model.config.max_position_embeddings}); shorten the prompt or generate fewer tokens"
        )
    cos, sin = model.rotary(new, input_ids.device, offset=past)
    h = model.embed(input_ids)
    for layer, layer_cache in zip(model.model.layers, cache.layers):
        h = decoder_layer_cached(layer, h, cos, sin, layer_cache)
    return CausalLMOutput(logits=model.head(h), hidden_states=h)


@dataclass
class Sampling:
    """How the next token is chosen from the last position's logits.

    ``temperature`` 0 is greedy (argmax); otherwise softmax(logits / temperature), restricted to the
    ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p``.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature ({self.temperature}) must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k ({self.top_k}) must be >= 1, or null for no limit")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1], or null for no limit")

    def choose(self, logits_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next token ids [B] from logits [B, V]."""
        if self.temperature == 0:
            return logits_BV.argmax(-1)
        logits = logits_BV.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, order = logits.sort(-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= self.top_p  # keep the token that crosses top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: Sampling | None = None,
    stop_token_ids: Sequence[int] = (),
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
    generator: torch.Generator | None = None,
    cache_kind: str = "latent",
) -> torch.Tensor:
    """Continues ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens; returns [B, T + generated].

    Stops early once every sequence has produced one of ``stop_token_ids`` (finished sequences repeat
    their stop token), or when ``on_token`` — called with each step's new ids [B] — returns True.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    sampling = sampling or Sampling()
    batch, prompt = input_ids.shape
    if prompt + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"a prompt of {prompt} tokens plus max_new_tokens={max_new_tokens} exceeds "
            f"model.config.max_position_embeddings ({model.config.max_position_embeddings}); shorten the "
            "prompt or lower max_new_tokens"
        )
    cache = ModelCache.for_layers(
        model.model.layers, batch_size=batch, max_length=prompt + max_new_tokens, kind=cache_kind
    )
    stops = torch.tensor(list(stop_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    ids, step_input = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = forward_cached(model, step_input, cache).logits[:, -1]
        token = sampling.choose(logits, generator)
        if len(stops):
            token = torch.where(finished, ids[:, -1], token)
            finished |= torch.isin(token, stops)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_input = token[:, None]
        if (on_token is not None and on_token(token)) or (len(stops) and bool(finished.all())):
            break
    return ids


__all__ = ["ModelCache", "Sampling", "decoder_layer_cached", "forward_cached", "generate"]
