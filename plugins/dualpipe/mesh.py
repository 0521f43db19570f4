"""The pipeline × expert × data mesh of DualPipeStrategy: which rank runs which stages with which experts.

    world = P × E × D          P pipeline_parallel_size, E expert_parallel_size, D data replicas
    rank  = p · (E·D) + i      p: pipeline position (rank in its pipeline), i = d · E + e: pipeline index

- A *pipeline* is the P ranks with the same i (ranks i, E·D + i, 2·E·D + i ...): one copy of the
  schedule. Its pipeline group carries the schedule's point-to-point messages and the runner's sums
  (shared parameters, logs, full checkpoints). Pipeline i reads replica i of E·D of the global batch
  (``DualPipeStrategy.distributed_sampler_kwargs``); its P ranks read the same slice.
- A *stage block* is the E·D ranks at one position p (ranks p·E·D .. p·E·D + E·D - 1): they hold the
  same pieces of the model. Inside it, expert_parallel's data × expert mesh (``ExpertParallelMesh``
  over the block, block rank i): the *expert group* (E consecutive ranks that together hold every
  routed expert of those pieces and exchange tokens by all-to-all) and the *data group* (D ranks
  holding the same expert shard). Replicated parameters are averaged over the block.

p is the slowest index so that the all-to-all, the heaviest traffic, runs among consecutive ranks
(one node first, NVLink on GPUs) while the pipeline's activations cross nodes.

Why the all-to-alls match up: the E ranks of an expert group sit at the same pipeline position and
run the same action list (every pipeline runs the same plan) on micro-batches of the same shapes
through the same pieces, so they reach the MoE layers' all-to-alls in the same order: in each
forward, and in each backward, which runs them in reverse, whichever action (B, I, or W when a first
stage defers its whole backward) does it. This holds for torch's runtimes (1f1b, zb, dualpipev,
including their shape-inference forward at the first step) and for ours (dualpipe), and is tested
against one process for each. Every group is created by every rank in the same order; the strategy
owns the mesh, there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, collective
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.mesh import ExpertParallelMesh
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard, shard_experts
from torch import nn

KEY = "trainer.strategy.init_args"


def mesh_shape(
    world_size: int, pipeline_parallel_size: int, expert_parallel_size: int
) -> tuple[int, int, int]:
    """(P, E, D) for ``world_size`` processes, or a clear error."""
    if expert_parallel_size < 1:
        raise ValueError(f"{KEY}.expert_parallel_size ({expert_parallel_size}) must be >= 1")
    block = pipeline_parallel_size * expert_parallel_size
    if world_size % block:
        raise ValueError(
            f"trainer.devices x trainer.num_nodes ({world_size}) must be a multiple of {KEY}.pipeline_parallel_size "
            f"({pipeline_parallel_size}) x {KEY}.expert_parallel_size ({expert_parallel_size}) = {block}: the "
            f"processes form pipeline x expert x data-parallel ranks; set trainer.devices to a multiple of {block}, "
            "or change those sizes"
        )
    return pipeline_parallel_size, expert_parallel_size, world_size // block


@dataclass
class PipelineMesh:
    """This rank's place in the pipeline × expert × data mesh and its process groups."""

    pipeline_parallel_size: int
    rank: int
    """The global rank."""
    pipeline_group: dist.ProcessGroup
    """The P ranks of this rank's pipeline, in position order (the PipelineRunner's group)."""
    stage: ExpertParallelMesh
    """The data × expert mesh of the E·D ranks at this rank's position (``stage.group``: all of them)."""

    @property
    def expert_parallel_size(self) -> int:
        return self.stage.expert_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.stage.data_parallel_size

    @property
    def num_pipelines(self) -> int:
        """E·D: the copies of the pipeline, each reading its own slice of the global batch."""
        return self.stage.world_size

    @property
    def pipeline_index(self) -> int:
        return self.rank % self.num_pipelines

    @property
    def pipeline_rank(self) -> int:
        """The position p in the pipeline."""
        return self.rank // self.num_pipelines

    @classmethod
    def create(cls, pipeline_parallel_size: int, expert_parallel_size: int, timeout_s: float) -> PipelineMesh:
        """Builds the groups; every rank must call this, in the same order (``new_group`` is collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        p_size, _, _ = mesh_shape(world, pipeline_parallel_size, expert_parallel_size)
        n = world // p_size
        pipeline_group = None
        for i in range(n):  # every rank creates every group, keeping its own
            group = dist.new_group([p * n + i for p in range(p_size)], timeout=timedelta(seconds=timeout_s))
            if i == rank % n:
                pipeline_group = group
        blocks = [[p * n + i for i in range(n)] for p in range(p_size)]
        stage = ExpertParallelMesh.create(expert_parallel_size, timeout_s, blocks=blocks)
        if stage.group is None:  # a single block (P == 1): the world
            stage.group = dist.group.WORLD
        return cls(p_size, rank, pipeline_group, stage)

    # ------------------------------------------------------------------ helpers on the groups
    def comm(self, group: dist.ProcessGroup, where: str) -> Comm:
        """``group`` with this run's timeout, for expert_parallel's collectives and their errors."""
        return Comm(group, self.stage.timeout_s, where)

    def shard_experts(self, module: nn.Module) -> list[ExpertShard]:
        """Keeps this rank's expert shard of every MoE layer (all-to-all over the expert group);
        nothing when E = 1 (the experts then stay whole and local, like any replicated weight)."""
        if self.expert_parallel_size == 1:
            return []

        def make_dispatcher(name: str, num_experts: int) -> AllToAllTokenDispatcher:
            comm = self.comm(self.stage.expert_group, f"layer {name}")
            return AllToAllTokenDispatcher(comm, num_experts, self.expert_parallel_size)

        return shard_experts(module, self.stage.expert_rank, self.expert_parallel_size, make_dispatcher)

    @torch.no_grad()
    def mean_over_pipelines(
        self, values: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Scalars that are equal on every rank of a pipeline, averaged over the E·D pipelines (so that
        every rank holds the global batch's value); the same keys on every rank. ``device``: where the
        backend reduces (the strategy's root device)."""
        if self.num_pipelines == 1 or not values:
            return values
        keys = sorted(values)
        total = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) for k in keys])
        comm = self.comm(self.stage.group, "the logs")
        collective(comm, "log all-reduce", lambda: dist.all_reduce(total, group=comm.group))
        total /= self.num_pipelines
        return {k: v.to(values[k].device, values[k].dtype) for k, v in zip(keys, total)}
