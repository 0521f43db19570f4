"""Sharded checkpoints of a parallel run: what each rank writes, and what it reads back on any mesh.

The on-disk layout is the core's (``dsv3_lightning.sharded_checkpoint_io``): model tensors under their
state-dict names (stacked experts ``[E, ...]``), each optimizer's per-parameter state flattened to 1-D
``[numel]`` under the parameter's name, everything else (loops, callbacks, schedulers, hyper-parameters,
the optimizers' param groups and parameter names) as objects. A rank passes only what it holds:

    model           the tensors its pieces use (a pipeline position's; P = 1: all), each expert shard as
                    rows ``offset .. offset + L`` of its layer's ``[E, ...]``; a replicated tensor is
                    passed by every rank that holds it and written once (DCP's planner picks a writer)
    optimizer       the state of the parameters it steps: a replicated parameter's whole, an expert
                    shard's rows (a range of the flattened tensor), under ZeRO-1 its owned range of each

and reads exactly the same pieces for its own mesh, from whichever saved chunks overlap them: a
checkpoint written by PP2 x EP2 resumes with EP4, with PP2, with one process (``ShardedCheckpointIO``
turns the directory into an ordinary checkpoint dict there), and the reverse. Nothing gathers: no rank
ever holds more than its share, and a save is atomic (``sharded_checkpoint.save``). The parameter
names of each optimizer, in the order of its (single-process) param groups, are saved with it, so
that a loader maps state by name, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from dsv3_lightning.plugins.expert_parallel.sharding import ExpertShard
from torch import nn

from dsv3_lightning.plugins.parallel.zero import Chunk as ZeroChunk
from dsv3_lightning.plugins.parallel.zero import Zero1
from dsv3_lightning.sharded_checkpoint import Chunk, load
from dsv3_lightning.sharded_checkpoint_io import (
    OPTIMIZER_STATES,
    STATE_DICT,
    entries_by_parameter,
    optimizer_entries,
    optimizer_state_from_entries,
    state_prefix,
    tensor_entries,
)

LOADED = "_parallel_sharded_load"
"""Marks a checkpoint dict whose tensors ``load_sharded`` already put in place."""


class RankShare:
    """What one rank holds of the module and its optimizers, as checkpoint entries.

    Args:
        module: The LightningModule.
        shards: This rank's expert shards.
        owned: Names of the state-dict entries this rank's pieces use; None: all of them (no pipeline).
        saved_here: Names of the parameters whose ZeRO-1 ranges this rank's position saves (a parameter
            that two positions use, the embedding of a pipeline with MTP, is saved by the lower one:
            each element by one rank); None: all.
    """

    def __init__(
        self,
        module: nn.Module,
        shards: Sequence[ExpertShard],
        owned: set[str] | None,
        saved_here: set[str] | None = None,
    ) -> None:
        self.module, self.owned, self.saved_here = module, owned, saved_here
        self.rows = {key: shard for shard in shards for key in shard.state_keys()}
        self.names = {p: n for n, p in module.named_parameters()}
        self.param_names: dict[int, list[str]] = {}
        """Optimizer index -> its parameters' names in its original (before ZeRO-1) order."""
        self.param_groups: dict[int, list[dict]] = {}
        """Optimizer index -> its original param groups (``state_dict()`` form: parameter indices)."""

    def remember(self, index: int, optimizer: torch.optim.Optimizer) -> None:
        """Records optimizer ``index``'s parameters before ZeRO-1 re-points it at its shards."""
        self.param_names[index] = [self.names[p] for g in optimizer.param_groups for p in g["params"]]
        self.param_groups[index] = optimizer.state_dict()["param_groups"]

    # ------------------------------------------------------------------ the model
    def model_entries(self) -> dict[str, torch.Tensor | Chunk]:
        """This rank's model tensors, views of the live ones (a load fills them in place)."""
        entries: dict[str, torch.Tensor | Chunk] = {}
        for name, tensor in self.module.state_dict().items():
            if self.owned is not None and name not in self.owned:
                continue
            shard = self.rows.get(name)
            entries[name] = Chunk.rows(tensor, shard.num_experts, shard.offset) if shard else tensor
        return entries

    # ------------------------------------------------------------------ an optimizer
    def _chunk_of(self, param: nn.Parameter, name: str, value: torch.Tensor) -> torch.Tensor | Chunk:
        shard = self.rows.get(name)
        if shard is None:
            return value.reshape(-1)
        return Chunk.rows(value, shard.num_experts, shard.offset).flattened()

    def optimizer_entries(
        self, index: int, optimizer: torch.optim.Optimizer, zero: Zero1 | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensor entries, object part) of optimizer ``index`` in the layout."""
        if zero is None:
            return optimizer_entries(index, optimizer, optimizer.state_dict(), self.names, self._chunk_of)
        prefix = state_prefix(index)
        tensors: dict[str, Any] = {}
        for name, entry in zero.state_chunks().items():
            if self.saved_here is not None and name not in self.saved_here:
                continue
            for key, value in entry.items():
                if isinstance(value, ZeroChunk):
                    tensors[f"{prefix}{name}.{key}"] = Chunk(value.values, (value.global_numel,), (value.global_offset,))
                elif torch.is_tensor(value):
                    tensors[f"{prefix}{name}.{key}"] = value
        groups = [
            {**{k: v for k, v in live.items() if k != "params"}, "params": saved["params"]}
            for live, saved in zip(optimizer.param_groups, self.param_groups[index])
        ]
        return tensors, {"param_groups": groups, "param_names": self.param_names[index], "state": {}}

    def optimizer_templates(
        self, index: int, optimizer: torch.optim.Optimizer, zero: Zero1 | None, saved: Mapping[str, Any]
    ) -> dict[str, torch.Tensor | Chunk]:
        """Empty tensors for this rank's share of optimizer ``index``'s saved state (``saved``: the
        checkpoint's tensor metadata), to be filled by ``load``."""
        prefix = state_prefix(index)
        by_name = entries_by_parameter(index, saved)
        templates: dict[str, torch.Tensor | Chunk] = {}
        if zero is not None:
            for name, r in zero.owned_ranges().items():
                for state_key, md in by_name.get(name, {}).items():
                    empty = torch.empty(r.numel if len(md.size) else (), dtype=md.properties.dtype)
                    templates[f"{prefix}{name}.{state_key}"] = (
                        Chunk(empty, (r.global_numel,), (r.global_offset,)) if len(md.size) else empty
                    )
            return templates
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            name = self.names[param]
            if self.owned is not None and name not in self.owned:
                continue
            for state_key, md in by_name.get(name, {}).items():
                if not len(md.size):
                    templates[f"{prefix}{name}.{state_key}"] = torch.empty((), dtype=md.properties.dtype)
                    continue
                empty = torch.empty(param.shape, dtype=md.properties.dtype, device=param.device)
                templates[f"{prefix}{name}.{state_key}"] = self._chunk_of(param, name, empty)
        return templates


def _values(entry: torch.Tensor | Chunk) -> torch.Tensor:
    return entry.local if isinstance(entry, Chunk) else entry


def load_sharded(
    path: str | Path,
    share: RankShare,
    optimizers: Sequence[torch.optim.Optimizer],
    zeros: Mapping[int, Zero1],
) -> dict[str, Any]:
    """Reads this rank's share of a sharded checkpoint (collective over the world): the model's tensors
    in place, each optimizer's state into new tensors; returns the Lightning checkpoint dict, whose
    ``optimizer_states`` ``apply_optimizer_state`` then puts into the optimizers."""
    saved = tensor_entries(path)
    model = share.model_entries()
    templates: dict[str, torch.Tensor | Chunk] = {STATE_DICT + k: v for k, v in model.items()}
    optimizer_templates = [
        share.optimizer_templates(i, opt, zeros.get(i), saved) for i, opt in enumerate(optimizers)
    ]
    for t in optimizer_templates:
        templates.update(t)
    objects = load(path, templates)
    checkpoint = {k: v for k, v in objects.items() if k != OPTIMIZER_STATES}
    checkpoint["state_dict"] = {}
    checkpoint[LOADED] = True
    parts = objects.get(OPTIMIZER_STATES, [])
    checkpoint[OPTIMIZER_STATES] = [
        (part, {k: _values(v) for k, v in t.items()}) for part, t in zip(parts, optimizer_templates)
    ]
    return checkpoint


def apply_optimizer_state(
    index: int,
    optimizer: torch.optim.Optimizer,
    zero: Zero1 | None,
    share: RankShare,
    loaded: tuple[Mapping[str, Any], Mapping[str, torch.Tensor]],
) -> None:
    """Puts what ``load_sharded`` read for optimizer ``index`` into it, by parameter name."""
    objects, tensors = loaded
    names = share.param_names.get(index) or [share.names[p] for g in optimizer.param_groups for p in g["params"]]
    if list(objects["param_names"]) != names:
        differ = sorted(set(objects["param_names"]) ^ set(names))[:3]
        what = f"other parameters than this run's ({differ} ...)" if differ else "its parameters in another order"
        raise ValueError(
            f"the checkpoint's optimizer {index} steps {what}: resume with the model.config and optimizer the "
            "checkpoint was saved with"
        )
    restore_hyperparameters(optimizer, objects["param_groups"])
    if zero is not None:
        by_name = entries_by_parameter(index, tensors)
        for name, entry in objects.get("state", {}).items():
            by_name.setdefault(name, {}).update(entry)
        zero.load_state_chunks({n: e for n, e in by_name.items() if n in zero.owned_ranges()})
        return
    # the names agree, in order: the layout's own reader gives the index-keyed state, in local shapes
    shapes = {share.names[p]: p.shape for group in optimizer.param_groups for p in group["params"]}
    state = optimizer_state_from_entries(index, tensors, objects, shapes)["state"]
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def restore_hyperparameters(optimizer: torch.optim.Optimizer, saved_groups: Sequence[Mapping[str, Any]]) -> None:
    """A checkpoint's param-group settings (lr, betas, weight decay ...) into the live groups, whose
    parameters stay this run's (ZeRO-1's master shards, or a pipeline rank's whole list)."""
    for live, saved in zip(optimizer.param_groups, saved_groups):
        live.update({k: v for k, v in saved.items() if k != "params"})


def zero_state_from_full(zero: Zero1, state: Mapping[str, Any], names: Sequence[str]) -> None:
    """Loads an ordinary (full, index-keyed) optimizer state dict into ZeRO-1's ranges: a checkpoint of
    a single-process or ``checkpoint_format: full`` run resumed with zero1."""
    by_name = {names[i]: entry for i, entry in state["state"].items()}
    chunks = {}
    for name, r in zero.owned_ranges().items():
        if name in by_name:
            chunks[name] = {
                k: v.reshape(-1)[r.global_offset : r.global_offset + r.numel] if torch.is_tensor(v) and v.dim() else v
                for k, v in by_name[name].items()
            }
    zero.load_state_chunks(chunks)


__all__ = [
    "LOADED",
    "RankShare",
    "apply_optimizer_state",
    "load_sharded",
    "restore_hyperparameters",
    "zero_state_from_full",
]
