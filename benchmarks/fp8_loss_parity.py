"""FP8 (blockwise, DeepSeek-V3's recipe) against float32 on the tiny model: loss curves and step time.

    python benchmarks/fp8_loss_parity.py [--max_steps 400] [--recipes blockwise] [-- --model.learning_rate 1e-3]

Runs ``dsv3 fit --config configs/tiny.yaml`` once in float32 and once per FP8 recipe with
``--trainer.plugins FP8Precision``, same seed, same data order, logging the training loss every step.
Prints, per recipe: the relative error of the EMA-smoothed (coefficient 0.9, as the paper's
Fig. 10) training loss against float32, its maximum over the steps after warm-up and at the end; the
final validation loss; the median step time relative to float32 (CPU: FP8 is emulated, so slower).
Writes ``fp8_loss_parity.png`` (needs matplotlib, a benchmark-only extra) and a CSV of the curves.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tag: str, extra: list[str], max_steps: int, out: Path, overrides: list[str]) -> dict[str, list[float]]:
    subprocess.run(
        [
            sys.executable, "-m", "dsv3_lightning.cli", "fit", "--config", str(ROOT / "configs/tiny.yaml"),
            "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "fp8_parity",
            "--trainer.logger.init_args.version", tag, *extra, *overrides,
        ],
        check=True, stdout=subprocess.DEVNULL,
    )
    rows = list(csv.DictReader(open(out / "fp8_parity" / tag / "metrics.csv")))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    times = [float(r["train/time"]) for r in rows if r.get("train/time")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    steps = sorted(loss)
    return {"loss": [loss[s] for s in steps], "time": times, "val": val}


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def step_seconds(times: list[float]) -> float:
    """Median seconds per step from ThroughputMonitor's cumulative train/time (logged every step)."""
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--recipes", nargs="+", default=["blockwise"])
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the maximum error")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("overrides", nargs="*", help="extra `dsv3 fit` arguments for every run (after --)")
    args = parser.parse_args()

    curves = {"float32": run("float32", [], args.max_steps, args.out, args.overrides)}
    for recipe in args.recipes:
        plugin = ["--trainer.precision", "null", "--trainer.plugins", "dsv3_lightning.plugins.fp8.FP8Precision",
                  "--trainer.plugins.recipe", recipe]
        curves[recipe] = run(f"fp8_{recipe}", plugin, args.max_steps, args.out, args.overrides)

    ref = ema(curves["float32"]["loss"])
    ref_step = step_seconds(curves["float32"]["time"])
    print(f"\n{args.max_steps} steps of configs/tiny.yaml {' '.join(args.overrides)}, EMA(0.9) of the training "
          "loss, relative to float32\n")
    print("| run | max rel. loss error (after step %d) | rel. error at the end | final val loss | s/step | vs float32 |" % args.warmup)
    print("|---|---|---|---|---|---|")
    print(f"| float32 | - | - | {curves['float32']['val'][-1]:.4f} | {ref_step:.3f} | 1.00x |")
    with open(args.out / "fp8_loss_parity.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        for step in range(len(ref)):
            writer.writerow([step, *(c["loss"][step] if step < len(c["loss"]) else "" for c in curves.values())])
    for recipe in args.recipes:
        smooth = ema(curves[recipe]["loss"])
        rel = [abs(a - b) / b for a, b in zip(smooth, ref)]
        s = step_seconds(curves[recipe]["time"])
        print(f"| fp8 {recipe} | {100 * max(rel[args.warmup:]):.3f}% | {100 * rel[-1]:.3f}% | "
              f"{curves[recipe]['val'][-1]:.4f} | {s:.3f} | {s / ref_step:.2f}x |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no PNG; pip install matplotlib)")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, c in curves.items():
        top.plot(ema(c["loss"]), label=name, lw=1)
    top.set_ylabel("training loss (EMA 0.9)")
    top.legend()
    for recipe in args.recipes:
        smooth = ema(curves[recipe]["loss"])
        bottom.plot([100 * (a - b) / b for a, b in zip(smooth, ref)], label=f"fp8 {recipe}", lw=1)
    bottom.axhline(0.25, color="gray", ls="--", lw=0.8)
    bottom.axhline(-0.25, color="gray", ls="--", lw=0.8)
    bottom.set_ylabel("relative error vs float32 (%)")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fp8_loss_parity.png", dpi=110)
    print(f"\nwrote {args.out / 'fp8_loss_parity.png'}")


if __name__ == "__main__":
    main()
