"""Materialisation: what is still on the meta device gets memory, then values, by name.

Shard-first construction (DESIGN.md, the parallel layer): the model is built on the meta device, a
strategy cuts it on meta (pipeline pieces: parameters it does not run become empty; expert shards:
each ``GroupedExperts`` keeps rows offset .. offset + L and sets ``expert_offset``), and only then
``materialize_`` allocates the tensors that remain, on the rank's device:

    with torch.device("meta"):
        module = DSV3LightningModule(config, heads)     # or the CLI, for a shards-first strategy
    strategy cuts module.model (slicing meta tensors, setting expert_offset)
    module.materialize(device)                          # = configure_model inside a Trainer

Per tensor still on meta: an empty tensor of its shape, dtype and ``requires_grad`` on ``device``
(a new Parameter object: torch cannot move a Parameter off meta in place, so references to
parameters are taken after this); tensors already materialised, or replaced by a strategy, are left
as they are. Then each module owning a new buffer recomputes its derived buffers (``reset_buffers``:
RoPE frequencies, router counts), and the new persistent tensors are filled: from ``source`` (a
checkpoint, read lazily, only the kept tensors and expert rows) where it holds them, else by
``init_weights_`` (init.py), which gives the values of a model built normally with the same seed.
A new tensor that neither can fill is refused (its memory would be garbage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dsv3_lightning.model.init import init_weights_, is_stacked_experts, named_tensors


class TensorSource(Protocol):
    """Where materialisation reads values instead of initialising them (a checkpoint)."""

    def fill_(self, name: str, tensor: torch.Tensor, expert_offset: int | None) -> bool:
        """Copies the values of checkpoint name ``name`` into ``tensor`` (stacked experts: the rows of
        global ids ``expert_offset`` ..); False when the source does not hold them."""
        ...


@dataclass
class Materialized:
    """What ``materialize_`` did, by qualified name."""

    allocated: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"materialised {len(self.allocated)} tensor(s): {len(self.loaded)} loaded, "
            f"{len(self.initialised)} initialised, the rest derived buffers"
        )


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@torch.no_grad()
def materialize_(
    module: nn.Module,
    device: torch.device | str,
    seed: int,
    *,
    std: float,
    source: TensorSource | None = None,
) -> Materialized:
    """Allocates ``module``'s meta tensors on ``device`` and gives them values (see the module doc)."""
    device = torch.device(device)
    done = Materialized()
    replaced: dict[int, torch.Tensor] = {}  # a tensor shared by two modules is allocated once
    owners_of_buffers: list[nn.Module] = []
    for qualified, owner in module.named_modules():
        prefix = f"{qualified}." if qualified else ""
        for leaf, tensor in list(owner._parameters.items()):
            if tensor is not None and tensor.is_meta:
                done.allocated.append(prefix + leaf)
                if id(tensor) not in replaced:
                    replaced[id(tensor)] = nn.Parameter(
                        torch.empty_like(tensor, device=device), requires_grad=tensor.requires_grad
                    )
                owner._parameters[leaf] = replaced[id(tensor)]
        new_buffers = False
        for leaf, tensor in list(owner._buffers.items()):
            if tensor is not None and tensor.is_meta:
                done.allocated.append(prefix + leaf)
                replaced.setdefault(id(tensor), torch.empty_like(tensor, device=device))
                owner._buffers[leaf] = replaced[id(tensor)]
                new_buffers = True
        if new_buffers:
            owners_of_buffers.append(owner)
    fresh = {id(t) for t in replaced.values()}
    with torch.device("cpu"):  # computed where a normal build computes them (bits), then moved
        for owner in owners_of_buffers:
            if hasattr(owner, "reset_buffers"):
                owner.reset_buffers(device)

    to_init: set[str] = set()
    underived: list[str] = []  # non-persistent buffers that no reset_buffers recomputed
    params = {id(p) for p in module.parameters()}
    for qualified, name, owner, leaf, tensor in named_tensors(module):
        if id(tensor) not in fresh:
            continue
        if id(tensor) not in params and leaf in owner._non_persistent_buffers_set:
            if not hasattr(owner, "reset_buffers"):
                underived.append(qualified)
            continue
        if tensor.numel() == 0:
            continue  # a released parameter stays empty
        offset = owner.expert_offset if is_stacked_experts(owner, leaf) else None
        if source is not None and source.fill_(name, tensor, offset):
            done.loaded.append(qualified)
        else:
            to_init.add(qualified)
    done.initialised = init_weights_(module, seed, std=std, only=to_init)
    unfilled = underived + sorted(to_init - set(done.initialised))
    if unfilled:
        raise NotImplementedError(
            f"materialisation cannot give values to {len(unfilled)} tensor(s) built on the meta device, "
            f"e.g. {unfilled[:3]}: their modules have no initialisation rule (init.py) and no "
            "reset_buffers; build such modules off the meta device"
        )
    return done


class HFCheckpointSource:
    """Tensors of a Hugging Face directory by checkpoint key, read lazily (hf_checkpoint.py: any
    family's key prefix removed, block FP8 dequantized): only the tensors asked for, and of stacked
    experts only the rows asked for (hf_experts.py, the one stacking adapter)."""

    def __init__(self, path: str | Path) -> None:
        from dsv3_lightning.hf_checkpoint import CheckpointReader

        self.path = Path(path)
        self.reader = CheckpointReader(self.path)

    def fill_(self, name: str, tensor: torch.Tensor, expert_offset: int | None) -> bool:
        from dsv3_lightning.hf_experts import expert_keys, stack_expert, stacked_leaf

        if expert_offset is None:
            if name not in self.reader.weight_map:
                return False
            return self._copy(name, tensor, self.reader.get(name))
        prefix, leaf = stacked_leaf(name)
        ids = range(expert_offset, expert_offset + tensor.shape[0])
        keys = [expert_keys(prefix, leaf, e) for e in ids]
        if not any(key in self.reader.weight_map for row in keys for key in row):
            return False
        for row, (e, row_keys) in enumerate(zip(ids, keys)):  # one expert at a time
            missing = [key for key in row_keys if key not in self.reader.weight_map]
            if missing:
                raise ValueError(f"{self.path}: checkpoint lacks {missing[0]!r} of the stacked {name}")
            self._copy(name, tensor[row], stack_expert(self.reader.get, prefix, leaf, e))
        return True

    def _copy(self, name: str, tensor: torch.Tensor, value: torch.Tensor) -> bool:
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{self.path}: {name} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model; the checkpoint's config.json describes another shape"
            )
        tensor.copy_(value)
        return True


__all__ = ["HFCheckpointSource", "Materialized", "TensorSource", "has_meta_tensors", "materialize_"]
