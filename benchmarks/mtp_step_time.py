"""Training-step time of the tiny model with multi-token prediction off, D=1 and D=2.

    python benchmarks/mtp_step_time.py [--repeats 15]

One process builds one module per variant (the same trunk weights), then times forward + backward +
AdamW step on the same batch (8 x 256 positions, with the D extra tokens MTP needs), interleaving the
variants round-robin so that machine noise hits all of them alike; prints the median seconds per
step and the ratio to MTP off. The losses are the module's own: main cross-entropy plus the head's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from dsv3_lightning.plugins.mtp import MultiTokenPrediction
from interleave import interleaved_medians

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    variants = {}
    for depth in (0, 1, 2):
        torch.manual_seed(0)
        variants[depth] = DSV3LightningModule(preset("tiny"), [MultiTokenPrediction(depth)] if depth else None)
    optimizers = {d: torch.optim.AdamW(m.parameters(), lr=1e-4) for d, m in variants.items()}
    tokens = torch.randint(0, 4096, (8, 259), generator=torch.Generator().manual_seed(0))

    def step(depth: int) -> None:
        module = variants[depth]
        window = tokens[:, : 257 + depth]
        out = module.model(window[:, :256])
        loss = F.cross_entropy(out.logits.flatten(0, 1), window[:, 1:257].flatten())
        for head in module.heads:
            loss = loss + head(out.hidden_states, module.read_batch(window), module.model, stage="train", step=0).loss
        loss.backward()
        optimizers[depth].step()
        optimizers[depth].zero_grad()

    medians = interleaved_medians({d: lambda d=d: step(d) for d in variants}, args.repeats)
    ref = medians[0]
    print(f"\ntiny model, batch 8 x 256, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads\n")
    print("| MTP | s/step (median) | vs off |")
    print("|---|---|---|")
    for depth, median in medians.items():
        print(f"| {'off' if depth == 0 else f'D={depth}'} | {median:.3f} | {median / ref:.2f}x |")


if __name__ == "__main__":
    main()
