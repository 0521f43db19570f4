"""Step time as routed experts grow at a fixed number of activated experts (8, 64, 256; top-4).

    python benchmarks/moe_scaling.py [--repeats 10] [--experts 8 64 256]

One model per expert count (tiny.yaml's shape otherwise: hidden 256, 3 MoE layers, 4 experts per
token, 1 shared), trained on the same batch of 8 x 256 tokens in float32: forward + backward, then a
fused AdamW step, timed separately, the variants interleaved round-robin, median of ``--repeats``.
DeepSeekMoE's promise is that the cost follows the activated parameters, not the total: forward +
backward should stay flat while the optimizer, which touches every parameter, grows with the total.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dsv3_lightning import DeepSeekV3, preset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    args = parser.parse_args()
    models, optimizers = {}, {}
    for n in args.experts:
        torch.manual_seed(0)
        models[n] = DeepSeekV3(preset("tiny", n_routed_experts=n, num_experts_per_tok=4, n_group=4, topk_group=2))
        optimizers[n] = torch.optim.AdamW(models[n].parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 4096, (8, 257), generator=torch.Generator().manual_seed(0))
    times = {n: {"fwd+bwd": [], "optimizer": []} for n in models}

    def step(n: int, record: bool) -> None:
        start = time.perf_counter()
        logits = models[n](tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        middle = time.perf_counter()
        optimizers[n].step()
        optimizers[n].zero_grad()
        if record:
            times[n]["fwd+bwd"].append(middle - start)
            times[n]["optimizer"].append(time.perf_counter() - middle)

    for n in models:
        step(n, record=False)
    for _ in range(args.repeats):
        for n in models:
            step(n, record=True)
    base = args.experts[0]
    ref = {k: statistics.median(v) for k, v in times[base].items()}
    print(f"\ntiny shape, top-4 of N routed experts + 1 shared, batch 8 x 256, float32, {torch.get_num_threads()} "
          f"threads, median of {args.repeats} interleaved steps\n")
    print(f"| routed experts | total params | activated | fwd+bwd s | vs {base} | fused AdamW s | vs {base} |")
    print("|---|---|---|---|---|---|---|")
    for n, model in models.items():
        total, activated = model.num_parameters()
        fb, opt = (statistics.median(times[n][k]) for k in ("fwd+bwd", "optimizer"))
        print(f"| {n} | {total / 1e6:.1f}M | {activated / 1e6:.2f}M | {fb:.3f} | {fb / ref['fwd+bwd']:.2f}x | "
              f"{opt:.3f} | {opt / ref['optimizer']:.2f}x |")


if __name__ == "__main__":
    main()
