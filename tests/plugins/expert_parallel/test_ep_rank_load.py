"""The per-rank token load ExpertParallelStrategy logs in training (every ``log_every_n_steps``):
max / mean over the expert ranks of the tokens each rank's experts received, equal to what the
per-expert loads of ExpertLoadMonitor give for the same steps, validation tokens left out."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from ep_tiny import GLOBAL_BATCH, StridedSampler, make_module, make_tokens
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.expert_parallel.placement import imbalance
from dsv3_lightning.plugins.load_balancing import ExpertLoadMonitor
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader


class ListLogger(Logger):
    """Keeps every logged metrics dict (rank 0) and saves them to ``path`` after each call."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path, self.rows = path, []

    name, version = "list", 0

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))
        torch.save(self.rows, self.path)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        pass


class SaveLoads(L.Callback):
    """Rank 0 saves ExpertLoadMonitor's per-batch global loads [L, E] at the end of training."""

    def __init__(self, monitor: ExpertLoadMonitor, path: Path) -> None:
        self.monitor, self.path = monitor, path

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(list(self.monitor._recent), self.path)


def test_training_logs_the_per_rank_load_of_each_interval(tmp_path):
    monitor = ExpertLoadMonitor(heatmap=False)
    windows, val = make_tokens(3 * GLOBAL_BATCH), make_tokens(GLOBAL_BATCH, seed=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        max_steps=3,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        strategy=ExpertParallelStrategy(2, start_method="fork", timeout=60),
        logger=ListLogger(tmp_path / "logs.pt"),
        callbacks=[monitor, SaveLoads(monitor, tmp_path / "loads.pt")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(list(windows), batch_size=GLOBAL_BATCH // 2, sampler=StridedSampler(len(windows)))
    val_loader = DataLoader(list(val), batch_size=GLOBAL_BATCH // 2, sampler=StridedSampler(len(val)))
    trainer.fit(make_module(), loader, val_loader)  # 3 steps = 1 epoch, validated before training ends
    rows = torch.load(tmp_path / "logs.pt")
    train = [m for _, m in rows if "ep/train_rank_load_max_over_mean" in m]
    val_logs = [m for _, m in rows if "ep/val_rank_load_max_over_mean" in m]
    loads = torch.load(tmp_path / "loads.pt")  # one [2 MoE layers, 8 experts] per step
    assert len(train) == len(loads) == 3 and len(val_logs) == 1
    for logged, load_LE in zip(train, loads):
        want_L = imbalance(load_LE.view(2, 2, 4).sum(-1))  # rank r holds experts 4r .. 4r + 3
        got_L = torch.tensor([logged[f"ep/train_rank_load_max_over_mean/moe_{i}"] for i in range(2)])
        torch.testing.assert_close(got_L, want_L.float(), rtol=1e-6, atol=0)
        assert abs(logged["ep/train_rank_load_max_over_mean"] - float(want_L.mean())) < 1e-6
        assert (want_L > 1).all()  # a tiny random router is not balanced: the test can tell intervals apart
    assert len({round(m["ep/train_rank_load_max_over_mean"], 6) for m in train}) > 1
