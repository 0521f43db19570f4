"""Gradient reduction of an expert-parallel step, and clipping by the norm of the whole model.

Each rank r backpropagates its own loss L_r, the mean over its B/W sequences. Through the
differentiable all-to-all, an expert shard on rank (d, e) receives the gradient of every loss of its
expert group d, Σ_{r in group d} ∂L_r/∂θ, while a replicated parameter receives only ∂L_r/∂φ (the
other ranks' tokens never pass through this rank's replicated layers). The loss of the global batch
is L = (1/W) Σ_r L_r, so

    replicated parameters:  grad = (1/W) · all-reduce-sum over the world
    expert shards:          grad = (1/W) · all-reduce-sum over the data group (replicas of the shard)

which is exactly the gradient a single process computes on the whole batch. (DDP's all-reduce would
average the shards over ranks that hold *different* experts: the reason this strategy has no DDP
wrapper.) Gradients are flattened into one buffer per group. A parameter without a gradient on every
rank keeps ``grad = None`` (the optimizer then skips it, as in a single process); one with a gradient
on some ranks gets zeros on the others.

Clipping by norm: ||g||² = Σ replicated g² (identical on every rank after the reduction) +
all-reduce-sum over the expert group of Σ local-shard g², the norm a single process would clip by.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, collective
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@torch.no_grad()
def reduce_gradients(params: list[nn.Parameter], comm: Comm, world_size: int) -> None:
    """grad ← (1/world_size) · Σ over ``comm.group`` for every parameter of ``params`` (collective)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors([torch.cat([g.flatten().float() for g in grads]), has_grad])
    if dist.get_world_size(comm.group) > 1:
        collective(comm, "gradient all-reduce", lambda: dist.all_reduce(flat, group=comm.group))
    values, has_grad = _unflatten_dense_tensors(flat, [torch.empty(sum(g.numel() for g in grads)), has_grad])
    values = values / world_size
    offset = 0
    for p, any_grad in zip(params, has_grad.tolist()):
        n = p.numel()
        if any_grad:
            p.grad = values[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


@torch.no_grad()
def squared_grad_norm(
    replicated: list[nn.Parameter], sharded: list[nn.Parameter], expert_comm: Comm, device: torch.device | None = None
) -> torch.Tensor:
    """Σ g² over ``replicated`` plus the all-reduce-sum over the expert group of Σ g² over ``sharded``:
    the squared gradient norm of the parameters of one copy of the model (float64, shape [1], on
    ``device``, default the parameters')."""
    device = device or next(p.device for p in [*replicated, *sharded])

    def sq(params: list[nn.Parameter]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            if p.grad is not None:
                total += p.grad.double().pow(2).sum()
        return total

    local_experts = sq(sharded).reshape(1)
    if dist.get_world_size(expert_comm.group) > 1:
        collective(expert_comm, "gradient-norm all-reduce", lambda: dist.all_reduce(local_experts, group=expert_comm.group))
    return sq(replicated) + local_experts


@torch.no_grad()
def scale_gradients(params: list[nn.Parameter], norm: float, max_norm: float) -> None:
    """Scales every gradient by ``max_norm / norm`` when that is below 1 (torch's clip_grad_norm_ rule)."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


@torch.no_grad()
def clip_global_norm(
    replicated: list[nn.Parameter], sharded: list[nn.Parameter], expert_comm: Comm, max_norm: float
) -> float:
    """Scales all gradients so that the whole model's gradient norm is at most ``max_norm``; returns
    the norm before clipping (the same on every rank)."""
    norm = math.sqrt(float(squared_grad_norm(replicated, sharded, expert_comm)))
    scale_gradients([*replicated, *sharded], norm, max_norm)
    return norm
