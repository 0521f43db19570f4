"""What the non-finite guard costs per training step (dsv3_lightning.guard).

Trains configs/tiny.yaml's model (batch 8 x 256, float32, one process) for ``--steps`` optimizer steps
with the guard as shipped, and with a module whose guard hooks do nothing, alternating A B A B
``--rounds`` times; prints the median seconds per step of each and their ratio. The guard adds, per
backward, one fused norm over the gradients, a scalar all-reduce (none on one process) and one host
sync.

    python benchmarks/guard_overhead.py --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from dsv3_lightning import ModelConfig
from dsv3_lightning.module import DSV3LightningModule

ROOT = Path(__file__).resolve().parents[1]


class Unguarded(DSV3LightningModule):
    def on_before_backward(self, loss):
        pass

    def on_after_backward(self):
        pass

    def on_before_optimizer_step(self, optimizer):
        pass


class StepTimes(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)


def seconds_per_step(cls, config: ModelConfig, steps: int) -> float:
    torch.manual_seed(0)
    module = cls(config, learning_rate=1e-3, warmup_steps=0)
    tokens = torch.randint(0, config.vocab_size, (steps * 8, 257))
    timer = StepTimes()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        gradient_clip_val=1.0)
    trainer.fit(module, torch.utils.data.DataLoader(list(tokens), batch_size=8))
    return statistics.median(timer.times[2:])  # the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shape = yaml.safe_load(open(ROOT / "configs/tiny.yaml"))["model"]["config"]
    config = ModelConfig(vocab_size=4096, **shape)
    guarded, unguarded = [], []
    for _ in range(args.rounds):
        guarded.append(seconds_per_step(DSV3LightningModule, config, args.steps))
        unguarded.append(seconds_per_step(Unguarded, config, args.steps))
    g, u = statistics.median(guarded), statistics.median(unguarded)
    print("| module | seconds per step (median) |")
    print("|---|---|")
    print(f"| guard hooks off | {u:.3f} |")
    print(f"| guard on (shipped) | {g:.3f} ({g / u:.3f}x) |")


if __name__ == "__main__":
    main()
