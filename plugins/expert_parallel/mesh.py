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

A mesh may also span a *block* of the world instead of all of it: ``create(..., blocks=...)`` cuts
the world into disjoint lists of ranks, each its own data × expert mesh (rank = its index in the
block). DualPipeStrategy uses one block per pipeline position (``dualpipe/mesh.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """This rank's place in the mesh and its process groups."""

    data_parallel_size: int
    expert_parallel_size: int
    rank: int
    """This rank's index in the mesh (its global rank when the mesh is the world)."""
    expert_group: dist.ProcessGroup | None
    """The ranks that together hold all experts (all-to-all runs here)."""
    data_group: dist.ProcessGroup | None
    """The ranks that hold the same expert shard (their expert gradients are summed here)."""
    timeout_s: float
    group: dist.ProcessGroup | None = None
    """All ranks of the mesh (replicated parameters are averaged here); None: the world."""

    @property
    def world_size(self) -> int:
        """Ranks in the mesh."""
        return self.data_parallel_size * self.expert_parallel_size

    @property
    def expert_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def data_rank(self) -> int:
        return self.rank // self.expert_parallel_size

    @classmethod
    def create(
        cls, expert_parallel_size: int, timeout_s: float, *, blocks: Sequence[Sequence[int]] | None = None
    ) -> ExpertParallelMesh:
        """Builds the groups; every rank must call this, in the same order (``new_group`` is collective).

        ``blocks``: disjoint lists of global ranks covering the world, each one mesh (every rank passes
        the same lists and gets the mesh of its own block); default: the world is one mesh.
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        blocks = [list(range(world))] if blocks is None else [list(b) for b in blocks]
        assert sorted(r for b in blocks for r in b) == list(range(world)), f"blocks {blocks} must cover the world"
        timeout = timedelta(seconds=timeout_s)
        mine = next(b for b in blocks if rank in b)
        dp, ep = mesh_shape(len(mine), expert_parallel_size)
        block_group = expert_group = data_group = None
        for block in blocks:  # every rank creates every group, keeping its own
            if len(blocks) > 1:
                group = dist.new_group(block, timeout=timeout)
                if block is mine:
                    block_group = group
            for d in range(dp):
                group = dist.new_group([block[d * ep + e] for e in range(ep)], timeout=timeout)
                if block is mine and d == mine.index(rank) // ep:
                    expert_group = group
            for e in range(ep):
                group = dist.new_group([block[d * ep + e] for d in range(dp)], timeout=timeout)
                if block is mine and e == mine.index(rank) % ep:
                    data_group = group
        return cls(dp, ep, mine.index(rank), expert_group, data_group, timeout_s, block_group)
