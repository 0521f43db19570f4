"""Gradients of a pipeline × expert × data step (mesh.py): reduced to the global batch's, clipped by the
norm of the whole model.

After the schedule, ``PipelineRunner.sync_gradients`` has summed over the pipeline group the gradients
of parameters that several positions use, so that pipeline i's ranks hold ∂L_i/∂θ for their pieces
(L_i: the mean loss of pipeline i's slice of the batch, for expert shards the sum over its expert
group, as expert_parallel/grad_sync.py explains). The global batch's loss is L = (1/(E·D)) Σ_i L_i,
so at each position, exactly as expert parallelism does over the world (its ``reduce_gradients``):

    replicated parameters of this rank's pieces:  grad = (1/(E·D)) · all-reduce-sum over the stage block
    expert shards of this rank's pieces:          grad = (1/(E·D)) · all-reduce-sum over the data group

Clipping by norm counts each parameter once: at the lowest position whose pieces use it, its shards
summed over the expert group (expert_parallel's ``squared_grad_norm``), then the positions summed over
the pipeline group. Each position's sum is the same on every rank of its block, so every rank finds
the same norm and scales alike.
"""

from __future__ import annotations

import math

import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.mesh import PipelineMesh
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.expert_parallel.all_to_all import collective
from dsv3_lightning.plugins.expert_parallel.grad_sync import reduce_gradients as reduce_over
from dsv3_lightning.plugins.expert_parallel.grad_sync import scale_gradients, squared_grad_norm
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard
from torch import nn


def local_parameters(
    runner: PipelineRunner, shards: list[ExpertShard], *, counted_here: bool = False
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert shards) among the parameters this rank's pieces use, in module order;
    ``counted_here``: only those whose lowest owning position is this rank's (each counted once)."""
    experts = {id(p) for shard in shards for p in shard.params()}
    replicated, sharded = [], []
    for name, p in runner.module.named_parameters():
        owners = runner.owners.get(name, set())
        if runner.rank in owners and (not counted_here or min(owners) == runner.rank):
            (sharded if id(p) in experts else replicated).append(p)
    return replicated, sharded


def reduce_gradients(runner: PipelineRunner, mesh: PipelineMesh, shards: list[ExpertShard]) -> None:
    """Makes this rank's gradients those of the global batch's loss (collective over the stage block)."""
    if mesh.num_pipelines == 1:
        return
    replicated, sharded = local_parameters(runner, shards)
    reduce_over(replicated, mesh.comm(mesh.stage.group, "the replicated parameters"), mesh.num_pipelines)
    reduce_over(sharded, mesh.comm(mesh.stage.data_group, "the expert shards"), mesh.num_pipelines)


def clip_global_norm(
    runner: PipelineRunner, mesh: PipelineMesh, shards: list[ExpertShard], max_norm: float
) -> float:
    """Scales every rank's gradients so that the norm over the whole model is at most ``max_norm``;
    returns the norm before clipping (the same on every rank)."""
    replicated, sharded = local_parameters(runner, shards, counted_here=True)
    # a position may count nothing (DualPipe's copies are counted at the lower position): hence the device
    sq = squared_grad_norm(
        replicated, sharded, mesh.comm(mesh.stage.expert_group, "the expert shards"), runner.device
    )
    comm = mesh.comm(mesh.pipeline_group, "the pipeline")
    collective(comm, "gradient-norm all-reduce", lambda: dist.all_reduce(sq, group=comm.group))
    norm = math.sqrt(float(sq))
    scale_gradients([p for p in runner.module.parameters() if p.grad is not None], norm, max_norm)
    return norm


__all__ = ["clip_global_norm", "local_parameters", "reduce_gradients"]
