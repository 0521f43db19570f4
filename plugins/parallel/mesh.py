"""The one mesh of every parallel run: pipeline x data x expert, a torch ``DeviceMesh`` with named dims.

    world = P x D x E                 P pipeline_parallel_size, D data replicas, E expert_parallel_size
    rank  = p·(D·E) + d·E + e         dims ("pp", "dp", "ep"); ExpertParallelStrategy is P = 1

- **ep**: the E consecutive ranks that together hold every routed expert of their pieces and exchange
  tokens by all-to-all (one node first: NVLink on GPUs, as DeepSeek-V3's EP64 = 8 nodes x 8 GPUs).
- **dp**: the D ranks holding the same expert shard at the same position; their expert gradients are
  summed.
- **block** ("dp" x "ep" flattened): the E·D ranks at one pipeline position, holding the same pieces;
  replicated parameters' gradients are averaged over it. Each of its ranks is the head of one copy of
  the pipeline (its *replica*, ``replica_rank``), which reads its own slice of the global batch.
- **pp**: the P ranks of one pipeline, in position order (the schedule's point-to-point messages,
  parameters that several positions share, the pipeline's logs).
- **node groups** (only for a two-hop dispatch, ``dispatcher(..., ranks_per_node=r)``): each expert
  group cut into E / r nodes of r consecutive ranks; *intra* is this rank's node, *inter* the ranks
  with this rank's local index on every node of its expert group (expert_parallel/two_hop.py).

p is the slowest index so that the all-to-all, the heaviest traffic, runs among consecutive ranks
while a pipeline's activations cross nodes. Every group carries the strategy's timeout (torch's
``backend_override`` options), so that a dead or silent rank fails a collective after that many
seconds instead of hanging. The strategy owns the mesh; there is no module-level state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, collective
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard, shard_experts
from dsv3_lightning.plugins.expert_parallel.two_hop import NodeDedupTokenDispatcher, check_ranks_per_node
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

KEY = "trainer.strategy.init_args"
DIMS = ("pp", "dp", "ep")


def mesh_shape(world_size: int, pipeline_parallel_size: int, expert_parallel_size: int) -> tuple[int, int, int]:
    """(P, D, E) for ``world_size`` processes, or an error that says which YAML key to change."""
    for name, size in (("pipeline_parallel_size", pipeline_parallel_size), ("expert_parallel_size", expert_parallel_size)):
        if size < 1:
            raise ValueError(f"{KEY}.{name} ({size}) must be >= 1")
    block = pipeline_parallel_size * expert_parallel_size
    if world_size % block:
        parts = [f"{KEY}.expert_parallel_size ({expert_parallel_size})"]
        if pipeline_parallel_size > 1:
            parts.insert(0, f"{KEY}.pipeline_parallel_size ({pipeline_parallel_size})")
        raise ValueError(
            f"trainer.devices x trainer.num_nodes ({world_size}) must be a multiple of {' x '.join(parts)}"
            f"{f' = {block}' if len(parts) > 1 else ''}: the processes form a pipeline x data x expert mesh; "
            f"set trainer.devices to a multiple of {block}, or change those sizes"
        )
    return pipeline_parallel_size, world_size // block, expert_parallel_size


def _group_options(timeout_s: float):
    """The backend and its options carrying ``timeout_s``, for every group the mesh creates."""
    backend = dist.get_backend()
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:  # e.g. the fake backend of ``dsv3 plan``: nothing waits
        return None
    options._timeout = timedelta(seconds=timeout_s)
    return backend, options


@dataclass
class ParallelMesh:
    """This rank's place in the pipeline x data x expert mesh, and its process groups."""

    device_mesh: DeviceMesh
    """Dims ("pp", "dp", "ep"): what DTensor, DCP and FSDP2 take."""
    block_mesh: DeviceMesh
    """The flattened ("dp", "ep") sub-mesh: the E·D ranks at this rank's pipeline position."""
    timeout_s: float
    _node_groups: dict[int, tuple[dist.ProcessGroup, dist.ProcessGroup]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls, pipeline_parallel_size: int, expert_parallel_size: int, timeout_s: float, device_type: str = "cpu"
    ) -> ParallelMesh:
        """Builds every group; every rank must call this, in the same order (group creation is collective)."""
        shape = mesh_shape(dist.get_world_size(), pipeline_parallel_size, expert_parallel_size)
        options = _group_options(timeout_s)
        override = {name: options for name in DIMS} if options else None
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=DIMS, backend_override=override)
        block = mesh["dp", "ep"]._flatten("block", backend_override=options)
        return cls(mesh, block, float(timeout_s))

    # ------------------------------------------------------------------ sizes and coordinates
    def size(self, dim: str) -> int:
        return self.device_mesh.size(DIMS.index(dim))

    def local_rank(self, dim: str) -> int:
        return self.device_mesh.get_local_rank(dim)

    @property
    def pipeline_parallel_size(self) -> int:
        return self.size("pp")

    @property
    def data_parallel_size(self) -> int:
        return self.size("dp")

    @property
    def expert_parallel_size(self) -> int:
        return self.size("ep")

    @property
    def num_replicas(self) -> int:
        """E·D: the copies of the pipeline, each reading its own slice of the global batch."""
        return self.data_parallel_size * self.expert_parallel_size

    @property
    def pipeline_rank(self) -> int:
        """The position p in the pipeline."""
        return self.local_rank("pp")

    @property
    def expert_rank(self) -> int:
        return self.local_rank("ep")

    @property
    def data_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def replica_rank(self) -> int:
        """d·E + e: which copy of the pipeline (and which slice of the batch) this rank runs."""
        return self.data_rank * self.expert_parallel_size + self.expert_rank

    # ------------------------------------------------------------------ groups
    @property
    def pipeline_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("pp")

    @property
    def data_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("dp")

    @property
    def expert_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("ep")

    @property
    def block_group(self) -> dist.ProcessGroup:
        return self.block_mesh.get_group()

    def comm(self, group: dist.ProcessGroup, where: str) -> Comm:
        """``group`` with this run's timeout, for collectives that fail with a clear error."""
        return Comm(group, self.timeout_s, where)

    def node_groups(self, ranks_per_node: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """(inter, intra): this rank's groups when every expert group is cut into nodes of
        ``ranks_per_node`` consecutive ranks (see the module docstring). Built on the first call for a
        given ``ranks_per_node``, with this mesh's timeout; that call is collective: every rank of the
        world must make it, in the same order (``shard_experts`` builds every MoE layer's dispatcher on
        every rank, so the first dispatcher does)."""
        if ranks_per_node not in self._node_groups:
            E, r = self.expert_parallel_size, ranks_per_node
            assert 1 < r < E and E % r == 0, "checked by dispatcher()"
            expert_groups = self.device_mesh.mesh.reshape(-1, E)  # global ranks, one row per expert group
            nodes = expert_groups.reshape(-1, E // r, r)  # [group, node, local index]
            timeout = timedelta(seconds=self.timeout_s)
            intra, _ = dist.new_subgroups_by_enumeration(nodes.reshape(-1, r).tolist(), timeout=timeout)
            same_index = nodes.transpose(1, 2).reshape(-1, E // r)  # one local index across the nodes
            inter, _ = dist.new_subgroups_by_enumeration(same_index.tolist(), timeout=timeout)
            self._node_groups[r] = (inter, intra)
        return self._node_groups[ranks_per_node]

    def dispatcher(
        self, name: str, num_experts: int, *, fp8: bool = False, ranks_per_node: int | None = None
    ) -> AllToAllTokenDispatcher:
        """MoE layer ``name``'s token dispatcher (the one builder): an all-to-all over "ep", or, when
        ``ranks_per_node`` cuts the expert group into several nodes (1 < ranks_per_node < E), the
        two-hop dispatch that sends a token once per node (``NodeDedupTokenDispatcher``). Otherwise
        ``ranks_per_node`` only feeds the one-hop dispatcher's node-crossing counter."""
        E = self.expert_parallel_size
        comm = self.comm(self.expert_group, f"layer {name}")
        if ranks_per_node is not None:
            check_ranks_per_node(E, ranks_per_node)
        if ranks_per_node is None or not 1 < ranks_per_node < E:
            return AllToAllTokenDispatcher(comm, num_experts, E, fp8=fp8, ranks_per_node=ranks_per_node)
        inter, intra = self.node_groups(ranks_per_node)
        return NodeDedupTokenDispatcher(
            self.comm(inter, f"layer {name} (inter-node hop)"),
            self.comm(intra, f"layer {name} (intra-node hop)"),
            num_experts, E, ranks_per_node, self.expert_rank, fp8=fp8,
        )

    def shard_experts(
        self, module: nn.Module, make_dispatcher: Callable[[str, int], object] | None = None
    ) -> list[ExpertShard]:
        """Keeps this rank's expert shard of every MoE layer, each with ``make_dispatcher(name, E)``
        (default ``dispatcher``); nothing when E = 1 (the experts stay whole, like any replicated weight)."""
        if self.expert_parallel_size == 1:
            return []
        return shard_experts(module, self.expert_rank, self.expert_parallel_size, make_dispatcher or self.dispatcher)

    @torch.no_grad()
    def mean_over_replicas(self, values: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Scalars, each the value of one replica's slice of the batch, averaged over the E·D replicas, so
        that every rank holds the global batch's value; every rank must pass the same keys. ``device``:
        where the backend reduces (the strategy's root device)."""
        if self.num_replicas == 1 or not values:
            return values
        keys = sorted(values)
        total = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) for k in keys])
        comm = self.comm(self.block_group, "the logs")
        collective(comm, "log all-reduce", lambda: dist.all_reduce(total, group=comm.group))
        total /= self.num_replicas
        return {k: v.to(values[k].device, values[k].dtype) for k, v in zip(keys, total)}
