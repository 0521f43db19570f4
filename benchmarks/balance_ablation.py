"""Load-balancing ablation on the tiny model: none / classic aux loss / bias / bias + sequence loss.

    python benchmarks/balance_ablation.py --seeds 1 2 3 [--max_steps 400]

Each (variant, seed) is one ``dsv3 fit --config configs/tiny.yaml --config
configs/ablations/balancing/<variant>.yaml`` in its own process, validated on the whole validation
split (797 windows of 256 tokens) at steps 200 and 400. Prints a markdown table, mean ± standard
deviation over seeds (the seed sets the initialisation; the data order is the same):
- val loss: the last validation's next-token loss;
- MaxVio_global: ``val/max_vio``, over the whole validation set, mean of the 3 MoE layers;
- MaxVio_batch: ``train/max_vio`` averaged over the last 100 training steps;
- s/run: wall time of the run.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "aux_loss", "bias", "bias_seq")


def run(variant: str, seed: int, max_steps: int, out: Path, skip_existing: bool) -> dict[str, float]:
    version = f"seed{seed}"
    metrics = out / f"balancing_{variant}" / version / "metrics.csv"
    if skip_existing and metrics.is_file() and finished(metrics, max_steps):
        return summarize(metrics, seconds=float("nan"))
    if metrics.parent.exists():
        shutil.rmtree(metrics.parent)  # an unfinished run of an earlier sweep
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable, "-m", "dsv3_lightning.cli", "fit",
            "--config", str(ROOT / "configs/tiny.yaml"),
            "--config", str(ROOT / f"configs/ablations/balancing/{variant}.yaml"),
            "--seed_everything", str(seed),
            "--trainer.max_steps", str(max_steps),
            "--trainer.val_check_interval", str(max_steps // 2),
            "--trainer.limit_val_batches", "1.0",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.version", version,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return summarize(metrics, seconds=time.perf_counter() - start)


def finished(metrics: Path, max_steps: int) -> bool:
    rows = list(csv.DictReader(open(metrics)))
    return any(r.get("val/loss") and int(r["step"]) == max_steps - 1 for r in rows)


def summarize(metrics: Path, seconds: float) -> dict[str, float]:
    rows = list(csv.DictReader(open(metrics)))
    val = [(int(r["step"]), float(r["val/loss"]), float(r["val/max_vio"])) for r in rows if r.get("val/loss")]
    train_vio = [float(r["train/max_vio"]) for r in rows if r.get("train/max_vio")]
    last_steps = train_vio[-100:]
    return {
        "val_loss": val[-1][1],
        "max_vio_global": val[-1][2],
        "max_vio_batch": sum(last_steps) / len(last_steps),
        "seconds": seconds,
    }


def mean_std(values: list[float], digits: int) -> str:
    values = [v for v in values if not math.isnan(v)]  # wall time is unknown for reused runs
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations")
    parser.add_argument("--skip_existing", action="store_true", help="reuse finished runs of an earlier sweep")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            result = run(variant, seed, args.max_steps, args.out, args.skip_existing)
            results.setdefault(variant, []).append(result)
            print(f"{variant:9s} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)

    print(f"\n{args.max_steps} steps of 8 x 256 tokens, seeds {args.seeds}, mean ± std over seeds\n")
    print("| balancing | val loss | MaxVio_global (val) | MaxVio_batch (last 100 steps) | s/run |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        col = lambda key, d: mean_std([r[key] for r in runs], d)
        print(f"| {variant} | {col('val_loss', 4)} | {col('max_vio_global', 3)} | {col('max_vio_batch', 3)} "
              f"| {col('seconds', 0)} |")


if __name__ == "__main__":
    main()
