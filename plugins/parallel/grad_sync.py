"""The one gradient synchronisation of every parallel run: the global batch's gradient, clipped by the
norm of the whole model.

Each replica r (one copy of the pipeline, E·D of them: mesh.py) backpropagates its own loss L_r, the
mean over its slice of the batch. Inside a replica, a pipeline has already summed the gradients of
parameters that several of its positions use (``PipelineRunner.sync_gradients``). Through the
differentiable all-to-all, an expert shard on rank (p, d, e) receives the gradient of every loss of
its expert group, Σ_{e'} ∂L_(d,e')/∂θ, while a replicated parameter receives only its own replica's
∂L_r/∂φ (the other replicas' tokens never pass through this rank's replicated layers). The global
batch's loss is L = (1/(E·D)) Σ_r L_r, so at each position

    replicated parameters:  grad = (1/(E·D)) · all-reduce-sum over the block (the E·D ranks there)
    expert shards:          grad = (1/(E·D)) · all-reduce-sum over the data group (replicas of the shard)

which is exactly the gradient one process computes on the whole batch. (DDP's all-reduce would average
the shards over ranks holding *different* experts: the reason no strategy here has a DDP wrapper.)

The reduction runs in buckets of ``bucket_bytes`` of float32, and the reduced gradients are views of
their bucket (DDP's ``gradient_as_bucket_view``), so that its transient memory is one bucket, not flat
copies of every gradient. A parameter without a gradient on any rank of its group
keeps ``grad = None`` (the optimizer then skips it, as in a single process); one with a gradient on
some ranks gets zeros on the others. Which is which is one small all-reduce of flags per step.

Clipping by norm counts each parameter once: at the lowest pipeline position that uses it (``owners``),
its expert shards summed over the expert group, then the positions summed over the pipeline group:
||g||² = Σ_p [Σ replicated g² + all-reduce-sum over "ep" of Σ local-shard g²]. Every rank finds the
same norm and scales alike (torch's ``clip_grad_norm_`` rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, collective
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard
from torch import nn

from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from dsv3_lightning.plugins.parallel.zero import ShardGroup, Zero1

BUCKET_BYTES = 64 * 2**20
"""Float32 bytes per reduction bucket: large enough that a bucket's latency is amortised over tens of
MB (NCCL's bandwidth saturates there), small enough to be a rounding error of a rank's memory."""


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> Iterable[list[nn.Parameter]]:
    bucket, size = [], 0
    for p in params:
        if bucket and size + 4 * p.numel() > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += 4 * p.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def reduce_mean(
    params: list[nn.Parameter], comm: Comm, divisor: int, *, bucket_bytes: int = BUCKET_BYTES,
    device: torch.device | None = None,
) -> None:
    """grad ← (1/divisor) · Σ over ``comm.group`` for every trainable parameter of ``params`` (collective;
    every rank of the group passes the same list, in the same order)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = device or params[0].device
    single = dist.get_world_size(comm.group) == 1
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    if not single:
        collective(comm, "gradient-flag all-reduce", lambda: dist.all_reduce(has_grad, group=comm.group))
    reduced = [p for p, flag in zip(params, has_grad.tolist()) if flag]  # the one host sync of a step
    for bucket in _buckets(reduced, bucket_bytes):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in bucket])
        if not single:
            collective(comm, "gradient all-reduce", lambda flat=flat: dist.all_reduce(flat, group=comm.group))
        flat /= divisor
        offset = 0
        for p in bucket:  # views of the bucket (DDP's gradient_as_bucket_view): no second copy
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        del flat


class GradientSync:
    """The gradient reduction and global-norm clipping of one rank's parameters, plain or ZeRO-1.

    Args:
        module: The LightningModule (parameter names are its own).
        mesh: The run's mesh.
        shards: This rank's expert shards (reduced over "dp"); every other parameter used here is
            replicated over the block.
        owners: Parameter name -> the pipeline positions whose pieces use it; None: every parameter is
            used by this rank's position (no pipeline, or P = 1).
        device: The strategy's root device (where the norm and flags are reduced: NCCL needs it).

    ``shard_optimizers`` switches to ZeRO-1 (zero.py): the same reduction as a bucketed reduce-scatter
    into each rank's float32 master shard (replicated parameters sharded over the block, expert shards
    over "dp", both divided by E·D), clipping on the shards, and ``after_step`` all-gathers the updated
    parameters.
    """

    def __init__(
        self,
        module: nn.Module,
        mesh: ParallelMesh,
        shards: Iterable[ExpertShard] = (),
        owners: Mapping[str, set[int]] | None = None,
        device: torch.device | None = None,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        self.mesh, self.bucket_bytes = mesh, bucket_bytes
        self.shards = list(shards)
        experts = {id(p) for shard in self.shards for p in shard.params()}
        position = mesh.pipeline_rank
        self.named_replicated: list[tuple[str, nn.Parameter]] = []
        self.named_experts: list[tuple[str, nn.Parameter]] = []
        self.counted: set[str] = set()
        """Names of the parameters whose norm this position counts (each parameter once over the pipeline)."""
        for name, p in module.named_parameters():
            used_by = owners.get(name, set()) if owners is not None else {position}
            if position not in used_by:
                continue
            (self.named_experts if id(p) in experts else self.named_replicated).append((name, p))
            if min(used_by) == position:
                self.counted.add(name)
        self.device = device or next(module.parameters()).device
        self.zeros: list[Zero1] = []

    @property
    def replicated(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_replicated]

    @property
    def experts(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_experts]

    # ------------------------------------------------------------------ ZeRO-1
    def shard_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[Zero1]:
        """Re-points each optimizer at this rank's ZeRO-1 master shards of the parameters used here
        (those of pieces other positions run leave the optimizer: they never have a gradient here)."""
        mesh = self.mesh
        local = {id(p) for _, p in [*self.named_replicated, *self.named_experts]}
        global_ranges = {}
        for shard in self.shards:
            for key, p in zip(shard.state_keys(), shard.params()):
                row = p[0].numel() if p.shape[0] else 0
                global_ranges[key] = (shard.offset * row, shard.num_experts * row)
        for optimizer in optimizers:
            mine: set[int] = set()
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in local]
                mine |= {id(p) for p in group["params"]}
            groups = [
                ShardGroup(label="replicated", params=[(n, p) for n, p in self.named_replicated if id(p) in mine],
                           group=mesh.block_group, divisor=mesh.num_replicas),
                ShardGroup(label="experts", params=[(n, p) for n, p in self.named_experts if id(p) in mine],
                           group=mesh.data_group, divisor=mesh.num_replicas),
            ]
            groups = [g for g in groups if g.params]
            names = {n for g in groups for n, _ in g.params}
            ranges = {n: r for n, r in global_ranges.items() if n in names}
            self.zeros.append(Zero1(optimizer, groups, bucket_bytes=self.bucket_bytes, global_ranges=ranges))
        return self.zeros

    def after_step(self) -> None:
        """After ``optimizer.step()``: the updated master shards back into the parameters (ZeRO-1)."""
        for zero in self.zeros:
            zero.all_gather_parameters()
            zero.free_gradients()

    # ------------------------------------------------------------------ the step
    def reduce(self) -> None:
        """Makes this rank's gradients those of the global batch's loss (collective over the block);
        under ZeRO-1 they land in the master shards and the parameters' ``.grad`` are freed."""
        if self.zeros:
            for zero in self.zeros:
                zero.reduce_scatter_gradients()
            return
        mesh = self.mesh
        if mesh.num_replicas == 1:
            return
        kwargs = {"bucket_bytes": self.bucket_bytes, "device": self.device}
        reduce_mean(self.replicated, mesh.comm(mesh.block_group, "the replicated parameters"), mesh.num_replicas, **kwargs)
        reduce_mean(self.experts, mesh.comm(mesh.data_group, "the expert shards"), mesh.num_replicas, **kwargs)

    @torch.no_grad()
    def squared_norm(self) -> torch.Tensor:
        """||g||² of the whole model (float64, shape [1], on the root device; the same on every rank)."""
        mesh = self.mesh
        if self.zeros:  # every element is owned by one rank of the world (counted: once over the pipeline)
            total = sum(zero.local_squared_norm(self.counted.__contains__) for zero in self.zeros).reshape(1)
            total = total.to(self.device)
            if dist.get_world_size() > 1:
                comm = mesh.comm(None, "the model")
                collective(comm, "gradient-norm all-reduce", lambda: dist.all_reduce(total))
            return total

        def sq(named: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
            total = torch.zeros(1, dtype=torch.float64, device=self.device)
            for name, p in named:
                if p.grad is not None and name in self.counted:
                    total += p.grad.to(self.device).pow(2).sum(dtype=torch.float64)
            return total

        experts = sq(self.named_experts)
        if mesh.expert_parallel_size > 1:
            comm = mesh.comm(mesh.expert_group, "the expert shards")
            collective(comm, "gradient-norm all-reduce", lambda: dist.all_reduce(experts, group=comm.group))
        total = sq(self.named_replicated) + experts
        if mesh.pipeline_parallel_size > 1:
            comm = mesh.comm(mesh.pipeline_group, "the pipeline")
            collective(comm, "gradient-norm all-reduce", lambda: dist.all_reduce(total, group=comm.group))
        return total

    @torch.no_grad()
    def clip(self, max_norm: float) -> float:
        """Scales every gradient of this rank so that the whole model's norm is at most ``max_norm``;
        returns the norm before clipping (the same on every rank)."""
        norm = math.sqrt(float(self.squared_norm()))
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for zero in self.zeros:
                zero.scale_gradients(scale)
            for p in [*self.replicated, *self.experts]:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm


__all__ = ["BUCKET_BYTES", "GradientSync", "reduce_mean"]
