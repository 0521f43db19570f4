"""DeepSeek-V3's pipeline bubble table (SPEC.md §7.1), reproduced from the schedules we run.

    python benchmarks/pipeline_bubbles.py [--microbatches 20] [--F 1 --B 2 --W 1 --FB 2.5]
    python benchmarks/pipeline_bubbles.py --measure      # F, B, W timed on one layer of configs/tiny

For PP = 4 and 8 and each schedule, the strategy's own action lists (plans.build_plan) are replayed
by the simulator with per-chunk costs F, B (full backward), W (its weight part) and FB (a forward and
a backward overlapped, the paper's F&B). "PP" is the number of pipeline stages, as in the paper:
DualPipeV runs PP stages on PP/2 ranks. Bubble: the largest per-rank idle time in units of the
costs; activation: the most micro-batch activations of one stage a rank holds (a stage is 1/PP of
the layers); parameters: per device, relative to 1F1B. The paper's formulas assume the input part
of a backward costs a forward (B - W = F); the simulation is exact for any costs. ``--measure``
times F, B and W on one MoE layer of the tiny preset (costs.py; a micro-batch of 2 windows of 256
tokens, one thread) and uses F&B = F + B, since our pairs do not overlap yet.
"""

from __future__ import annotations

import argparse

from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, simulate

ROWS = (  # (label, schedule, ranks for PP stages, the paper's bubble formula)
    ("1F1B", "1f1b", lambda pp: pp, lambda pp, c: (pp - 1) * (c.F + c.B)),
    ("ZB1P", "zb", lambda pp: pp, lambda pp, c: (pp - 1) * (c.F + c.B - 2 * c.W)),
    ("DualPipe", "dualpipe", lambda pp: pp, lambda pp, c: (pp / 2 - 1) * (c.FB + c.B - 3 * c.W)),
    ("DualPipeV", "dualpipev", lambda pp: pp // 2, lambda pp, c: (pp / 2 - 1) * (c.FB + c.B - 3 * c.W)),
)


def table(costs: ChunkCosts, microbatches: int, sizes=(4, 8)) -> list[dict]:
    rows = []
    for pp in sizes:
        for label, schedule, ranks, formula in ROWS:
            plan = build_plan(schedule, ranks(pp), microbatches)
            sim = simulate(plan, costs)
            stages_per_rank = len(plan.layout.stages_of(0))
            rows.append(
                {
                    "PP": pp,
                    "method": label,
                    "devices": plan.layout.num_ranks,
                    "bubble": sim.bubble,
                    "paper": formula(pp, costs),
                    "params": stages_per_rank * pp / plan.layout.num_pieces,
                    "activation": sim.peak_activations,
                    "makespan": sim.makespan,
                }
            )
    return rows


def measured_costs_ms() -> ChunkCosts:
    import torch
    from dsv3_lightning.plugins.dualpipe.costs import measure_chunk_costs

    from dsv3_lightning import preset
    from dsv3_lightning.module import DSV3LightningModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = DSV3LightningModule(preset("tiny"))
    tokens = torch.randint(0, module.config.vocab_size, (2, 257))
    c, raw = measure_chunk_costs(module, tokens, layers=(1, 2), repeats=5)
    print("measured (ms): " + ", ".join(f"{k}={1e3 * v:.1f}" for k, v in raw.items()))
    return ChunkCosts(F=1e3 * c.F, B=1e3 * c.B, W=1e3 * c.W, FB=1e3 * (c.F + c.B))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=20)
    parser.add_argument("--F", type=float, default=1.0)
    parser.add_argument("--B", type=float, default=2.0)
    parser.add_argument("--W", type=float, default=1.0)
    parser.add_argument("--FB", type=float, default=2.5)
    parser.add_argument("--measure", action="store_true", help="time F, B, W on the tiny preset (ms)")
    args = parser.parse_args()
    costs = ChunkCosts(F=args.F, B=args.B, W=args.W, FB=args.FB)
    if args.measure:
        costs = measured_costs_ms()
    print(
        f"{args.microbatches} micro-batches; F={costs.F:.3g} B={costs.B:.3g} W={costs.W:.3g} F&B={costs.FB:.3g}\n"
    )
    print("| PP | method | bubble (simulated) | paper's formula | params/device | activation | #devices |")
    print("|---|---|---|---|---|---|---|")
    for r in table(costs, args.microbatches):
        print(
            f"| {r['PP']} | {r['method']} | {r['bubble']:.4g} | {r['paper']:.4g} | {r['params']:g}x | "
            f"{r['activation']} | {r['devices']} |"
        )


if __name__ == "__main__":
    main()
