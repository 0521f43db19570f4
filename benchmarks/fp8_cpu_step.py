"""Training-step time of the tiny model on CPU: float32 against the emulated FP8 recipes.

    python benchmarks/fp8_cpu_step.py [--repeats 15]

One process builds one model per variant (same weights), then times forward + backward + AdamW step
on the same batch (8 x 256 tokens), interleaving the variants round-robin so that machine noise hits
all of them alike; prints the median seconds per step and the ratio to float32. On CPU, FP8 is
emulated (quantize, dequantize, float32 matmul), so it is slower: this measures the emulation's
overhead, not FP8 hardware speed (benchmarks/fp8_gemm_gpu.py does that on a GPU).
"""

from __future__ import annotations

import argparse
import copy

import torch
from dsv3_lightning.plugins.fp8 import FP8Precision
from interleave import interleaved_medians

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = DSV3LightningModule(preset("tiny"))
    variants = {"float32": base}
    for recipe in ("blockwise", "rowwise", "tensorwise"):
        module = copy.deepcopy(base)
        FP8Precision(recipe).convert_module(module)
        variants[f"fp8 {recipe}"] = module
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    tokens = torch.randint(0, 4096, (8, 257), generator=torch.Generator().manual_seed(0))

    def step(name: str) -> None:
        module = variants[name]
        out = module.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()

    medians = interleaved_medians({name: lambda name=name: step(name) for name in variants}, args.repeats)
    ref = medians["float32"]
    print(f"\ntiny model, batch 8 x 256, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads\n")
    print("| variant | s/step (median) | vs float32 |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {median / ref:.2f}x |")


if __name__ == "__main__":
    main()
