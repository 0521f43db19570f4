"""Today's layout, measured: each pipeline position's shard built by the strategies' own code.

For every pipeline position p, one process group of the fake backend (``torch.distributed``'s
``fake``: collectives return at once, nothing is sent) stands in for global rank p·E·D of a P·E·D
world, and the strategies' functions run on the module built on the meta device:

    mesh            the parallel layer's ParallelMesh.create (P x D x E; P = 1: ExpertParallelStrategy)
    expert shard    expert_parallel.sharding.shard_experts: E/EP experts of every MoE layer, as
                    ParallelStrategy cuts them; experts are symmetric, so expert rank 0 stands for all
    pieces, params  PipelineRunner (build_pieces, _owners) and ``release_unowned``: the parameters
                    this position's pieces use (P >= 2); the parallel layer's ``GradientSync`` splits
                    them into replicated ones and expert shards
    gradients       one per kept parameter, of its shape and dtype (what autograd leaves)
    reduction       the peak transient bytes (probe.transient_bytes) of the real
                    ``PipelineRunner.sync_gradients`` (P >= 2), ``GradientSync.reduce`` and, when the
                    config clips, ``GradientSync.clip``: the strategies' one gradient synchronisation
    optimizer       the run's optimizer (the module's ``configure_optimizers`` or the config's
                    ``optimizer:``), one ``step`` on meta; the bytes of its state tensors

Only the fused flag of torch's Adam family is changed for the step: fused kernels refuse meta
tensors, and the state they keep is the same. Then the same position is measured under ZeRO-1
(after.py: the run's optimizer sharded by the same ``GradientSync``, one step of the real code).
After each position the released parameters are filled again (``restore_unowned``), so one module
serves all positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from dsv3_lightning.plugins.plan.after import Zero1State, measure_zero1
from dsv3_lightning.plugins.plan.probe import optimizer_state_bytes, tensor_bytes, transient_bytes

TIMEOUT_S = 1800.0


@dataclass
class PositionState:
    """What one pipeline position holds under today's code (bytes unless named otherwise)."""

    position: int
    global_rank: int
    pieces: list[tuple[int, tuple[int, int], bool, bool]]
    """(stage, layer range, is first, is last) of every stage this position runs."""
    replicated_params: int
    expert_params: int
    weights: int
    gradients: int
    optimizer_state: int
    reduction: dict[str, int] = field(default_factory=dict)
    """Peak transient bytes of each gradient step (``sync_gradients``, ``reduce_gradients``, ``clip``)."""
    after: Zero1State | None = None
    """The same rank under ``zero1: true`` (after.py)."""

    @property
    def params(self) -> int:
        return self.replicated_params + self.expert_params


@contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """This process as ``rank`` of a ``world_size`` world on the fake backend."""
    if dist.is_initialized():
        raise RuntimeError(
            "dsv3 plan builds its own (fake) process group; run it outside a distributed job or test group"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure_positions(
    module: DSV3LightningModule,
    plan: SchedulePlan | None,
    expert_parallel_size: int,
    data_parallel_size: int,
    make_optimizer: Callable[[DSV3LightningModule], torch.optim.Optimizer],
    clip: float | None,
) -> list[PositionState]:
    """Every pipeline position of a P x E x D layout (P = 1 when ``plan`` is None), measured."""
    num_positions = plan.layout.num_ranks if plan else 1
    block = expert_parallel_size * data_parallel_size
    world = num_positions * block
    shards: list[ExpertShard] | None = None
    states, cache = [], {}
    for position in range(num_positions):
        with fake_world(position * block, world):
            state, shards = _position(module, plan, expert_parallel_size, shards, make_optimizer, clip, cache)
        state.position, state.global_rank = position, position * block
        states.append(state)
    return states


def _position(module, plan, expert_parallel_size, shards, make_optimizer, clip, cache):
    mesh = ParallelMesh.create(plan.layout.num_ranks if plan else 1, expert_parallel_size, TIMEOUT_S)
    if shards is None:  # once: the module keeps its expert shard for every position
        shards = mesh.shard_experts(module)
    runner = PipelineRunner(module, plan, mesh.pipeline_group, device=torch.device("meta")) if plan else None
    kept = runner.release_unowned() if runner else sum(p.numel() for p in module.parameters())
    sync = GradientSync(module, mesh, shards, runner.owners if runner else None, torch.device("meta"))
    assert kept == sum(p.numel() for p in sync.replicated + sync.experts), "GradientSync sees what is kept"
    steps = {"sync_gradients": runner.sync_gradients} if runner else {}
    steps["reduce_gradients"] = sync.reduce
    if clip:
        steps["clip_global_norm"] = lambda: sync.clip(clip)
    state = _measure(module, sync.replicated, sync.experts, steps, make_optimizer)
    state.after = measure_zero1(module, sync, runner, make_optimizer, clip, cache)
    if runner:
        state.pieces = [
            (s, runner.pieces[plan.layout.piece(s)].layer_range, plan.layout.is_first(s),
             plan.layout.is_last(s))
            for s in runner.local_stages
        ]
        runner.restore_unowned()
    else:
        state.pieces = [(0, (0, module.config.num_hidden_layers), True, True)]
    return state, shards


def _measure(
    module: DSV3LightningModule,
    replicated: list[nn.Parameter],
    sharded: list[nn.Parameter],
    steps: dict[str, Callable[[], object]],
    make_optimizer: Callable[[DSV3LightningModule], torch.optim.Optimizer],
) -> PositionState:
    params = [p for p in replicated + sharded if p.requires_grad]
    for p in params:
        p.grad = torch.empty_like(p)
    gradients = tensor_bytes(p.grad for p in params)
    reduction = {name: transient_bytes(step, params) for name, step in steps.items()}
    optimizer_state = optimizer_state_bytes(make_optimizer(module))
    for p in module.parameters():
        p.grad = None
    return PositionState(
        position=0,
        global_rank=0,
        pieces=[],
        replicated_params=sum(p.numel() for p in replicated),
        expert_params=sum(p.numel() for p in sharded),
        weights=tensor_bytes(replicated + sharded),
        gradients=gradients,
        optimizer_state=optimizer_state,
        reduction=reduction,
    )


def clip_value(gradient_clip_val, gradient_clip_algorithm) -> float | None:
    """The max norm the strategies clip by (they clip by norm only), from the trainer settings."""
    if not gradient_clip_val or (gradient_clip_algorithm or "norm") != "norm":
        return None
    value = float(gradient_clip_val)
    return value if math.isfinite(value) else None


__all__ = ["PositionState", "clip_value", "fake_world", "measure_positions", "optimizer_state_bytes"]
