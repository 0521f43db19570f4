"""A tiny DeepSeek-V3 (hidden 32, 2 layers: dense + MoE with 8 experts, MTP depth 1) trained by
Lightning on 1 process or on several with ExpertParallelStrategy (forked, gloo)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from dsv3_lightning.sharded_checkpoint_io import ShardedCheckpointIO
from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy
from dsv3_lightning.plugins.load_balancing import AuxLossFreeBalancing
from dsv3_lightning.plugins.mtp import MultiTokenPrediction
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_attention_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 64,
}
SEQ = 8
GLOBAL_BATCH = 8


def make_module(mtp: bool = True, module_options: dict | None = None, **changes) -> DSV3LightningModule:
    torch.manual_seed(0)
    heads = [MultiTokenPrediction(depth=1, loss_weight=0.3)] if mtp else []
    # A constant learning rate (a resumed run's schedule then matches), and 1e-3: AdamW normalises each
    # update, which turns float32 summation-order noise in near-zero gradients into parameter noise of
    # order lr (at 1e-2 the shared expert drifts 2e-5 relative in 3 steps; at 1e-3, 1.5e-6).
    return DSV3LightningModule(
        preset("tiny", **{**SHAPE, **changes}), heads, warmup_steps=0, learning_rate=1e-3, min_lr_ratio=1.0,
        **(module_options or {}),
    )


def make_tokens(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, SEQ + 2), generator=g)  # + 1 target + 1 MTP token


class StridedSampler(Sampler[int]):
    """Rank r of W reads windows r, r + W, ... in order (so that W ranks' batches of B/W together are
    the single process's batch of B); the rank is read when iterating, inside the launched process."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.length, world))

    def __len__(self) -> int:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.length // world


class GlobalLoss(L.Callback):
    """Records the loss of the global batch (mean over ranks of equal local batches); rank 0 saves it."""

    def __init__(self, path: Path) -> None:
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(self.losses, self.path)


def fit(
    root: Path,
    devices: int,
    expert_parallel_size: int,
    *,
    module: DSV3LightningModule | None = None,
    max_steps: int = 3,
    windows: torch.Tensor | None = None,
    ckpt_path: str | None = None,
    callbacks=(),
    val_windows: torch.Tensor | None = None,
    accumulate_grad_batches: int = 1,
    **strategy_kwargs,
) -> tuple[DSV3LightningModule, list[float], dict[str, float]]:
    """Trains on the same global batches of 8 windows whatever ``devices`` is; returns the module
    (rank 0's full weights, copied back by the launcher), the global-batch losses and the final
    validation metrics (torchmetrics, exact over all ranks) if ``val_windows`` are given."""
    root.mkdir(parents=True, exist_ok=True)
    module = module or make_module()
    windows = make_tokens(4 * GLOBAL_BATCH) if windows is None else windows
    strategy = (
        ExpertParallelStrategy(expert_parallel_size, start_method="fork", timeout=60, **strategy_kwargs)
        if devices > 1
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        enable_checkpointing=bool(callbacks and any(isinstance(c, ModelCheckpoint) for c in callbacks)),
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
        accumulate_grad_batches=accumulate_grad_batches,
        use_distributed_sampler=False,
        plugins=[ShardedCheckpointIO()] if devices == 1 else None,  # reads a sharded checkpoint directory
        callbacks=[GlobalLoss(root / "losses.pt"), AuxLossFreeBalancing(0.01), *callbacks],
    )
    loader = DataLoader(list(windows), batch_size=GLOBAL_BATCH // devices, sampler=StridedSampler(len(windows)))
    val_loader = None
    if val_windows is not None:
        val_loader = DataLoader(list(val_windows), batch_size=GLOBAL_BATCH // devices, sampler=StridedSampler(len(val_windows)))
    trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path, weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return module, torch.load(root / "losses.pt"), metrics


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    """||got - want|| / ||want|| per floating tensor of two state dicts with the same keys."""
    assert got.keys() == want.keys(), set(got) ^ set(want)
    return {
        k: float((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30))
        for k in want
        if want[k].is_floating_point()
    }
