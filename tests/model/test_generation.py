"""Cached generation: the latent (absorbed) and per-head caches against the uncached forward."""

from __future__ import annotations

import pytest
import torch

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.config import YarnRopeScaling
from dsv3_lightning.generation import ModelCache, Sampling, forward_cached, generate
from dsv3_lightning.model.attention import MultiHeadLatentAttention
from dsv3_lightning.model.kv_cache import HeadCache, LatentCache

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=64)


def make_model(**overrides) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny", **{**SMALL, **overrides})).eval()


@pytest.mark.parametrize("kind", ["latent", "heads"])
@pytest.mark.parametrize("yarn", [False, True])
def test_cached_chunks_equal_the_full_forward(kind, yarn):
    model = make_model(rope_scaling=YarnRopeScaling(factor=4, original_max_position_embeddings=16) if yarn else None)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    cache = ModelCache.for_layers(model.model.layers, batch_size=2, max_length=20, kind=kind)
    chunks = [(0, 9), *((i, i + 1) for i in range(9, 15)), (15, 20)]  # prefill, 6 decode steps, a chunk
    cached = torch.cat([forward_cached(model, ids[:, a:b], cache).logits for a, b in chunks], dim=1)
    assert cache.length == 20
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_truncate_rolls_back_to_an_earlier_prefix():
    model = make_model()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = ModelCache.for_layers(model.model.layers, batch_size=1, max_length=12)
    forward_cached(model, ids[:, :8], cache)
    forward_cached(model, torch.full((1, 3), 7), cache)  # a rejected continuation
    cache.truncate(8)
    logits = forward_cached(model, ids[:, 8:], cache).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits[:, 8:], rtol=1e-5, atol=1e-5)


def test_cache_numbers_per_token_at_deepseek_v3_shape():
    with torch.device("meta"):
        attn = MultiHeadLatentAttention(preset("671B"))
    assert LatentCache.numbers_per_token(attn) == 576  # kv_lora_rank 512 + rope key 64 (SPEC §3.2)
    assert HeadCache.numbers_per_token(attn) == 128 * (192 + 128)  # expanded keys and values


def test_greedy_generation_equals_argmax_of_full_forwards():
    model = make_model()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, 12)
    reference = prompt
    with torch.no_grad():
        for _ in range(12):
            reference = torch.cat([reference, model(reference).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, reference)
    assert torch.equal(generate(model, prompt, 12, cache_kind="heads"), reference)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    assert Sampling().choose(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {Sampling(temperature=1.0, top_k=2).choose(logits, g).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {Sampling(temperature=1.0, top_p=0.01).choose(logits, g).item() for _ in range(50)}
    assert picks == {1}  # the most likely token alone crosses top_p
    picks = {Sampling(temperature=5.0).choose(logits, g).item() for _ in range(400)}
    assert picks == {0, 1, 2, 3, 4}
    a = [Sampling(temperature=1.0).choose(logits.expand(8, -1), torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*a)  # reproducible with a seeded generator


def test_stop_tokens_and_callback_end_generation():
    model = make_model()
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, 10)
    stop = free[0, 7].item()  # the 4th generated token
    first = (free[0, 4:] == stop).nonzero()[0].item()
    stopped = generate(model, prompt, 10, stop_token_ids=[stop])
    assert torch.equal(stopped, free[:, : 4 + first + 1])
    seen = []
    generate(model, prompt, 10, on_token=lambda t: seen.append(t) or len(seen) == 3)
    assert len(seen) == 3


def test_bad_inputs_are_named():
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
    cache = ModelCache.for_layers(model.model.layers, batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        forward_cached(model, torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="unknown KV cache kind"):
        ModelCache.for_layers(model.model.layers, batch_size=1, max_length=4, kind="paged")
