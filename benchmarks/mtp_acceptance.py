"""Acceptance rate of self-speculative decoding with a trained MTP checkpoint.

    python benchmarks/mtp_acceptance.py CHECKPOINT --depth 2 [--prompts 20]

Loads a Lightning checkpoint trained with ``MultiTokenPrediction(depth)`` (e.g. the last.ckpt of
``benchmarks/mtp_ablation.py``'s d1 or d2 run), takes the first 64 tokens of validation windows as
prompts, decodes 32 more tokens greedily with the MTP drafts, checks the output against plain greedy
decoding, and prints the acceptance rate per depth (the paper: 85-90% for the second token).
"""

from __future__ import annotations

import argparse

import torch

from dsv3_lightning.data import DSV3DataModule
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.plugins.mtp import MultiTokenPrediction, greedy_generate, speculative_generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    module = DSV3LightningModule.load_from_checkpoint(
        args.checkpoint, heads=[MultiTokenPrediction(args.depth)], map_location="cpu"
    ).eval()
    data = DSV3DataModule(extra_tokens=args.depth)
    data.prepare_data()
    data.setup()
    proposed, accepted, identical = [0] * args.depth, [0] * args.depth, 0
    step = max(len(data.val_dataset) // args.prompts, 1)
    for i in range(args.prompts):
        prompt = data.val_dataset[i * step][:64][None]
        fast, stats = speculative_generate(module.model, module.heads[0], prompt, 32)
        identical += int(torch.equal(fast, greedy_generate(module.model, prompt, 32)))
        proposed = [a + b for a, b in zip(proposed, stats.proposed)]
        accepted = [a + b for a, b in zip(accepted, stats.accepted)]
    print(f"\n{args.prompts} validation prompts of 64 tokens, 32 new tokens each; identical to plain greedy: "
          f"{identical}/{args.prompts}\n")
    print("| depth | drafts proposed | accepted | acceptance |")
    print("|---|---|---|---|")
    for k in range(args.depth):
        print(f"| {k + 1} | {proposed[k]} | {accepted[k]} | {accepted[k] / max(proposed[k], 1):.1%} |")


if __name__ == "__main__":
    main()
