"""A tiny DeepSeek-V3 (hidden 32, MLA, MoE with 8 experts, MTP depth 1), its single-process reference,
and the reading of a Lightning run's CSV metrics."""

from __future__ import annotations

import csv
import os
import socket
import traceback
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from dsv3_lightning.sharded_checkpoint_io import ShardedCheckpointIO, read_lightning_checkpoint
from dsv3_lightning.plugins.mtp import MultiTokenPrediction
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import Sampler

from dsv3_lightning import preset
from dsv3_lightning.module import DSV3LightningModule

SHAPE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 4,
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


def strategy_cases() -> dict:
    """name -> (processes, replicas reading their own share of the global batch, a strategy maker): the
    meshes the multi-process tests compare with one process (tests/distributed)."""
    from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
    from dsv3_lightning.plugins.expert_parallel import ExpertParallelStrategy

    def pipeline(schedule: str, **options):
        return lambda: DualPipeStrategy(2, 4, schedule, start_method="fork", timeout=120, **options)

    return {
        "EP2": (2, 2, lambda: ExpertParallelStrategy(2, start_method="fork", timeout=120)),
        "EP2xDP2-zero1": (4, 4, lambda: ExpertParallelStrategy(2, zero1=True, start_method="fork", timeout=120)),
        "PP2-1f1b": (2, 1, pipeline("1f1b")),
        "PP2-zb": (2, 1, pipeline("zb")),
        "PP2-dualpipe": (2, 1, pipeline("dualpipe")),
        "PP2-dualpipev": (2, 1, pipeline("dualpipev")),
        "PP2xEP2-dualpipev-zero1": (4, 2, pipeline("dualpipev", expert_parallel_size=2, zero1=True)),
    }


def make_module(
    num_hidden_layers: int = 4, mtp: bool = True, *, recompute: bool = False, **changes
) -> DSV3LightningModule:
    torch.manual_seed(0)
    heads = [MultiTokenPrediction(depth=1, loss_weight=0.3)] if mtp else []
    return DSV3LightningModule(
        preset("tiny", **{**SHAPE, "num_hidden_layers": num_hidden_layers, **changes}),
        heads,
        warmup_steps=0,
        learning_rate=1e-2,
        recompute_activations=recompute,
    )


def make_tokens(batch: int, seed: int = 0, extra: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, SEQ + 1 + extra), generator=g)


def reference(module: DSV3LightningModule, tokens: torch.Tensor, num_microbatches: int):
    """Per-micro-batch training losses and the gradients of their mean, one process, no pipeline."""
    module.zero_grad(set_to_none=True)
    losses = []
    for mb in tokens.chunk(num_microbatches):
        inputs, targets = module._split(mb)
        out = module.model(inputs)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        for head in module.heads:
            loss = loss + head(out.hidden_states, module.read_batch(mb), module.model, stage="train", step=0).loss
        (loss / num_microbatches).backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return torch.stack(losses), grads


def make_trainer(
    root: Path, devices: int, strategy, *, max_steps: int, callbacks=(), plugins=(), **kwargs
) -> L.Trainer:
    """The Trainer of these tests: CPU, CSV logs and a checkpoint per epoch under ``root``, clipping by
    norm at 0.05, the test's own samplers (``use_distributed_sampler=False``)."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy or "auto",
        max_steps=max_steps,
        logger=CSVLogger(root, name="", version=""),
        log_every_n_steps=1,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=0.05,
        use_distributed_sampler=False,
        plugins=[*([ShardedCheckpointIO()] if strategy in (None, "auto") else []), *plugins] or None,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1), *callbacks],
        **kwargs,
    )


class ReplicaSampler(Sampler[int]):
    """Windows r, r + n, ... for replica r of n as the strategy's ``distributed_sampler_kwargs`` say (read
    when iterating, inside the launched process): Lightning's own distributed sampler would shuffle the
    training windows, which the single process's plain loader does not."""

    def __init__(self, length: int, strategy: DualPipeStrategy | None) -> None:
        self.length, self.strategy = length, strategy

    def _replica(self) -> tuple[int, int]:
        kwargs = self.strategy.distributed_sampler_kwargs if self.strategy else {"rank": 0, "num_replicas": 1}
        return kwargs["rank"], kwargs["num_replicas"]

    def __iter__(self):
        rank, replicas = self._replica()
        return iter(range(rank, self.length, replicas))

    def __len__(self) -> int:
        return self.length // self._replica()[1]


def read_checkpoint(path: Path) -> dict:
    """A checkpoint as one process sees it: an ordinary file, or a mesh's sharded directory assembled."""
    return read_lightning_checkpoint(path) if path.is_dir() else torch.load(path, weights_only=False)


def assert_trained_alike(module, single_module) -> None:
    """Whole (every tensor at its full shape) and moved as in one process to 0.1% of the movement (AdamW's
    1/sqrt(v) shows rounding-level gradient differences of rarely routed experts, the losses agree to 1e-5)."""
    start = make_module().state_dict()
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in start.items()}
    for (name, a), b, a0 in zip(
        module.state_dict().items(), single_module.state_dict().values(), start.values()
    ):
        if a.dtype.is_floating_point and not torch.equal(b, a0):
            assert (a - b).abs().max() <= 1e-3 * (b - a0).abs().max(), name
        else:
            assert torch.equal(a, b), name


def metrics(root: Path) -> dict[str, dict[int, float]]:
    """A CSVLogger's ``metrics.csv`` under ``root``: key -> {step: value}."""
    out: dict[str, dict[int, float]] = {}
    with open(root / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value:
                    out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def last(series: dict[int, float]) -> float:
    """The one step a resumed run logs (Lightning numbers it 3 after a restore at step 2)."""
    assert len(series) == 1, series
    return next(iter(series.values()))


def _in_process_group(rank: int, world: int, port: int, out_dir: str, worker) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, out_dir)
    except BaseException:  # start_processes reports only the first rank to fail: print every rank's error
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def fork_ranks(worker, world: int, out_dir) -> None:
    """Runs ``worker(rank, world, out_dir)`` in ``world`` forked processes of one gloo group, one intra-op
    thread each (forked, they share this process's imports: spawning costs ~10 s of imports per process
    on this machine), and waits for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _in_process_group, args=(world, port, str(out_dir), worker), nprocs=world, start_method="fork"
    )


def assert_gradients_match(
    ranks_grads: list[dict[str, torch.Tensor]], want: dict[str, torch.Tensor], tolerance: float, label: str
) -> float:
    """Every rank's gradients within ``tolerance`` (relative norm) of the single process's, and every
    gradient of the single process found on some rank; returns the largest relative error."""
    seen, worst = set(), 0.0
    for rank, grads in enumerate(ranks_grads):
        for name, grad in grads.items():
            ref = want[name]
            rel = float((grad - ref).norm() / ref.norm().clamp_min(1e-30))
            assert rel < tolerance, f"{label} rank {rank} {name}: relative error {rel:.2e}"
            worst = max(worst, rel)
            seen.add(name)
    assert seen == set(want), f"no rank has gradients for {sorted(set(want) - seen)}"
    return worst


def runs_per_world(tmp_path_factory, worker, prefix: str):
    """world size -> the folder of ``worker``'s results, its processes forked once, on first use."""
    done = {}

    def run(world: int):
        if world not in done:
            done[world] = tmp_path_factory.mktemp(f"{prefix}{world}")
            fork_ranks(worker, world, done[world])
        return done[world]

    return run
