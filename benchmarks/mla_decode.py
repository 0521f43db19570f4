"""MLA's inference cache: bytes per token, and decode speed with absorbed weights vs the naive cache.

    python benchmarks/mla_decode.py [--config tiny] [--context 512] [--new_tokens 64] [--repeats 5]

Part 1 (no compute): numbers cached per token per layer at DeepSeek-V3's shape and ours, for MLA's
latent cache (kv_lora_rank + qk_rope_head_dim), the naive cache of MLA's expanded per-head keys and
values, and multi-head attention with the same heads and head size (2 x heads x v_head_dim: 32,768 for V3).
Part 2: greedy decoding of ``--new_tokens`` after a ``--context``-token prompt with a random model of
``--config``, interleaving the latent cache (absorbed up-projections), the naive per-head cache and
no cache (a full forward per token), median over ``--repeats``; prints decode tokens/s (the prefill
of the prompt is not timed) and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3_lightning import DeepSeekV3, preset
from dsv3_lightning.generation import ModelCache, forward_cached
from dsv3_lightning.model.attention import MultiHeadLatentAttention
from dsv3_lightning.model.kv_cache import HeadCache, LatentCache


def cache_table(names: list[str]) -> None:
    print("| shape | latent cache (MLA) | naive MLA cache | MHA (2 x heads x v_head_dim) | latent vs MHA |")
    print("|---|---|---|---|---|")
    for name in names:
        with torch.device("meta"):
            attn = MultiHeadLatentAttention(preset(name))
        latent, naive = LatentCache.numbers_per_token(attn), HeadCache.numbers_per_token(attn)
        mha = 2 * attn.num_heads * attn.v_head_dim
        print(f"| {name} | {latent} | {naive} | {mha} | {mha / latent:.1f}x smaller |")


def cached_greedy(model: DeepSeekV3, ids: torch.Tensor, new_tokens: int, kind: str) -> tuple[torch.Tensor, float]:
    """Greedy continuation and the seconds its decode steps took (after an untimed prefill)."""
    cache = ModelCache.for_layers(model.model.layers, batch_size=1, max_length=ids.shape[1] + new_tokens, kind=kind)
    token = forward_cached(model, ids, cache).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids = torch.cat([ids, token], dim=1)
        token = forward_cached(model, token, cache).logits[:, -1:].argmax(-1)
    return torch.cat([ids, token], dim=1), time.perf_counter() - start


def uncached_greedy(model: DeepSeekV3, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    token = model(ids).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids = torch.cat([ids, token], dim=1)
        token = model(ids).logits[:, -1:].argmax(-1)
    return torch.cat([ids, token], dim=1), time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("\nNumbers cached per token per layer (multiply by bytes per number and layers)\n")
    cache_table(["671B", "16B", "small", "tiny"])

    torch.manual_seed(0)
    model = DeepSeekV3(preset(args.config)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    runs = {
        "latent cache, absorbed": lambda: cached_greedy(model, prompt, args.new_tokens, "latent"),
        "naive per-head cache": lambda: cached_greedy(model, prompt, args.new_tokens, "heads"),
        "no cache": lambda: uncached_greedy(model, prompt, args.new_tokens),
    }
    outputs, times = {}, {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            outputs[name], seconds = fn()
            times[name].append(seconds)
    same = all(torch.equal(o, outputs["no cache"]) for o in outputs.values())
    print(f"\nGreedy decoding, {args.config} config (random weights), prompt {args.context} tokens, "
          f"{args.new_tokens} new, median of {args.repeats} interleaved repeats, {torch.get_num_threads()} threads; "
          f"same tokens: {same}\n")
    print("| decoding | decode tokens/s | vs naive cache |")
    print("|---|---|---|")
    ref = statistics.median(times["naive per-head cache"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {(args.new_tokens - 1) / median:.1f} | {ref / median:.2f}x |")


if __name__ == "__main__":
    main()
