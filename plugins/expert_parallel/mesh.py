"""The data × expert mesh of an expert-parallel run: which ranks hold which expert shard.

    world = data_parallel_size × expert_parallel_size, rank = d · expert_parallel_size + e

Ranks ``d·EP .. d·EP + EP - 1`` form one *expert group*: together they hold every routed expert
(rank e holds experts ``e·E/EP .. (e+1)·E/EP - 1`` of every MoE layer) and exchange tokens by
all-to-all. Ranks with the same ``e`` form one *data group*: they hold the same shard and average its
gradients. Expert groups are consecutive ranks, so an expert group fills whole nodes before it spans
the next one (on GPUs: NVLink first, as DeepSeek-V3's EP64 = 8 nodes × 8 GPUs).

The groups are created with ``torch.distributed.new_group`` and the strategy's timeout, so that every
collective of the run (the all-to-all included) fails after that many seconds instead of hanging.
The strategy owns the mesh; there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

KEY = "trainer.strategy.init_args"


def mesh_shape(world_size: int, expert_parallel_size: int) -> tuple[int, int]:
    """(data_parallel_size, expert_parallel_size) for ``world_size`` processes, or a clear error."""
    if expert_parallel_size < 1:
        raise ValueError(f"{KEY}.expert_parallel_size ({expert_parallel_size}) must be >= 1")
    if world_size % expert_parallel_size:
        raise ValueError(
            f"trainer.devices × trainer.num_nodes ({world_size}) cannot be split into a data × expert mesh with "
            f"{KEY}.expert_parallel_size ({expert_parallel_size}): the world size must be a multiple of it; set "
            f"trainer.devices to a multiple of {expert_parallel_size} or change expert_parallel_size"
        )
    return world_size // expert_parallel_size, expert_parallel_size


@dataclass
class ExpertParallelMesh:
    """This rank's place in the mesh and its two process groups."""

    data_parallel_size: int
    expert_parallel_size: int
    rank: int
    expert_group: dist.ProcessGroup | None
    """The ranks that together hold all experts (all-to-all runs here)."""
    data_group: dist.ProcessGroup | None
    """The ranks that hold the same expert shard (their expert gradients are summed here)."""
    timeout_s: float

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.expert_parallel_size

    @property
    def expert_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.expert_parallel_size

    @classmethod
    def create(cls, expert_parallel_size: int, timeout_s: float) -> ExpertParallelMesh:
        """Builds the groups; every rank must call this, in the same order (``new_group`` is collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        dp, ep = mesh_shape(world, expert_parallel_size)
        timeout = timedelta(seconds=timeout_s)
        expert_group = data_group = None
        for d in range(dp):  # every rank creates every group, keeping its own
            group = dist.new_group([d * ep + e for e in range(ep)], timeout=timeout)
            if d == rank // ep:
                expert_group = group
        for e in range(ep):
            group = dist.new_group([d * ep + e for d in range(dp)], timeout=timeout)
            if e == rank % ep:
                data_group = group
        return cls(dp, ep, rank, expert_group, data_group, timeout_s)
