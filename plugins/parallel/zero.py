"""ZeRO-1: the optimizer state and float32 master weights sharded over data parallelism (SPEC.md §6.1).

Parameters come in shard groups (``ShardGroup``): lists of parameters whose gradient is the sum over
one process group divided by a divisor that need not be the group's size (DeepSeek-V3 layout:
replicated parameters summed over the E x D ranks of a stage block, expert shards over the D ranks of
their data group, both divided by E·D). For every (optimizer param group x shard group) the
parameters form one flat layout cut into one contiguous range per rank of the group (zero_layout.py);
a rank keeps the optimizer state and the float32 master weights of its range only. The user's
optimizer is kept and re-pointed at the master shards (one flat float32 Parameter per layout), so LR
schedulers, ``zero_grad`` and hyper-parameters of its param groups work unchanged, and
``optimizer.step()`` steps this rank's ranges only. One step:

    zero.reduce_scatter_gradients()        # model .grad -> master .grad (float32), model .grad freed
    norm = zero.clip_grad_norm_(max_norm, group)  # or local_squared_norm / all-reduce / scale_gradients
    optimizer.step()                       # the user's optimizer, on the master shards
    zero.all_gather_parameters()           # master shards -> model parameters, in their dtype
    optimizer.zero_grad()                  # frees the master gradients

Dtypes: model parameters keep their dtype (float32 or bfloat16) and their storage; they are only
written by ``all_gather_parameters``. Gradients are reduced in float32 whatever the parameter's
dtype; master weights are float32 (for a float32 model a second copy of the owned range). The
optimizer state is whatever the optimizer makes of a float32 parameter: AdamW 8 bytes per element,
AdamWBF16 4. Memory per rank per parameter of a group of G ranks: the model's weight and (until the
reduction) gradient in full, plus 4/G master + 8/G (AdamW) or 4/G (AdamWBF16) state + 4/G master
gradient between the reduction and ``zero_grad``, plus two buckets of staging.

A parameter whose gradient is None on every rank of its group is not updated, as a single process's
optimizer would skip it: the reduction also sums a has-gradient flag per parameter, a shard with no
such parameter gets ``grad = None`` (the optimizer skips it), and otherwise the master values and the
per-element state of those parameters' elements are copied before the step and put back after it (an
optimizer post-step hook). Not mirrored: the step count is one per layout, so a parameter that had no
gradient at some steps and gets one later is bias-corrected with its shard's count, not its own; the
state a first step creates for such elements is the optimizer's from a zero gradient (zeros for AdamW).

Buckets (``bucket_bytes``, default 50 MB): a bucket stages G columns of the flat layout, and each rank
sends or receives 1/G of it, so it is larger than DDP's 25 MB all-reduce bucket: at G = 64 a rank's
piece is still 0.8 MB, past the latency-bound sizes of NCCL, while two buckets in flight are small
beside the state. Not supported: gradient accumulation inside this module (accumulate in the model's
``.grad`` before the reduction), overlap of the reduction with the backward, CPU offload. Unlike
DeepSeek (and Megatron's distributed optimizer) the model's gradients are not one flat buffer the
reduce-scatter writes in place: they are staged by bucket, and freed after staging.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.parallel.zero_layout import FlatShard
from torch import nn


@dataclass(frozen=True, kw_only=True, eq=False)
class ShardGroup:
    """Parameters whose gradient is ``Σ over group / divisor``, sharded over ``group``."""

    label: str
    """Named in messages: "replicated", "experts"."""
    params: Sequence[tuple[str, nn.Parameter]]
    """(name, parameter); the names key the checkpoint chunks, unique over all shard groups."""
    group: dist.ProcessGroup
    """The ranks that reduce these gradients and share their optimizer state."""
    divisor: float
    """The gradient is the group's sum divided by this (E·D for both of DeepSeek-V3's groups)."""

    def __post_init__(self) -> None:
        if not self.divisor > 0:
            raise ValueError(f"ShardGroup {self.label!r}: divisor ({self.divisor}) must be > 0")


class Chunk(NamedTuple):
    """This rank's contiguous range of a parameter's flattened 1-D tensor, in global coordinates."""

    values: torch.Tensor
    global_numel: int
    global_offset: int


class Range(NamedTuple):
    global_offset: int
    numel: int
    global_numel: int


@dataclass(frozen=True, kw_only=True)
class ZeroMemory:
    """Bytes on this rank (the planner's ``Memory`` counts masters in ``optimizer_state``)."""

    master_weights: int
    optimizer_state: int
    """The optimizer's state of the master shards (moments, step counters)."""
    master_gradients: int
    """Held from the reduction to ``zero_grad``."""
    reduction_buffers: int
    """Two buckets in flight, the largest layout's."""


MASTER = "master_weight"
"""The chunk key of master weights (``state_chunks(include_master=True)``)."""


class Zero1:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        shard_groups: Sequence[ShardGroup],
        *,
        bucket_bytes: int = 50 * 2**20,
        global_ranges: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        """``global_ranges``: name -> (offset of the flattened local tensor in the flattened global
        tensor, global numel), for expert shards (rows offset..offset+L of [E, ...]); default (0, numel)."""
        if bucket_bytes < 4:
            raise ValueError(f"zero1: bucket_bytes ({bucket_bytes}) must be at least one float32 (4)")
        self.optimizer, self.bucket_bytes = optimizer, bucket_bytes
        where: dict[int, tuple[int, str]] = {}
        for k, sg in enumerate(shard_groups):
            for name, p in sg.params:
                if id(p) in where:
                    raise ValueError(f"zero1: parameter {name!r} is in two shard groups (or twice)")
                where[id(p)] = (k, name)
        names = [name for _, name in where.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"zero1: parameter names must be unique over the shard groups: {sorted(names)}")
        if optimizer.state:
            warnings.warn("zero1: the optimizer's existing state is discarded (load_state_chunks loads it)")
        masters: list[list[FlatShard]] = [[] for _ in optimizer.param_groups]
        placed = set()
        for g, param_group in enumerate(optimizer.param_groups):
            members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in shard_groups]
            for p in param_group["params"]:
                if id(p) not in where:
                    raise ValueError(
                        f"zero1: a parameter of optimizer.param_groups[{g}] (shape {tuple(p.shape)}) is in "
                        "no shard group; give every parameter the optimizer steps to one"
                    )
                k, name = where[id(p)]
                members[k].append((name, p))
                placed.add(id(p))
            for k, params in enumerate(members):
                if params:
                    label = f"param group {g} x shard group {shard_groups[k].label!r}"
                    sg = shard_groups[k]
                    masters[g].append(FlatShard(params, sg.group, sg.divisor, label))
        left = [name for sg in shard_groups for name, p in sg.params if id(p) not in placed]
        if left:
            warnings.warn(f"zero1: {len(left)} parameters of the shard groups are not optimized: {left}")
        self.layouts = [fs for group in masters for fs in group]
        assert self.layouts, "torch optimizers refuse an empty parameter list"
        self.global_ranges = {n: (0, p.numel()) for fs in self.layouts for n, p in zip(fs.names, fs.params)}
        for name, (offset, numel) in (global_ranges or {}).items():
            local = self.global_ranges.get(name, (0, 0))[1]
            if name not in self.global_ranges or offset < 0 or offset + local > numel:
                raise ValueError(
                    f"zero1: global_ranges[{name!r}] = ({offset}, {numel}) does not hold the local "
                    f"tensor of {local} elements (or names no sharded parameter)"
                )
            self.global_ranges[name] = (offset, numel)
        for param_group, shards in zip(optimizer.param_groups, masters):  # validated: now re-point it
            param_group["params"] = [fs.master for fs in shards]
        optimizer.state = defaultdict(dict)
        self._held: list[tuple[FlatShard, list]] = []
        self._hook = optimizer.register_step_post_hook(lambda *_: self._put_back())

    # -- one step --------------------------------------------------------------------------------

    def reduce_scatter_gradients(self) -> None:
        """Collective over every shard group's process group, in construction order."""
        self._held = []
        for fs in self.layouts:
            fs.reduce_scatter(self.bucket_bytes)
            if fs.master.grad is not None and not all(fs.has_grad):
                self._held.append((fs, fs.hold_skipped(self.optimizer.state[fs.master])))

    def _put_back(self) -> None:
        for fs, held in self._held:
            fs.put_back(held, self.optimizer.state[fs.master])
        self._held = []

    def local_squared_norm(self, counted: Callable[[str], bool] | None = None) -> torch.Tensor:
        """Σ g² over this rank's owned gradient elements (float64, on the device), of the parameters
        ``counted(name)`` selects (all by default). Summed over ranks that partition the model it is
        the squared global norm."""
        total = torch.zeros((), dtype=torch.float64, device=self.layouts[0].device)
        for fs in self.layouts:
            g = fs.master.grad
            if g is None:
                continue
            spans = [(0, fs.owned_numel)]
            if counted is not None:
                spans = [(at, at + hi - lo) for _, lo, hi, at in fs.name_filter(counted)]
            for a, b in spans:
                total += torch.linalg.vector_norm(g[a:b], dtype=torch.float64).square().to(total.device)
        return total

    @torch.no_grad()
    def scale_gradients(self, scale: float | torch.Tensor) -> None:
        for fs in self.layouts:
            if fs.master.grad is not None:
                fs.master.grad.mul_(scale.to(fs.device) if torch.is_tensor(scale) else scale)

    def clip_grad_norm_(
        self, max_norm: float, group: dist.ProcessGroup | None, counted: Callable[[str], bool] | None = None
    ) -> torch.Tensor:
        """The global norm (float64 tensor; ``group``: the ranks that partition the model, None for the
        world), and gradients scaled by min(1, max_norm / (norm + 1e-6)), torch's clip_grad_norm_ rule,
        without a host sync."""
        squared = self.local_squared_norm(counted)
        dist.all_reduce(squared, group=group)
        norm = squared.sqrt()
        self.scale_gradients((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def all_gather_parameters(self) -> None:
        """Collective over every shard group's process group, in construction order."""
        for fs in self.layouts:
            fs.all_gather(self.bucket_bytes)

    def free_gradients(self) -> None:
        """Drops the master gradients once the step has used them (Lightning's ``zero_grad`` comes only
        before the next step's backward: under a pipeline, after the next schedule's activations)."""
        for fs in self.layouts:
            fs.master.grad = None

    # -- checkpoints -----------------------------------------------------------------------------

    def owned_ranges(self) -> dict[str, Range]:
        """The ranges of each parameter's flattened global tensor this rank owns (one per parameter:
        a rank's range of a layout is contiguous), the ranges ``load_state_chunks`` needs."""
        ranges = {}
        for fs in self.layouts:
            for i, lo, hi, _ in fs.owned:
                offset, numel = self.global_ranges[fs.names[i]]
                ranges[fs.names[i]] = Range(offset + lo, hi - lo, numel)
        return ranges

    def state_chunks(self, *, include_master: bool | None = None) -> dict[str, dict[str, Chunk | object]]:
        """{name: {key: Chunk | scalar}}: per-element state as this rank's range (views of the live
        state: copy them before the next step), scalar state (``step``) as is, one per layout, so
        every parameter of a rank's shard carries the same count. Master weights equal the model's
        float32 parameters, which a checkpoint saves anyway; ``include_master`` (default: where the
        model parameter is not float32, e.g. bf16) adds them under ``MASTER``."""
        chunks: dict[str, dict[str, Chunk | object]] = {}
        for fs in self.layouts:
            state = self.optimizer.state.get(fs.master, {})
            for i, lo, hi, at in fs.owned:
                offset, numel = self.global_ranges[fs.names[i]]
                entry: dict[str, Chunk | object] = {}
                for key, value in state.items():
                    if fs.is_per_element(value):
                        entry[key] = Chunk(value[at : at + hi - lo], numel, offset + lo)
                    else:
                        entry[key] = value.clone() if torch.is_tensor(value) else value
                keep = fs.params[i].dtype != torch.float32 if include_master is None else include_master
                if keep:
                    entry[MASTER] = Chunk(fs.master.detach()[at : at + hi - lo], numel, offset + lo)
                if entry:
                    chunks[fs.names[i]] = entry
        return chunks

    @torch.no_grad()
    def load_state_chunks(self, chunks: Mapping[str, Mapping[str, object]]) -> None:
        """The inverse of ``state_chunks`` for this rank's ``owned_ranges()``, whatever layout saved
        them: per-element entries are 1-D tensors (or Chunks) of the owned range's length. Master
        weights are first refreshed from the model parameters (load those first), then overwritten by
        ``MASTER`` entries. A layout's scalar state is the largest of its parameters' (they agree
        unless a parameter skipped steps). A layout whose parameters have no entries keeps no state."""
        self.refresh_master_weights()
        for fs in self.layouts:
            names = [fs.names[i] for i, *_ in fs.owned]
            given = [n for n in names if n in chunks]
            if not given:
                self.optimizer.state.pop(fs.master, None)
                continue
            if len(given) != len(names):
                missing = sorted(set(names) - set(given))
                raise ValueError(f"zero1: the chunks of {fs.label} lack parameters {missing} this rank owns")
            keys = set(chunks[given[0]])
            state: dict[str, object] = {}
            for i, lo, hi, at in fs.owned:
                entry = chunks[fs.names[i]]
                if set(entry) != keys:
                    raise ValueError(
                        f"zero1: chunks of {fs.names[i]!r} have keys {sorted(entry)}, "
                        f"those of {given[0]!r} {sorted(keys)}"
                    )
                for key, value in entry.items():
                    values = value.values if isinstance(value, Chunk) else value
                    if torch.is_tensor(values) and values.dim() == 1:
                        if values.numel() != hi - lo:
                            raise ValueError(
                                f"zero1: chunk {fs.names[i]!r}[{key!r}] has {values.numel()} elements; "
                                f"this rank owns {hi - lo} (see owned_ranges())"
                            )
                        target = fs.master.data if key == MASTER else state.get(key)
                        if target is None:
                            target = state[key] = torch.zeros_like(fs.master, dtype=values.dtype)
                        target[at : at + hi - lo].copy_(values)
                    elif key not in state or float(values) > float(state[key]):
                        state[key] = values.clone() if torch.is_tensor(values) else values
            self.optimizer.state[fs.master] = state

    def refresh_master_weights(self) -> None:
        """Master shards ← the model parameters' values (after loading a model checkpoint)."""
        for fs in self.layouts:
            fs.refresh_master()

    # -- memory ----------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state of this rank's shards; before the first step, of the state it
        would create, found by stepping a copy of the optimizer on meta tensors (nothing allocated, so
        it answers for a meta model too)."""
        optimizer = self.optimizer
        if not all(optimizer.state.get(fs.master) for fs in self.layouts):
            optimizer = copy.copy(self.optimizer)
            optimizer._optimizer_step_pre_hooks = OrderedDict()  # without the original's hooks (put_back)
            optimizer._optimizer_step_post_hooks = OrderedDict()
            optimizer.state = defaultdict(dict)
            optimizer.param_groups = []
            for group in self.optimizer.param_groups:
                metas = [nn.Parameter(torch.empty_like(p, device="meta")) for p in group["params"]]
                for p in metas:
                    p.grad = torch.empty_like(p)
                pure = {k: False for k in ("foreach", "fused", "capturable") if k in group}  # runs on meta
                optimizer.param_groups.append({**group, **pure, "params": metas})
            optimizer.step()
        tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def memory(self) -> ZeroMemory:
        numel = sum(fs.shard_numel for fs in self.layouts)
        staged = max(fs.bucket_numel(self.bucket_bytes) for fs in self.layouts)
        return ZeroMemory(
            master_weights=4 * numel,
            optimizer_state=self.state_bytes(),
            master_gradients=4 * numel,
            reduction_buffers=2 * 4 * staged,
        )
