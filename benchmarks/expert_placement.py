"""Redundant experts: per-rank token load (max / mean) before and after placement.

    python benchmarks/expert_placement.py                                  # the synthetic layer only
    python benchmarks/expert_placement.py --checkpoint runs/tiny/.../last.ckpt [--measure]

1. A synthetic DeepSeek-V3-shaped layer: 256 experts in 8 groups, 64 expert ranks on 8 nodes, per-expert
   loads Zipf-distributed (load of the k-th most loaded expert ∝ 1 / k^s, in a random order), a few
   layers with different orders. Predicted max/mean over ranks (each expert's tokens split evenly over
   its copies) for the even layout (today: expert e on rank e // 4), the flat placement and the
   hierarchical one (groups kept on nodes: what node-limited routing needs), and the node-level max/mean.
2. A trained checkpoint's recorded loads (ExpertLoadMonitor's last steps, summed): the same prediction
   for EP 2 and 4 with 1..4 extra slots per rank.
3. ``--measure``: ``dsv3 validate`` of that checkpoint on gloo (EP 2 and 4, plain and with redundant
   experts; ``--limit-val-batches`` windows of the config's validation split), parsing the per-rank
   load the strategy logs and the validation loss (which must not change).
4. Heat maps (ranks x layers, log2 of load / mean: white even, red over, blue under), before | after:
   ``--out``/placement_synthetic.png and placement_checkpoint.png.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch
from dsv3_lightning.plugins.expert_parallel.placement import ExpertPlacement, imbalance, place_experts
from dsv3_lightning.plugins.expert_parallel.replicas import read_expert_loads
from dsv3_lightning.plugins.load_balancing.heatmap import load_heatmap, write_png


def zipf_loads(num_layers: int, num_experts: int, exponent: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    return torch.stack(
        [(1e6 / ranks**exponent)[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)]
    )


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt(values: torch.Tensor) -> str:
    """mean over layers (worst layer)."""
    return f"{values.mean():.3f} ({values.max():.3f})"


def heatmap(before_LR: torch.Tensor, after_LR: torch.Tensor, path: Path, cell: int) -> None:
    """Two ranks x layers maps side by side (a black column between): before | after."""
    left, right = load_heatmap(before_LR.T, cell), load_heatmap(after_LR.T, cell)
    gap = torch.zeros(left.shape[0], cell, 3, dtype=torch.uint8)
    write_png(path, torch.cat([left, gap, right], 1))
    print(f"heat map (rows: ranks, columns: layers; before | after): {path}")


def synthetic(out: Path, layers: int) -> None:
    E, R, N, G = 256, 64, 8, 8
    print(
        f"## Synthetic layer: {E} experts in {G} groups, {R} ranks on {N} nodes, {layers} layers of Zipf loads\n"
    )
    print("predicted per-rank max/mean, mean over layers (worst layer)\n")
    print(
        row(
            "Zipf s",
            "extra slots S",
            "slots/rank",
            "even",
            "flat placement",
            "hierarchical",
            "hierarchical, per node",
        )
    )
    print(row(*["---"] * 7))
    for exponent in (0.5, 1.0):
        loads = zipf_loads(layers, E, exponent)
        even = imbalance(ExpertPlacement.even(layers, E, R).rank_loads(loads))
        for S in (0, 64, 128):
            flat = place_experts(loads, E + S, R)
            hier = place_experts(loads, E + S, R, num_nodes=N, num_groups=G)
            per_node = imbalance(hier.rank_loads(loads).view(layers, N, R // N).sum(-1))
            print(
                row(
                    exponent,
                    S,
                    (E + S) // R,
                    fmt(even),
                    fmt(imbalance(flat.rank_loads(loads))),
                    fmt(imbalance(hier.rank_loads(loads))),
                    fmt(per_node),
                )
            )
            if exponent == 1.0 and S == 64:
                maps = ExpertPlacement.even(layers, E, R).rank_loads(loads), hier.rank_loads(loads)
    print()
    heatmap(*maps, out / "placement_synthetic.png", 6)
    print("(Zipf s = 1.0, S = 64, hierarchical)\n")


def recorded(checkpoint: Path, out: Path) -> torch.Tensor:
    loads = read_expert_loads(checkpoint, "--checkpoint")
    L, E = loads.shape
    print(
        f"## Recorded loads of {checkpoint}: {L} MoE layers x {E} experts, {loads.sum():.0f} routed token copies\n"
    )
    print(
        "predicted per-rank max/mean, mean over layers (worst layer); groups = 4 (the tiny preset's n_group)\n"
    )
    print(row("EP ranks R", "extra slots S", "slots/rank", "even (S = 0)", "placed, flat", "placed, 2 nodes"))
    print(row(*["---"] * 6))
    for R in (2, 4):
        even = imbalance(ExpertPlacement.even(L, E, R).rank_loads(loads))
        for per_rank in range(5):
            S = per_rank * R
            flat = imbalance(place_experts(loads, E + S, R).rank_loads(loads))
            two = (
                ""
                if R < 4
                else fmt(
                    imbalance(place_experts(loads, E + S, R, num_nodes=2, num_groups=4).rank_loads(loads))
                )
            )
            print(row(R, S, (E + S) // R, fmt(even), fmt(flat), two))
    print()
    heatmap(
        ExpertPlacement.even(L, E, 4).rank_loads(loads),
        place_experts(loads, E + 4, 4).rank_loads(loads),
        out / "placement_checkpoint.png",
        24,
    )
    print("(R = 4, S = 4, flat)\n")
    return loads


LOAD_LINE = re.compile(
    r"validation tokens per expert rank, max/mean over \d+ ranks per MoE layer: ([0-9., ]+)"
)
LOSS_LINE = re.compile(r"val/loss\s+│\s+([0-9.]+)")


def measure(checkpoint: Path, config: str, limit: int) -> None:
    print(f"## Measured with dsv3 validate on gloo ({config}, {limit} validation batches)\n")
    print(row("EP ranks R", "extra slots S", "placement", "rank max/mean per MoE layer", "mean", "val/loss"))
    print(row(*["---"] * 6))
    cases = [(R, 0, False) for R in (2, 4)] + [(R, R * k, True) for R in (2, 4) for k in range(5)]
    for R, S, placed in sorted(cases, key=lambda c: (c[0], c[2], c[1])):
        command = [
            sys.executable,
            "-m",
            "dsv3_lightning.cli",
            "validate",
            "--config",
            config,
            "--ckpt_path",
            str(checkpoint),
            "--trainer.devices",
            str(R),
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            str(limit),
            "--trainer.strategy",
            "dsv3_lightning.plugins.expert_parallel.ExpertParallelStrategy",
            "--trainer.strategy.init_args.expert_parallel_size",
            str(R),
            "--trainer.strategy.init_args.redundant_experts",
            str(S),
        ] + (["--trainer.strategy.init_args.expert_loads", str(checkpoint)] if placed else [])
        done = subprocess.run(command, capture_output=True, text=True)
        text = done.stdout + done.stderr
        load, loss = LOAD_LINE.search(text), LOSS_LINE.search(text)
        if done.returncode or not load or not loss:
            print(row(R, S, placed, f"failed (exit {done.returncode}): {text[-300:]!r}", "", ""))
            continue
        values = [float(v) for v in load.group(1).split(",")]
        how = "from the recorded loads" if placed else "even (plain expert parallelism)"
        print(
            row(
                R,
                S,
                how,
                ", ".join(f"{v:.3f}" for v in values),
                f"{sum(values) / len(values):.3f}",
                loss.group(1),
            )
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint of a run with ExpertLoadMonitor")
    parser.add_argument("--measure", action="store_true", help="also run dsv3 validate on gloo (minutes)")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--limit-val-batches", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8, help="synthetic layers")
    parser.add_argument("--out", type=Path, default=Path("runs/expert_placement"))
    args = parser.parse_args()
    synthetic(args.out, args.layers)
    if args.checkpoint is not None:
        recorded(args.checkpoint, args.out)
        if args.measure:
            measure(args.checkpoint, args.config, args.limit_val_batches)


if __name__ == "__main__":
    main()
