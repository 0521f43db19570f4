"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP): each rank writes only what it holds,
and a load reshards onto whatever the loading ranks hold (other expert, pipeline or data-parallel
ranks, or one process).

**What a rank passes** is one flat mapping (``save(path, state)``): a value that is a ``Chunk`` or a
tensor is a tensor entry, stored by DCP; any other value is an object, pickled whole (a tensor inside
one, e.g. ModelCheckpoint's ``best_model_score``, travels with it). Keys are dotted names
(``state_dict.model.model.layers.1.mlp.experts.gate_up_proj``), one level: a module's own names
hold dots, so nesting would make the key of a tensor ambiguous. The Lightning layout on top of this
is in ``sharded_checkpoint_io``.

**Tensor entries.** A plain tensor is *replicated*: every rank that has the key holds the same full
value, and DCP's planner makes one of them write it (the rank with the fewest bytes so far, so the
replicated part is spread over the ranks). A ``Chunk`` is the rectangular block of a global tensor
that this rank holds: an MoE layer's rows of stacked experts ``[E, ...]`` (``Chunk.rows``), or a
range of a flattened ``[numel]`` tensor (ZeRO-1 optimizer state, ``Chunk.flattened``). Two ranks that
pass the same block (expert rows replicated over data parallelism) write it once. Chunks reach DCP
through its protocol for tensor-like objects (``__create_write_items__``, ``__create_chunk_list__``)
plus small planner overrides (a chunk's key resolves to its local tensor; DCP's meta-tensor set-up
would replace a chunk by None; chunks must cover each tensor, checked with its name); DCP's own
resharding then fills a loading rank's chunk, at any offsets, from whichever saved chunks overlap it.
No collective initialisation (ShardedTensor), no DTensor (it cannot place arbitrary offsets).

**Objects** are the same on every rank (Lightning's loops, callbacks, lr_schedulers,
hyper_parameters, epoch, global_step): rank 0 alone writes them, ``torch.save``'d into ``objects.pt``,
so ``read_objects`` (hyper-parameters for a tool that builds the model) opens no tensor. A strategy
whose ranks hold different objects (pipeline stages' param groups) merges them before the save.

**On disk**, a directory::

    .metadata          DCP's index: each key's global shape, dtype, saved chunks and where they lie
    __<rank>_0.distcp  what rank <rank> wrote: its chunks, and its share of the replicated tensors
    objects.pt         the objects (rank 0)

DCP writes ``.metadata`` last (as ``.metadata.tmp``, renamed once every rank has written), so a
directory with it is complete: ``is_sharded_checkpoint`` and every reader go by it.

**Atomic save.** Ranks write into the sibling ``.<name>.partial`` (removed first: the leftovers of a
killed save); after DCP's final collective rank 0 swaps it in::

    1. if PATH exists: remove PATH.old (garbage: PATH is complete), rename PATH -> PATH.old
    2. rename .PATH.partial -> PATH
    3. remove PATH.old

Killed before 1: PATH is the old checkpoint. Between 1 and 2: PATH is missing and PATH.old is the
complete old one; every reader here (``resolve``) then falls back to PATH.old, with a warning, and
the next save leaves PATH.old in place until step 2 (a missing PATH means it is the only copy).
After 2: PATH is the new one; a half-removed PATH.old is never read while PATH exists. A save that
fails (an exception on any rank) never reaches step 1: the previous checkpoint is untouched, and
the partial directory waits for the next save to remove it. A reader racing a save may fail and
retry; that is not a goal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
OBJECTS_FILE = "objects.pt"


@dataclasses.dataclass(frozen=True)
class Chunk:
    """This rank's block of a global tensor: ``global[offsets[d] : offsets[d] + local.shape[d]]``."""

    local: torch.Tensor
    global_shape: torch.Size
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", torch.Size(self.global_shape))
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        shape = tuple(self.local.shape)
        if len(self.offsets) != len(shape) or len(self.global_shape) != len(shape) or any(
            o < 0 or o + n > g for o, n, g in zip(self.offsets, shape, self.global_shape)
        ):
            raise ValueError(
                f"Chunk of shape {list(shape)} at offsets {list(self.offsets)} does not fit in the global "
                f"shape {list(self.global_shape)}"
            )

    @classmethod
    def rows(cls, local: torch.Tensor, num_rows: int, first_row: int) -> Chunk:
        """Rows ``first_row .. first_row + len(local)`` of a ``[num_rows, ...]`` tensor (stacked experts)."""
        return cls(local, torch.Size((num_rows, *local.shape[1:])), (first_row,) + (0,) * (local.dim() - 1))

    def flattened(self) -> Chunk:
        """The same block as a range of the flattened ``[numel]`` global tensor (the optimizer-state
        layout). Only whole rows are contiguous in the flattened order, so only row chunks qualify."""
        if self.local.dim() > 1 and (any(self.offsets[1:]) or self.local.shape[1:] != self.global_shape[1:]):
            raise ValueError(f"only a chunk of whole rows is a range of the flattened tensor, not {self}")
        if not self.local.is_contiguous():  # reshape would copy: a load would fill the copy
            raise ValueError(f"flattened() needs a contiguous local tensor (a load fills its view): {self}")
        row = math.prod(self.global_shape[1:])
        numel = self.global_shape.numel()
        return Chunk(self.local.view(-1), torch.Size((numel,)), (self.offsets[0] * row,))

    def __repr__(self) -> str:
        return f"Chunk({list(self.local.shape)} at {list(self.offsets)} of {list(self.global_shape)})"

    # ------------------------------------------------ DCP's protocol for tensor-like objects
    def size(self) -> torch.Size:  # DCP compares it with the checkpoint's global size
        return self.global_shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        offsets = torch.Size(self.offsets)
        data = TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=self.local.size()),
            properties=TensorProperties.create_from_tensor(self.local),
            size=self.global_shape,
        )
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.size())]


def _local(state: Mapping[str, Any], index: MetadataIndex) -> torch.Tensor | None:
    value = state.get(index.fqn)
    return value.local if isinstance(value, Chunk) else None


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner; a chunk's key resolves to its local tensor, and every tensor must be covered."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        local = _local(self.state_dict, index)
        return super().lookup_object(index) if local is None else local

    def create_global_plan(self, all_plans):
        volume: dict[str, list[int]] = {}
        seen = set()
        for plan in all_plans:
            for item in plan.items:
                if item.tensor_data is not None and item.index not in seen:
                    seen.add(item.index)
                    covered = volume.setdefault(item.index.fqn, [0, item.tensor_data.size.numel()])
                    covered[0] += item.tensor_data.chunk.sizes.numel()
        for key, (covered, total) in volume.items():
            if covered != total:
                raise ValueError(
                    f"{key}: the ranks' chunks hold {covered} of its {total} elements (or overlap); every "
                    "element of a tensor must be saved by exactly one block"
                )
        return super().create_global_plan(all_plans)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's planner; a chunk's key resolves to its local tensor."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        chunks = {k: v for k, v in state_dict.items() if isinstance(v, Chunk)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        self.state_dict.update(chunks)  # DCP's meta-tensor initialisation replaced them with None

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        local = _local(self.state_dict, index)
        return super().lookup_tensor(index) if local is None else local


# ----------------------------------------------------------------------------------- paths
def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory DCP finished writing (``.metadata``), at ``path`` or, after an interrupted swap, at
    its fallback ``path.old``."""
    path = Path(path)
    return (path / METADATA_FILE).is_file() or (not path.exists() and (_old(path) / METADATA_FILE).is_file())


def looks_sharded(path: str | Path) -> bool:
    """A sharded checkpoint, complete or not (to tell it from a Hugging Face directory, and to say what
    is wrong with it): ``is_sharded_checkpoint``, or a directory of DCP shard files."""
    path = Path(path)
    return is_sharded_checkpoint(path) or (
        path.is_dir() and ((path / OBJECTS_FILE).is_file() or any(path.glob("*.distcp")))
    )


def resolve(path: str | Path) -> Path:
    """The directory to read for ``path``: itself, or ``path.old`` while a swap was interrupted."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if path.exists():
        raise ValueError(
            f"{path}: not a complete checkpoint (no {METADATA_FILE}: its save did not finish); use an "
            "earlier checkpoint"
        )
    if (_old(path) / METADATA_FILE).is_file():
        log.warning("%s is missing: a save replacing it was interrupted; reading the previous one, %s",
                    path, _old(path))
        return _old(path)
    raise FileNotFoundError(f"{path}: no such checkpoint directory")


def read_metadata(root: Path) -> Metadata:
    """DCP's index of a resolved checkpoint directory, after checking every shard file it names exists."""
    metadata = FileSystemReader(root).read_metadata()
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    for name in files:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name}: missing shard file of the checkpoint {root} ({len(files)} shard files: "
                f"{', '.join(files)}); the checkpoint was copied incompletely"
            )
    return metadata


def read_objects(path: str | Path, *, weights_only: bool | None = False) -> dict[str, Any]:
    """The objects of a checkpoint; no tensor entry is read. ``weights_only`` is ``torch.load``'s (the
    objects hold the run's classes: its ``ModelConfig``, the heads)."""
    root = resolve(path)
    return torch.load(root / OBJECTS_FILE, map_location="cpu", weights_only=weights_only)


# ------------------------------------------------------------------------------- save, load
class _Ranks:
    """The ranks of ``process_group`` (default: world), or this process alone: without a process group,
    or with ``no_dist`` (one process of a distributed run reading or writing on its own)."""

    def __init__(self, process_group, no_dist: bool = False) -> None:
        self.group = process_group
        self.distributed = not no_dist and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self.distributed else 0

    def on_first(self, fn: Callable[..., None], *args) -> None:
        """``fn`` on rank 0, its error raised on every rank (a broadcast: the others wait for it)."""
        error = None
        if self.rank == 0:
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.distributed:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, group=self.group, group_src=0)
            if box[0] is not None and error is None:
                raise RuntimeError(f"sharded checkpoint: rank 0 failed: {box[0]}")
        if error is not None:
            raise error


@contextlib.contextmanager
def _dcp_call(ranks: _Ranks) -> Iterator[None]:
    """Around a DCP call: the first failing rank's own error instead of DCP's CheckpointException (a
    BaseException naming every rank's), and not DCP's warning that it assumes a single process, when
    that is the intent."""
    with warnings.catch_warnings():
        if not ranks.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except dcp.api.CheckpointException as err:
            raise _unwrap(err) from err


def _unwrap(err: BaseException) -> BaseException:
    """The first rank's own error out of DCP's CheckpointException (which names every rank's)."""
    failures = getattr(err, "failures", None)
    return min(failures.items())[1][0] if failures else err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _prepare(partial: Path, objects: dict[str, Any]) -> None:
    _remove(partial)  # a killed save's leftovers
    partial.mkdir(parents=True)
    with open(partial / OBJECTS_FILE, "wb") as f:
        torch.save(objects, f)
        f.flush()
        os.fsync(f.fileno())


def _swap(partial: Path, path: Path) -> None:
    """The three steps of the module docstring; each rename is atomic, so every moment leaves a
    complete checkpoint at PATH or, between the two renames, at PATH.old."""
    old = _old(path)
    if path.exists() or path.is_symlink():
        _remove(old)
        os.rename(path, old)
    os.rename(partial, path)
    _fsync_dir(path.parent)
    _remove(old)


def save(path: str | Path, state: Mapping[str, Any], *, process_group=None, no_dist: bool = False) -> None:
    """Collective over ``process_group``: each rank passes its own ``state`` (see the module docstring)."""
    path = Path(path)
    tensors = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, Chunk))}
    objects = {k: v for k, v in state.items() if k not in tensors}
    ranks = _Ranks(process_group, no_dist)
    partial = _partial(path)
    ranks.on_first(_prepare, partial, objects)
    with _dcp_call(ranks):
        dcp.save(tensors, storage_writer=FileSystemWriter(partial), planner=_SavePlanner(),
                 process_group=process_group, no_dist=not ranks.distributed)
    ranks.on_first(_swap, partial, path)


def _check_templates(root: Path, metadata: Metadata, state: Mapping[str, Any]) -> None:
    saved = metadata.state_dict_metadata
    for key, value in state.items():
        if not isinstance(value, (torch.Tensor, Chunk)):
            raise ValueError(f"load: {key} is a {type(value).__name__}; pass tensors or Chunks to fill "
                             "(load returns the objects)")
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(
                f"{key}: not in the checkpoint {root} ({len(saved)} entries); the checkpoint's model may be "
                "of another shape or config (model.config: num_hidden_layers, n_routed_experts, heads)"
            )
        shape = value.global_shape if isinstance(value, Chunk) else value.shape
        if md.size != shape:
            raise ValueError(
                f"{key}: the checkpoint {root} holds shape {list(md.size)}, the model {list(shape)}; resume "
                "with the model.config the checkpoint was saved with"
            )


class _CheckedLoadPlanner(_LoadPlanner):
    """Checks the templates inside DCP's planning step, whose errors DCP hands to every rank."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def create_local_plan(self):
        _check_templates(self.root, self.metadata, self.state_dict)
        return super().create_local_plan()


def load(
    path: str | Path, state: Mapping[str, Any], *, process_group=None, no_dist: bool = False
) -> dict[str, Any]:
    """Collective over ``process_group`` (or this process alone: no process group, or ``no_dist``):
    fills each rank's tensors and Chunks in place (cast to their dtype) from whichever saved chunks
    overlap them; returns the objects."""
    root = resolve(path)
    read_metadata(root)  # names a missing shard file
    ranks = _Ranks(process_group, no_dist)
    with _dcp_call(ranks):
        dcp.load(dict(state), storage_reader=FileSystemReader(root), planner=_CheckedLoadPlanner(root),
                 process_group=process_group, no_dist=not ranks.distributed)
    return torch.load(root / OBJECTS_FILE, map_location="cpu", weights_only=False)


__all__ = [
    "Chunk",
    "is_sharded_checkpoint",
    "load",
    "looks_sharded",
    "read_objects",
    "resolve",
    "save",
]
