"""Multi-token prediction ablation on the tiny model: off / D=1 / D=2.

    python benchmarks/mtp_ablation.py [--seeds 1] [--max_steps 400]

Each variant is ``dsv3 fit --config configs/tiny.yaml --config configs/ablations/mtp/<variant>.yaml``
in its own process, run one after the other; prints the main head's validation loss at the last
step (MTP discarded, as the paper evaluates; whole validation split), each depth's validation
accuracy, and the median training time per step (ThroughputMonitor), relative to "off".
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("off", "d1", "d2")


def run(variant: str, seed: int, max_steps: int, out: Path) -> dict[str, float]:
    subprocess.run(
        [
            sys.executable, "-m", "dsv3_lightning.cli", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
            "--config", str(ROOT / f"configs/ablations/mtp/{variant}.yaml"), "--seed_everything", str(seed),
            "--trainer.max_steps", str(max_steps), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", f"mtp_{variant}",
            "--trainer.logger.init_args.version", f"seed{seed}",
        ],
        check=True, stdout=subprocess.DEVNULL,
    )
    rows = list(csv.DictReader(open(out / f"mtp_{variant}" / f"seed{seed}" / "metrics.csv")))
    last = [r for r in rows if r.get("val/loss")][-1]
    times = [float(r["train/time"]) for r in rows if r.get("train/time")]
    batches = [float(r["train/batches"]) for r in rows if r.get("train/batches")]
    step = statistics.median((t1 - t0) / (b1 - b0) for t0, t1, b0, b1 in zip(times, times[1:], batches, batches[1:]))
    result = {"val_loss": float(last["val/loss"]), "s_per_step": step}
    for k in (1, 2):
        if last.get(f"val/mtp_accuracy/depth_{k}"):
            result[f"acc_depth_{k}"] = float(last[f"val/mtp_accuracy/depth_{k}"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations")
    args = parser.parse_args()
    results = {v: [run(v, s, args.max_steps, args.out) for s in args.seeds] for v in VARIANTS}
    ref = statistics.mean(r["s_per_step"] for r in results["off"])
    print(f"\n{args.max_steps} steps of configs/tiny.yaml, seeds {args.seeds} (mean over seeds)\n")
    print("| MTP | main-head val loss | val accuracy depth 1 / 2 | s/step | vs off |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        acc = " / ".join(f"{mean[k]:.3f}" for k in ("acc_depth_1", "acc_depth_2") if k in mean) or "-"
        print(f"| {variant} | {mean['val_loss']:.4f} | {acc} | {mean['s_per_step']:.3f} | {mean['s_per_step'] / ref:.2f}x |")


if __name__ == "__main__":
    main()
