"""Exact resume after ``kill -9``, plugin by plugin, at configs/tiny.yaml's own shape.

For each combination (tiny.yaml plus one shipped ablation file or option), three real ``dsv3 fit``
processes: an uninterrupted run; the same run killed with SIGKILL a second after its step-10
checkpoint appeared (mid-training, as a pre-empted cluster job); and its resume from that
``last.ckpt``. Printed: the steps logged after the resume, the validations among them, and the
largest relative difference of any logged value (ThroughputMonitor's wall-clock timings left out)
between the resumed and the uninterrupted run.

    python benchmarks/resume_exact.py                       # every combination (about 15 min here)
    python benchmarks/resume_exact.py --only "MTP depth 1"  # one

The test with the same combinations at a smaller shape is tests/cli/test_resume.py.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DSV3 = str(Path(sys.executable).parent / "dsv3")
STEPS, CHECKPOINT = 30, 10
COMMON = [
    "--data.batch_size", "4", "--data.seq_len", "128", "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", str(CHECKPOINT), "--trainer.limit_val_batches", "2",
    "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
]
COMBINATIONS = {
    "tiny.yaml: bias update + sequence-wise loss + load monitor": [],
    "no balancing": ["configs/ablations/balancing/none.yaml"],
    "bias update alone": ["configs/ablations/balancing/bias.yaml"],
    "classic auxiliary loss": ["configs/ablations/balancing/aux_loss.yaml"],
    "MTP depth 1": ["configs/ablations/mtp/d1.yaml"],
    "MTP depth 2": ["configs/ablations/mtp/d2.yaml"],
    "FP8 blockwise + AdamWBF16": ["configs/ablations/fp8/blockwise.yaml"],
    "no group limit": ["configs/ablations/routing/unlimited.yaml"],
    "recomputation": ["--model.recompute_activations", "true"],
}


def command(ablation: list[str], root: Path, *extra: str) -> list[str]:
    configs = [x for a in ablation if a.startswith("configs/") for x in ("--config", str(ROOT / a))]
    flags = [a for a in ablation if not a.startswith("configs/")]
    where = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
             "--trainer.logger.init_args.name", "run"]
    return [DSV3, "fit", "--config", str(ROOT / "configs/tiny.yaml"), *configs, *COMMON, *flags, *where, *extra]


def logged(metrics: Path) -> dict[tuple[str, int], float]:
    with open(metrics) as f:
        return {
            (k, int(r["step"])): float(v)
            for r in csv.DictReader(f)
            for k, v in r.items()
            if v and k not in ("step", "epoch") and not k.endswith("/time") and not k.endswith("_per_sec")
        }


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as out:
        subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=True, cwd=log.parent)


def killed_after_checkpoint(args: list[str], root: Path, log: Path) -> None:
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        while not list(root.glob(f"run/version_0/checkpoints/*step*{CHECKPOINT}.ckpt")):
            if proc.poll() is not None:
                raise RuntimeError(f"the run to kill ended first; see {log}")
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def check(name: str, ablation: list[str], work: Path) -> tuple[int, int, float, str]:
    straight, killed = work / "straight", work / "killed"
    for d in (straight, killed):
        d.mkdir(parents=True)
    run(command(ablation, straight), straight / "fit.log")
    killed_after_checkpoint(command(ablation, killed), killed, killed / "fit.log")
    last = killed / "run/version_0/checkpoints/last.ckpt"
    run(command(ablation, killed, "--ckpt_path", str(last)), killed / "resume.log")
    a = logged(straight / "run/version_0/metrics.csv")
    b = logged(killed / "run/version_1/metrics.csv")
    missing = sorted(set(b) - set(a))
    if missing:
        raise RuntimeError(f"{name}: the resumed run logged what the uninterrupted one did not: {missing[:5]}")
    diffs = {k: abs(v - a[k]) / max(abs(a[k]), 1e-12) for k, v in b.items()}
    worst = max(diffs, key=diffs.get)
    steps = len({s for k, s in b if k == "train/loss"})
    vals = sum(1 for k, _ in b if k == "val/loss")
    return steps, vals, diffs[worst], f"{worst[0]} @ {worst[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="combination names to run")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resume_exact."))
    print("| combination | steps logged after the resume | validations | largest relative difference |")
    print("|---|---|---|---|")
    for i, (name, ablation) in enumerate(COMBINATIONS.items()):
        if args.only and name not in args.only:
            continue
        steps, vals, worst, where = check(name, ablation, work / str(i))
        print(f"| {name} | {steps} | {vals} | {worst:.1e}{f' ({where})' if worst else ''} |", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
