"""Routed experts: stacked in memory, one tensor per expert on disk. The one adapter between the two.

In memory (moe.py, the grouped-matmul seam) a layer's routed experts are two stacked tensors,
``mlp.experts.gate_up_proj`` [E, 2I, D] (each expert's gate rows first, then its up rows) and
``mlp.experts.down_proj`` [E, D, I]. Every Hugging Face checkpoint of the family stores them per
expert, ``mlp.experts.{e}.gate_proj.weight`` [I, D], ``up_proj`` [I, D] and ``down_proj`` [D, I]
(HF_INTEROP.md §5), which is also what transformers' own ``save_pretrained`` writes back.

Everything that crosses that boundary goes through this file: ``unstack`` (save), ``stack_expert``
(one expert's rows, for streaming loads that fill a stacked tensor row by row, or a rank's shard of
it), ``stack_state`` (a whole in-memory mapping, e.g. an MTP module's tensors) and ``stacked_leaf``
(is this state-dict name a stacked tensor). The checkpoint loader (hf.py), the meta-device
materialiser (model/materialize.py) and the MTP head (plugins/mtp/head.py) all use it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import torch

STACKED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Stacked leaf -> the per-expert projections concatenated (along rows) into one of its rows."""

_EXPERTS = "mlp.experts"
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.+\.)?mlp\.experts)\.(?P<e>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def stacked_leaf(name: str) -> tuple[str, str] | None:
    """``(prefix, leaf)`` when the state-dict ``name`` is a stacked expert tensor, e.g.
    ``model.layers.3.mlp.experts.gate_up_proj`` -> (``model.layers.3.mlp.experts``, ``gate_up_proj``)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in STACKED_PARTS and (prefix == _EXPERTS or prefix.endswith("." + _EXPERTS)):
        return prefix, leaf
    return None


def expert_keys(prefix: str, leaf: str, expert: int) -> list[str]:
    """The checkpoint keys that make up row ``expert`` of the stacked ``{prefix}.{leaf}``."""
    return [f"{prefix}.{expert}.{part}.weight" for part in STACKED_PARTS[leaf]]


def stack_expert(read: Callable[[str], torch.Tensor], prefix: str, leaf: str, expert: int) -> torch.Tensor:
    """Row ``expert`` of the stacked tensor, read one per-expert tensor at a time through ``read``."""
    parts = [read(key) for key in expert_keys(prefix, leaf, expert)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def unstack(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """A state dict with stacked experts as per-expert checkpoint keys, lazily (views, no copies)."""
    for name, tensor in state.items():
        found = stacked_leaf(name)
        if found is None:
            yield name, tensor
            continue
        prefix, leaf = found
        parts = STACKED_PARTS[leaf]
        for e in range(tensor.shape[0]):
            rows = tensor[e].chunk(len(parts), dim=0)
            for part, value in zip(parts, rows):
                yield f"{prefix}.{e}.{part}.weight", value


def stack_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A mapping with per-expert keys as our state dict: experts stacked, every other key unchanged.

    Raises ValueError naming the first missing key when a layer's experts are incomplete.
    """
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, set[int]] = {}
    for key, tensor in tensors.items():
        match = PER_EXPERT_KEY.match(key)
        if match:
            experts.setdefault(match["prefix"], set()).add(int(match["e"]))
        else:
            state[key] = tensor
    for prefix, ids in experts.items():
        for leaf in STACKED_PARTS:
            rows = []
            for e in range(max(ids) + 1):
                missing = [key for key in expert_keys(prefix, leaf, e) if key not in tensors]
                if missing:
                    raise ValueError(f"checkpoint lacks {missing[0]!r}: the experts of {prefix} are incomplete")
                rows.append(stack_expert(tensors.__getitem__, prefix, leaf, e))
            state[f"{prefix}.{leaf}"] = torch.stack(rows)
    return state


__all__ = ["PER_EXPERT_KEY", "STACKED_PARTS", "expert_keys", "stack_expert", "stack_state", "stacked_leaf", "unstack"]
