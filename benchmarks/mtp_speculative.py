"""Self-speculative decoding with a trained MTP checkpoint: acceptance per depth and speed-up.

    python benchmarks/mtp_speculative.py CHECKPOINT [--prompts 20] [--new_tokens 64]

Loads a Lightning checkpoint trained with ``MultiTokenPrediction`` (e.g. the last.ckpt of
``benchmarks/mtp_ablation.py``'s d1 or d2 run; the heads come back from its hyperparameters), takes
the first 64 tokens of evenly spaced validation windows as prompts, and decodes each greedily twice,
interleaved: plain cached decoding (one main-model forward per token) and self-speculative decoding
(the MTP modules draft, one main forward verifies). Checks that both give the same tokens, and prints
the acceptance rate per depth (the paper: 85-90% for the second token) and tokens/s of each (the
paper: 1.8x). Both use MLA's latent cache.
"""

from __future__ import annotations

import argparse
import time

import torch
from dsv3_lightning.plugins.mtp import MultiTokenPrediction

from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.generation import generate
from dsv3_lightning.loading import load_trained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, help="MTP depth, for checkpoints that do not record their heads")
    args = parser.parse_args()
    loaded = load_trained(args.checkpoint, heads=[MultiTokenPrediction(args.depth)] if args.depth else None)
    model, (head,) = loaded.model, loaded.heads
    data = DSV3DataModule(extra_tokens=head.depth)
    data.prepare_data()
    data.setup()
    proposed, accepted, identical = [0] * head.depth, [0] * head.depth, 0
    seconds = {"plain": 0.0, "speculative": 0.0}
    step = max(len(data.val_dataset) // args.prompts, 1)
    for i in range(args.prompts):
        prompt = data.val_dataset[i * step][:64][None]
        start = time.perf_counter()
        plain = generate(model, prompt, args.new_tokens)
        seconds["plain"] += time.perf_counter() - start
        start = time.perf_counter()
        fast, stats = head.speculative_generate(model, prompt, args.new_tokens)
        seconds["speculative"] += time.perf_counter() - start
        identical += int(torch.equal(fast, plain))
        proposed = [a + b for a, b in zip(proposed, stats.proposed)]
        accepted = [a + b for a, b in zip(accepted, stats.accepted)]
    tokens = args.prompts * args.new_tokens
    print(f"\n{args.checkpoint}: {args.prompts} validation prompts of 64 tokens, {args.new_tokens} new tokens each, "
          f"{torch.get_num_threads()} threads; identical to plain greedy: {identical}/{args.prompts}\n")
    print("| depth | drafts proposed | accepted | acceptance |")
    print("|---|---|---|---|")
    for k in range(head.depth):
        print(f"| {k + 1} | {proposed[k]} | {accepted[k]} | {accepted[k] / max(proposed[k], 1):.1%} |")
    print("\n| decoding | tokens/s | vs plain |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} (latent cache) | {tokens / s:.1f} | {seconds['plain'] / s:.2f}x |")


if __name__ == "__main__":
    main()
