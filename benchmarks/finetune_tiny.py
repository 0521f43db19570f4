"""The fine-tuning worked example, measured: the answer tokens' validation loss before and after.

    python benchmarks/finetune_tiny.py                          # pre-trains the quick start first (~4 min)
    python benchmarks/finetune_tiny.py --pretrained runs/tiny/version_0/checkpoints/last.ckpt

Every step is the README's command, run as its own process in ``--work_dir``:

1. **Pre-trained model.** ``--pretrained`` (a quick-start checkpoint), or ``dsv3 fit --config
   configs/tiny.yaml``; exported with ``dsv3 convert`` to ``runs/tiny_hf`` (weights + tokenizer).
2. **Before.** ``dsv3 validate --config configs/finetune_tiny.yaml``: the pre-trained model's loss on
   the answer tokens of the held-out conversations (the stdlib docstring questions no run trains on).
3. **After, loss on the answers.** ``dsv3 fit --config configs/finetune_tiny.yaml`` (300 steps).
4. **After, loss on every token.** The same run with ``--data.conversations.loss all``: the questions,
   the template's markers and the answers are all targets. Validation is on the answer tokens in
   every run (``val/loss``), so the three numbers compare.
5. **Answers.** The fine-tuned model, exported, answers held-out questions with ``dsv3 generate
   --chat`` (greedy).

Prints a table of the three validation losses (and the trained and masked token counts per step
of each fine-tune) and the answers.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dsv3_lightning.sweep.results import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DSV3 = str(Path(sys.executable).parent / "dsv3")
CONFIG = str(ROOT / "configs" / "finetune_tiny.yaml")
QUESTIONS = ("What does shutil.copyfile do?", "What does json.dumps do?", "What does os.path.join do?")


def dsv3(work: Path, *args: str) -> tuple[str, float]:
    """Runs ``dsv3 ARGS`` in ``work``: (its standard output, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run([DSV3, *args], cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"dsv3 {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def last_metrics(work: Path, name: str) -> dict[str, float]:
    """The last value of each column of the newest run's metrics.csv under runs/NAME."""
    version = sorted((work / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    rows = read_metrics(version / "metrics.csv")
    return {key: float(value) for row in rows for key, value in row.items() if value and key != "step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/dsv3_finetune_tiny")
    parser.add_argument("--pretrained", help="a quick-start checkpoint (else it is trained first)")
    parser.add_argument("--max_steps", type=int, default=300)
    args = parser.parse_args()
    work = Path(args.work_dir)
    shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    pretrained = args.pretrained
    if pretrained is None:
        _, seconds = dsv3(work, "fit", "--config", str(ROOT / "configs" / "tiny.yaml"))
        print(f"pre-trained the quick start in {seconds:.0f} s")
        pretrained = str(next((work / "runs" / "tiny").glob("version_*/checkpoints/last.ckpt")))
    dsv3(work, "convert", str(Path(pretrained).resolve()), "runs/tiny_hf")

    dsv3(work, "validate", "--config", CONFIG, "--trainer.logger.init_args.name", "before")
    before = last_metrics(work, "before")
    runs = {}
    for name, extra in (("answers", []), ("all_tokens", ["--data.conversations.loss", "all"])):
        _, seconds = dsv3(work, "fit", "--config", CONFIG, "--trainer.max_steps", str(args.max_steps),
                          "--trainer.logger.init_args.name", name, *extra)
        runs[name] = (last_metrics(work, name), seconds)

    print(f"\nAnswer-token validation loss, {args.max_steps} fine-tuning steps (configs/finetune_tiny.yaml):\n")
    print("| model | loss trained on | val/loss (answer tokens) | val/accuracy | targets / masked per step | time |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| pre-trained (quick start) | - | {before['val/loss']:.4f} | {before['val/accuracy']:.3f} | - | - |")
    for name, label in (("answers", "answer tokens"), ("all_tokens", "all tokens")):
        m, seconds = runs[name]
        counts = f"{m['train/target_tokens']:,.0f} / {m['train/masked_tokens']:,.0f}"
        print(f"| fine-tuned | {label} | {m['val/loss']:.4f} | {m['val/accuracy']:.3f} | {counts} | {seconds:.0f} s |")

    checkpoint = next((work / "runs" / "answers").glob("version_*/checkpoints/last.ckpt"))
    dsv3(work, "convert", str(checkpoint), "runs/finetune_tiny_hf")
    print("\nAnswers of the fine-tuned model (dsv3 generate --chat true, greedy):\n")
    for question in QUESTIONS:
        out, _ = dsv3(work, "generate", "--ckpt_path", "runs/finetune_tiny_hf", "--chat", "true", "--prompt", question,
                      "--max_new_tokens", "60")
        print(out.strip(), "\n")


if __name__ == "__main__":
    main()
