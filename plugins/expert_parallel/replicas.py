"""Redundant experts at run time: moving each rank's physical expert copies in, and dispatching to them.

Legend: T local tokens, K experts per token, E logical experts, P = E + S physical slots, R expert
ranks, L = P / R slots per rank, N = T·K token copies.

The strategy loads and checkpoints experts in the even logical layout (rank k holds experts k·E/R ..);
for evaluation it switches every MoE layer to a placement (placement.py) and back:

    place      rank k's slots hold experts placement.rank_slots(k); ``move_rows`` fetches each slot's
               weights from the rank that holds that expert now (one uneven all-to-all per weight; no
               rank ever holds more than its shard plus its new slots), the layer's ``num_experts``
               becomes P / R, its dispatcher a ``ReplicaTokenDispatcher`` around the usual dispatcher
               built for P experts
    dispatch   each token copy keeps its logical expert; the n-th copy (in token order) of expert e on
               this rank goes to replica (n + rotation) % copies(e), i.e. slot logical_to_physical[e, ·],
               so the copies of one rank are spread evenly over the replicas and different ranks start
               at different replicas (rotation = the rank's replica index). Then the usual all-to-all
               (one hop, two hops, FP8: whatever ``make_dispatcher`` builds) treats slots as experts
    combine    unchanged: the K outputs of a token are weighted and summed in the same order, so results
               equal the plain run's up to the expert matmul's rounding (the README's 1e-6)
    restore    the reverse ``move_rows`` (from the first copy of each expert) and the saved dispatchers

Not supported: training with redundant experts (the copies of an expert would need their gradients
summed and their optimizer steps kept identical; the strategy refuses ``fit``), placement recomputed
during a run (DeepSeek re-places every few minutes of serving; here once per strategy, at its first
evaluation, from the recorded loads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, exchange
from dsv3_lightning.plugins.expert_parallel.placement import ExpertPlacement
from dsv3_lightning.plugins.expert_parallel.sharding import EXPERT_WEIGHTS, ExpertShard


class ReplicaTokenDispatcher:
    """Picks one physical copy for every token copy, then dispatches to slots with ``inner``.

    Args:
        inner: A dispatcher over P physical experts (``ParallelStrategy.make_dispatcher(name, P)``).
        logical_to_physical_EX, replica_counts_E: This layer's rows of the placement (the slots of each
            logical expert, -1 padded, and how many).
        rotation: Where this rank starts on each expert's replicas (its replica index).
    """

    def __init__(
        self, inner: Any, logical_to_physical_EX: torch.Tensor, replica_counts_E: torch.Tensor, rotation: int
    ) -> None:
        self.inner = inner
        self.logical_to_physical_EX = logical_to_physical_EX
        self.replica_counts_E = replica_counts_E
        self.rotation = rotation
        self.num_physical_experts = int(replica_counts_E.sum())
        self.tokens_per_slot_P = torch.zeros(self.num_physical_experts, dtype=torch.int64)
        """Token copies this rank sent to each physical slot since it was made (per-rank load logs); on
        the tokens' device after the first dispatch (no host sync per layer)."""

    def __getattr__(self, name: str) -> Any:  # the inner dispatcher's counters (last_dispatch_bytes ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def physical_ids(self, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """[T, K] physical slots: the n-th copy of expert e goes to replica (n + rotation) % copies(e)."""
        flat = topk_ids_TK.flatten()
        num_experts = self.replica_counts_E.shape[0]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        starts = counts.cumsum(0) - counts
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        replica = (nth + self.rotation) % self.replica_counts_E.to(flat.device)[flat]
        return self.logical_to_physical_EX.to(flat.device)[flat, replica].view_as(topk_ids_TK)

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int):
        physical_TK = self.physical_ids(topk_ids_TK)
        counts = torch.bincount(physical_TK.flatten(), minlength=self.num_physical_experts)
        self.tokens_per_slot_P = self.tokens_per_slot_P.to(counts.device) + counts
        return self.inner.dispatch(x_TD, physical_TK, num_experts)

    def combine(self, y_MD: torch.Tensor, topk_weights_TK: torch.Tensor, plan: Any) -> torch.Tensor:
        return self.inner.combine(y_MD, topk_weights_TK, plan)


def move_rows(
    local: torch.Tensor,
    held: Sequence[Sequence[int]],
    wanted: Sequence[Sequence[int]],
    rank: int,
    comm: Comm,
    what: str,
) -> torch.Tensor:
    """Rows ``wanted[rank]`` (expert ids) gathered from the ranks that hold them: ``held[k]`` lists the
    ids of rank k's rows in order (this rank's are ``local``). Each wanted row comes from the lowest rank
    that holds its id; one uneven all-to-all. Every rank passes the same ``held`` and ``wanted``."""
    holder: dict[int, tuple[int, int]] = {}
    for k, ids in enumerate(held):
        for row, expert in enumerate(ids):
            holder.setdefault(expert, (k, row))
    send_rows, send_splits = [], []
    for ids in wanted:  # what this rank sends to each rank, in that rank's slot order
        rows = [holder[e][1] for e in ids if holder[e][0] == rank]
        send_rows += rows
        send_splits.append(len(rows))
    sources = [holder[e][0] for e in wanted[rank]]
    recv_splits = [sources.count(k) for k in range(len(held))]
    flat = local.reshape(local.shape[0], -1)
    received = exchange(flat[send_rows], recv_splits, send_splits, comm, what)
    # received is grouped by source rank, each group in slot order: put each row at its slot
    slots = sorted(range(len(sources)), key=lambda j: (sources[j], j))
    out = torch.empty((len(sources), flat.shape[1]), dtype=local.dtype, device=local.device)
    out[slots] = received
    return out.view(len(sources), *local.shape[1:])


def _swap_weights(
    shard: ExpertShard, held: list[list[int]], wanted: list[list[int]], rank: int, comm: Comm
) -> None:
    experts = shard.experts
    for w in EXPERT_WEIGHTS:
        old = getattr(experts, w)
        new = move_rows(old.detach(), held, wanted, rank, comm, f"placement of {shard.name}.experts.{w}")
        setattr(experts, w, nn.Parameter(new, requires_grad=old.requires_grad))
    experts.num_experts = len(wanted[rank])


def even_rows(num_experts: int, num_ranks: int) -> list[list[int]]:
    """The logical layout's rows per rank: rank k holds experts k·E/R .. (k + 1)·E/R - 1."""
    n = num_experts // num_ranks
    return [list(range(k * n, (k + 1) * n)) for k in range(num_ranks)]


class PlacedExperts:
    """The MoE layers of one rank switched to a placement, until ``restore``.

    Args:
        shards: This rank's expert shards (the even logical layout), one per row of ``placement``.
        placement: The placement of those layers (checked by the caller).
        make_dispatcher: ``(layer name, P) -> dispatcher`` over P physical experts.
        rank, comm: This rank's index in the expert group, and the group.
        rotation: Where this rank starts on each expert's replicas.
    """

    def __init__(
        self,
        shards: Sequence[ExpertShard],
        placement: ExpertPlacement,
        make_dispatcher,
        rank: int,
        comm: Comm,
        rotation: int,
    ) -> None:
        self.shards, self.placement, self.rank, self.comm = list(shards), placement, rank, comm
        R = placement.num_ranks
        self._saved = []
        for layer, shard in enumerate(self.shards):
            held = even_rows(shard.num_experts, R)
            wanted = [placement.rank_slots(k)[layer].tolist() for k in range(R)]
            _swap_weights(shard, held, wanted, rank, comm)
            self._saved.append(shard.moe.dispatcher)
            shard.moe.dispatcher = ReplicaTokenDispatcher(
                make_dispatcher(shard.name, placement.num_physical_experts),
                placement.logical_to_physical[layer],
                placement.replica_counts[layer],
                rotation,
            )

    def dispatchers(self) -> list[ReplicaTokenDispatcher]:
        return [shard.moe.dispatcher for shard in self.shards]

    def restore(self) -> None:
        """The even logical layout and the original dispatchers back (collective)."""
        R = self.placement.num_ranks
        for layer, (shard, dispatcher) in enumerate(zip(self.shards, self._saved)):
            held = [self.placement.rank_slots(k)[layer].tolist() for k in range(R)]
            _swap_weights(shard, held, even_rows(shard.num_experts, R), self.rank, self.comm)
            shard.moe.dispatcher = dispatcher


def check_loads(loads: torch.Tensor, num_layers: int, num_experts: int, key: str, source: object) -> None:
    """A ``ValueError`` naming ``key`` unless ``loads`` (read from ``source``) is [num_layers, num_experts]."""
    if loads.dim() != 2 or loads.shape[0] != num_layers or loads.shape[1] != num_experts:
        raise ValueError(
            f"{key} ({source}) holds loads of shape {list(loads.shape)}, but this model has {num_layers} MoE layer(s) "
            f"(model.config.num_hidden_layers - first_k_dense_replace, plus MTP heads) of {num_experts} experts "
            f"(model.config.n_routed_experts): give the loads recorded by a run of this model shape"
        )


def checked_placement(
    placement_fn,
    loads_LE: torch.Tensor,
    num_physical_experts: int,
    num_ranks: int,
    *,
    num_nodes: int,
    num_groups: int,
    key: str,
) -> ExpertPlacement:
    """``placement_fn``'s placement of ``loads_LE``, or a ``ValueError`` naming ``key`` (the setting that
    chose the function) when it is not a placement of every expert on these slots and ranks."""
    num_layers, num_experts = loads_LE.shape
    placement = placement_fn(
        loads_LE, num_physical_experts, num_ranks, num_nodes=num_nodes, num_groups=num_groups
    )
    name = getattr(placement_fn, "__qualname__", type(placement_fn).__name__)
    what = f"{key} ({name})"
    fix = "fix the placement function or use the default (placement: null)"
    if not isinstance(placement, ExpertPlacement):
        raise ValueError(f"{what} returned {type(placement).__name__}, not an ExpertPlacement: {fix}")
    if placement.num_ranks != num_ranks or placement.num_physical_experts != num_physical_experts:
        raise ValueError(
            f"{what} placed {placement.num_physical_experts} physical experts on {placement.num_ranks} ranks; this run "
            f"has {num_physical_experts} (n_routed_experts + redundant_experts) on {num_ranks}: {fix}"
        )
    try:
        placement.check(num_layers, num_experts, what)
    except ValueError as err:
        raise ValueError(f"{err}; {fix}") from err
    return placement


def read_expert_loads(path: str | Path, key: str) -> torch.Tensor:
    """The [layers, experts] loads a run recorded, from ``path``: a checkpoint (ordinary file or sharded
    directory) whose ``ExpertLoadMonitor`` state holds the last steps' loads (summed here), or a torch
    file holding the tensor itself (or ``{"expert_load": tensor}``). ``key`` names the setting in errors."""
    from dsv3_lightning.sharded_checkpoint import looks_sharded, read_objects

    path = Path(path)
    if not path.is_file() and not looks_sharded(path):
        raise ValueError(
            f"{key} ({path}) does not exist: give a checkpoint of a run with ExpertLoadMonitor, or a torch file of a [layers, experts] tensor"
        )
    content = (
        read_objects(path)
        if looks_sharded(path)
        else torch.load(path, map_location="cpu", weights_only=False)
    )
    if isinstance(content, dict) and "expert_load" in content:
        content = content["expert_load"]
    if torch.is_tensor(content):
        return content.double()
    states = content.get("callbacks", {}) if isinstance(content, dict) else {}
    for name, state in states.items():
        if str(name).startswith("ExpertLoadMonitor") and isinstance(state, dict) and state.get("recent"):
            return torch.stack([t.double() for t in state["recent"]]).sum(0)
    raise ValueError(
        f"{key} ({path}) holds no expert loads: a checkpoint needs the ExpertLoadMonitor callback's state "
        "(add dsv3_lightning.plugins.load_balancing.ExpertLoadMonitor to trainer.callbacks when training), or save "
        "a [layers, experts] tensor with torch.save"
    )


__all__ = [
    "PlacedExperts",
    "ReplicaTokenDispatcher",
    "check_loads",
    "checked_placement",
    "even_rows",
    "move_rows",
    "read_expert_loads",
]
