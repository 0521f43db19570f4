"""A small Lightning fit on a prepared corpus that records which windows each rank trained on, per
step; run by test_resume_any_mesh.py as its own command (Lightning's DDP relaunches it per rank).

    python resume_fit.py PREPARED OUT --devices 2 --batch_size 2 --max_steps 5 [--ckpt_path C]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

from dsv3_lightning.data import DSV3DataModule


class Recorder(L.LightningModule):
    """A bigram model that appends ``[global_step, window tokens]`` of every window it trains on."""

    def __init__(self, vocab_size: int, out: Path) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.out = out

    def training_step(self, batch, batch_idx):
        with open(self.out / f"rank{self.global_rank}.jsonl", "a") as f:
            for window in batch.tolist():
                f.write(json.dumps([self.global_step, window]) + "\n")
        logits = self.head(self.emb(batch[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prepared")
    p.add_argument("out", type=Path)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--max_steps", type=int, required=True)
    p.add_argument("--save_at", type=int, default=0)
    p.add_argument("--ckpt_path", default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dm = DSV3DataModule(data_path=args.prepared, vocab_size=300, seq_len=16, batch_size=args.batch_size, seed=3)
    callbacks = []
    if args.save_at:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=args.out / "ckpt", every_n_train_steps=args.save_at, save_top_k=-1, filename="step{step}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        enable_checkpointing=bool(callbacks), default_root_dir=args.out,
    )  # fmt: skip
    trainer.fit(Recorder(300, args.out), datamodule=dm, ckpt_path=args.ckpt_path)
    if trainer.global_rank == 0:
        (args.out / "done").write_text(str(trainer.global_step))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
