"""The Lightning layout of a sharded checkpoint, its readers for one process, and ``ShardedCheckpointIO``.

**Layout** (the flat keys of ``sharded_checkpoint.save``; strategies write it, everything here reads it):

- ``state_dict.<name>``: the LightningModule's state-dict entries under their own names; stacked
  experts (``state_dict.model.model.layers.1.mlp.experts.gate_up_proj``, ``[E, 2I, D]``) as row Chunks.
- ``optimizer_states.<i>.state.<param name>.<key>``: optimizer ``i``'s per-parameter tensors
  (``exp_avg``, ``exp_avg_sq``) *flattened* to 1-D ``[numel]``, so that a rank's expert rows and a
  ZeRO-1 rank's contiguous range are both 1-D Chunks and any mesh reads any other's; 0-dim entries
  (``step``) as plain tensors. State keys hold no dot (the name before the last dot is the parameter's).
- the object ``optimizer_states``: per optimizer, the rest of ``optimizer.state_dict()``:
  ``param_groups`` as saved, ``param_names`` (the names of the state's integer indices, in index
  order) and ``state`` (per-parameter entries that are not tensors, by name).
- every other entry of the Lightning checkpoint dict as an object (``hyper_parameters``, ``loops``,
  ``callbacks``, ``lr_schedulers``, ``epoch``, ``global_step``, the data module's tokenizer).

``optimizer_entries`` / ``lightning_entries`` build this from a rank's own state, independent of any
strategy (``chunk_of`` says where a rank's piece lies); ``optimizer_state_from_entries`` /
``read_lightning_checkpoint`` turn it back into the ordinary formats: ``optimizer.state_dict()``'s
(integer indices, state viewed as the parameter's shape) and Lightning's checkpoint dict.

**Streaming.** ``iter_full_tensors`` assembles one full tensor at a time; the tools (``dsv3 convert``
and ``generate``, ``load_trained``) read only the ``state_dict.`` entries, so the optimizer state is
never read, and ``convert`` allocates each tensor file-backed (the kernel, not the process, holds it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from typing_extensions import override

from dsv3_lightning.sharded_checkpoint import (
    Chunk,
    _LoadPlanner,
    _old,
    is_sharded_checkpoint,
    read_metadata,
    read_objects,
    resolve,
)

STATE_DICT = "state_dict."
OPTIMIZER_STATES = "optimizer_states"

Allocate = Callable[[torch.Size, torch.dtype], torch.Tensor]


def state_prefix(index: int) -> str:
    """The keys' prefix of optimizer ``index``'s per-parameter state: ``optimizer_states.<index>.state.``."""
    return f"{OPTIMIZER_STATES}.{index}.state."


def tensor_entries(path: str | Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor entry of a checkpoint with its global size and dtype (``.size``,
    ``.properties.dtype``), read from its metadata alone (for a strategy building its load templates)."""
    metadata = read_metadata(resolve(path))
    return {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


def iter_full_tensors(path: str | Path, prefix: str = "", allocate: Allocate | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key without prefix, full tensor)`` for each tensor entry whose key starts with ``prefix``, one
    at a time, in this process (no process group): each is assembled into ``allocate(shape, dtype)``
    (default ``torch.empty``) from its saved chunks, which DCP reads one at a time, so the process
    holds one tensor being assembled plus one saved chunk, and nothing outside ``prefix`` is read."""
    root = resolve(path)
    metadata = read_metadata(root)
    reader = FileSystemReader(root)
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not isinstance(md, TensorStorageMetadata):
            continue
        tensor = allocate(md.size, md.properties.dtype)
        planner = _LoadPlanner()  # DCP's own resharding, with the whole tensor as the one target chunk
        planner.set_up_planner({key: tensor}, metadata, is_coordinator=True)
        plan = reader.prepare_global_plan([reader.prepare_local_plan(planner.create_local_plan())])[0]
        reader.read_data(planner.finish_plan(plan), planner).wait()
        yield key[len(prefix):], tensor


# ---------------------------------------------------------------------------- optimizer state
ChunkOf = Callable[[torch.nn.Parameter, str, torch.Tensor], "torch.Tensor | Chunk"]


def _replicated(param: torch.nn.Parameter, name: str, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1)


def optimizer_entries(
    index: int,
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    names: Mapping[torch.nn.Parameter, str],
    chunk_of: ChunkOf = _replicated,
) -> tuple[dict[str, torch.Tensor | Chunk], dict[str, Any]]:
    """Optimizer ``index``'s ``state_dict`` (this rank's ``optimizer.state_dict()``) in the layout:
    (tensor entries, the object part). ``names`` names the optimizer's parameters (the module's
    ``named_parameters`` names); ``chunk_of(param, name, value)`` returns this rank's per-parameter
    tensor ``value`` as a 1-D block of the flattened global tensor: the default, for a rank holding the
    whole parameter, is the replicated ``value.reshape(-1)``; a rank holding expert rows returns
    ``Chunk.rows(value, E, offset).flattened()``, a ZeRO-1 rank ``Chunk(value, (numel,), (start,))``.
    Used for load templates, each returned tensor must be a view of the one to fill."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    param_names = [names[p] for p in params]
    tensors: dict[str, torch.Tensor | Chunk] = {}
    others: dict[str, dict[str, Any]] = {}
    for i, entry in state_dict["state"].items():
        param, name = params[i], param_names[i]
        for key, value in entry.items():
            if "." in key:
                raise NotImplementedError(f"optimizer state key {key!r} of {name} holds a dot; the layout "
                                          "takes the name before the last dot as the parameter's")
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{state_prefix(index)}{name}.{key}"] = chunk_of(param, name, value)
            elif torch.is_tensor(value):
                tensors[f"{state_prefix(index)}{name}.{key}"] = value
            else:
                others.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "param_names": param_names, "state": others}


def entries_by_parameter(index: int, entries: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Optimizer ``index``'s entries of the layout (tensors, or the checkpoint's metadata of them) by
    parameter name: ``{name: {state key: value}}``; entries of other optimizers and the model are left out."""
    prefix = state_prefix(index)
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in entries.items():
        if key.startswith(prefix):
            name, state_key = key[len(prefix):].rsplit(".", 1)
            by_name.setdefault(name, {})[state_key] = value
    return by_name


def optimizer_state_from_entries(
    index: int,
    tensors: Mapping[str, torch.Tensor],
    objects: Mapping[str, Any],
    shapes: Mapping[str, torch.Size],
) -> dict[str, Any]:
    """``optimizer.state_dict()`` of optimizer ``index`` from the layout: ``tensors`` the entries (full,
    or this rank's local values), ``objects`` its object part, ``shapes`` the shape to view each
    parameter's flattened entries as (the full parameter's, or this rank's local piece's)."""
    prefix = state_prefix(index)
    by_name = entries_by_parameter(index, tensors)
    state = {}
    for i, name in enumerate(objects["param_names"]):
        entry = {**objects["state"].get(name, {}), **by_name.pop(name, {})}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() == 1:
                if name not in shapes or shapes[name].numel() != value.numel():
                    raise ValueError(
                        f"{prefix}{name}.{key}: {value.numel()} elements, but the parameter {name} has shape "
                        f"{list(shapes[name]) if name in shapes else 'unknown (not in the state dict)'}"
                    )
                entry[key] = value.view(shapes[name])
        if entry:
            state[i] = entry
    if by_name:
        raise ValueError(f"{prefix}: state of parameters the optimizer does not name: {sorted(by_name)[:3]}")
    return {"state": state, "param_groups": objects["param_groups"]}


# ---------------------------------------------------------------------------- Lightning dict
def lightning_entries(
    checkpoint: Mapping[str, Any], optimizers: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]] = ()
) -> dict[str, Any]:
    """The flat state ``save`` takes for a Lightning checkpoint dict whose ``state_dict`` holds this
    rank's tensors and Chunks; ``optimizers`` is ``optimizer_entries``' result per optimizer, and
    replaces the dict's own ``optimizer_states``."""
    state: dict[str, Any] = {k: v for k, v in checkpoint.items() if k not in ("state_dict", OPTIMIZER_STATES)}
    state.update({STATE_DICT + name: value for name, value in checkpoint["state_dict"].items()})
    for tensors, _ in optimizers:
        state.update(tensors)
    if optimizers or OPTIMIZER_STATES in checkpoint:
        state[OPTIMIZER_STATES] = [dict(objects) for _, objects in optimizers]
    return state


def read_lightning_checkpoint(
    path: str | Path,
    *,
    optimizer_states: bool = True,
    allocate: Allocate | None = None,
    weights_only: bool | None = False,
) -> dict[str, Any]:
    """The ordinary Lightning checkpoint dict of a sharded checkpoint, in this process: full tensors, and
    ``optimizer_states`` in ``optimizer.state_dict()``'s format (left out with ``optimizer_states=False``:
    then no optimizer tensor is read). ``weights_only`` applies to the objects (``read_objects``)."""
    objects = read_objects(path, weights_only=weights_only)
    sizes = tensor_entries(path)
    tensors = dict(iter_full_tensors(path, "" if optimizer_states else STATE_DICT, allocate))
    if not optimizer_states:
        tensors = {STATE_DICT + k: v for k, v in tensors.items()}
    checkpoint = {k: v for k, v in objects.items() if k != OPTIMIZER_STATES}
    model = {k.removeprefix(STATE_DICT): v for k, v in tensors.items() if k.startswith(STATE_DICT)}
    checkpoint["state_dict"] = model
    checkpoint.update({k: v for k, v in tensors.items()
                       if not k.startswith((STATE_DICT, OPTIMIZER_STATES + "."))})
    if optimizer_states and OPTIMIZER_STATES in objects:
        shapes = {k[len(STATE_DICT):]: md.size for k, md in sizes.items() if k.startswith(STATE_DICT)}
        parts = objects[OPTIMIZER_STATES]
        checkpoint[OPTIMIZER_STATES] = [optimizer_state_from_entries(i, tensors, part, shapes)
                                        for i, part in enumerate(parts)]
    return checkpoint


class ShardedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO that also reads a sharded checkpoint directory, as the ordinary
    full checkpoint dict: a single-process run resumes (``ckpt_path=``) from what a distributed run
    saved. Writing stays ``torch.save`` of one file: sharded saving is the strategies' (collective)."""

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if Path(path).is_dir() or is_sharded_checkpoint(path):  # a directory is never a torch.save file
            return read_lightning_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        path = Path(path)
        if path.is_dir() or _old(path).is_dir():
            for directory in (path, _old(path)):
                shutil.rmtree(directory, ignore_errors=True)
        else:
            super().remove_checkpoint(path)


__all__ = [
    "ShardedCheckpointIO",
    "entries_by_parameter",
    "iter_full_tensors",
    "lightning_entries",
    "optimizer_entries",
    "optimizer_state_from_entries",
    "read_lightning_checkpoint",
    "state_prefix",
    "tensor_entries",
]
