"""Expert shards: slicing each MoE layer's stacked experts in place, and putting them back together.

Each ``GroupedExperts`` keeps rows ``offset .. offset + L`` of ``gate_up_proj`` [E, 2I, D] and
``down_proj`` [E, D, I] (L = E / expert_parallel_size, offset = expert rank × L) as new, smaller
Parameters on the same module (on the meta device too: a shard-first build cuts before it has values),
``num_experts`` becomes L and ``expert_offset`` the offset, so that its ``forward`` and any
subclass's ``grouped_mm`` (FP8) run unchanged on the local experts. The layer's dispatcher becomes an
``AllToAllTokenDispatcher``. Everything else (attention, dense MLPs, router, shared experts, the
heads) stays replicated.

Checkpoints stay portable because they only ever hold full tensors: ``full_state_dict`` gathers
every sharded key over the expert group, ``local_state_dict`` slices a full one; the optimizer's
per-parameter state (AdamW's exp_avg, exp_avg_sq: the parameter's shape) is gathered and sliced the
same way. A run saved with 2 expert ranks therefore resumes with 1 or 4, and loads in a plain run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, collective
from torch import nn

from dsv3_lightning.model.moe import GroupedExperts, MoE

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass
class ExpertShard:
    """One MoE layer's routed experts on this rank."""

    name: str
    """The MoE module's name in the LightningModule (``model.model.layers.1.mlp``)."""
    moe: MoE
    num_experts: int
    """Experts of the whole layer."""
    offset: int
    """Global id of this rank's first expert."""
    num_local_experts: int
    original_dispatcher: object

    @property
    def experts(self) -> GroupedExperts:
        return self.moe.experts

    def state_keys(self) -> list[str]:
        return [f"{self.name}.experts.{w}" for w in EXPERT_WEIGHTS]

    def params(self) -> list[nn.Parameter]:
        return [getattr(self.experts, w) for w in EXPERT_WEIGHTS]

    def local_slice(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.offset : self.offset + self.num_local_experts]


def moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of the module, the model's and the prediction heads' (MTP blocks), by name."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


def _replace(experts: GroupedExperts, name: str, tensor: torch.Tensor) -> None:
    old = getattr(experts, name)
    setattr(experts, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


@torch.no_grad()
def shard_experts(module: nn.Module, expert_rank: int, expert_parallel_size: int, make_dispatcher) -> list[ExpertShard]:
    """Keeps this rank's slice of every MoE layer's experts and installs ``make_dispatcher(name, E)``."""
    shards = []
    for name, moe in moe_layers(module):
        num_experts = moe.experts.num_experts
        local = num_experts // expert_parallel_size
        shard = ExpertShard(name, moe, num_experts, expert_rank * local, local, moe.dispatcher)
        for w in EXPERT_WEIGHTS:
            _replace(moe.experts, w, shard.local_slice(getattr(moe.experts, w)).clone())
        moe.experts.num_experts = local
        moe.experts.expert_offset = shard.offset  # a meta shard is initialised as rows offset.. of the full
        moe.dispatcher = make_dispatcher(name, num_experts)
        shards.append(shard)
    return shards


def _gather_rows(local: torch.Tensor, comm: Comm, what: str) -> torch.Tensor:
    """Concatenates every expert rank's ``local`` along dim 0, in rank order."""
    size = dist.get_world_size(comm.group)
    if size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(size)]
    collective(comm, what, lambda: dist.all_gather(parts, local.contiguous(), group=comm.group))
    return torch.cat(parts)


@torch.no_grad()
def unshard_experts(shards: Iterable[ExpertShard], comm: Comm) -> None:
    """Gathers every layer's full experts back onto every rank and restores the original dispatchers."""
    for shard in shards:
        for w in EXPERT_WEIGHTS:
            _replace(shard.experts, w, _gather_rows(getattr(shard.experts, w).detach(), comm, f"gather of {shard.name}"))
        shard.experts.num_experts = shard.num_experts
        shard.experts.expert_offset = 0
        shard.moe.dispatcher = shard.original_dispatcher


def full_state_dict(state: dict[str, Any], shards: Iterable[ExpertShard], comm: Comm) -> dict[str, Any]:
    """``state`` (a sharded module's state dict) with every expert key gathered to its full tensor."""
    state = dict(state)
    for shard in shards:
        for key in shard.state_keys():
            state[key] = _gather_rows(state[key].detach(), comm, f"checkpoint gather of {key}")
    return state


def local_state_dict(state: Mapping[str, Any], shards: Iterable[ExpertShard]) -> dict[str, Any]:
    """A full state dict with every expert key sliced to this rank's experts (missing keys left out)."""
    state = dict(state)
    for shard in shards:
        for key in shard.state_keys():
            if key in state:
                full = state[key]
                if full.shape[0] != shard.num_experts:
                    raise ValueError(
                        f"checkpoint tensor {key} has {full.shape[0]} experts but the model has {shard.num_experts} "
                        "(model.config.n_routed_experts): resume with the model.config the checkpoint was saved with"
                    )
                state[key] = shard.local_slice(full)
    return state


def _optimizer_params(optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _sharded_indices(optimizer, shards: Iterable[ExpertShard]) -> dict[int, ExpertShard]:
    owner = {id(p): shard for shard in shards for p in shard.params()}
    return {i: owner[id(p)] for i, p in enumerate(_optimizer_params(optimizer)) if id(p) in owner}


def full_optimizer_state(optimizer, state: dict[str, Any], shards: list[ExpertShard], comm: Comm) -> dict[str, Any]:
    """The optimizer's state dict with the per-parameter state of expert shards gathered (collective)."""
    params = _optimizer_params(optimizer)
    new_state = dict(state["state"])
    for i in sorted(_sharded_indices(optimizer, shards)):
        if i not in new_state:
            continue  # not stepped yet: the same on every rank
        entry = dict(new_state[i])
        for key in sorted(entry):
            value = entry[key]
            if torch.is_tensor(value) and value.shape == params[i].shape:
                entry[key] = _gather_rows(value, comm, f"optimizer-state gather of {key}")
        new_state[i] = entry
    return {**state, "state": new_state}


def local_optimizer_state(optimizer, state: Mapping[str, Any], shards: list[ExpertShard]) -> dict[str, Any]:
    """A full optimizer state dict sliced to this rank's expert shards."""
    params = _optimizer_params(optimizer)
    new_state = dict(state["state"])
    for i, shard in _sharded_indices(optimizer, shards).items():
        if i not in new_state:
            continue
        entry = dict(new_state[i])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == (shard.num_experts, *params[i].shape[1:]):
                entry[key] = shard.local_slice(value).clone()
        new_state[i] = entry
    return {**state, "state": new_state}


def sliced_optimizer_states(checkpoint: Mapping[str, Any], optimizers, shards: list[ExpertShard]) -> dict[str, Any]:
    """A Lightning ``checkpoint`` whose full optimizer states are sliced to this rank's expert shards
    (what a strategy's ``load_optimizer_state_dict`` hands on)."""
    states = [
        local_optimizer_state(opt, state, shards) for opt, state in zip(optimizers, checkpoint["optimizer_states"])
    ]
    return {**checkpoint, "optimizer_states": states}
