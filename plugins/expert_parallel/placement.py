"""Redundant experts: where each MoE layer's physical expert copies live, computed from observed loads.

DeepSeek-V3 serves with redundant experts (SPEC.md §8, inference): the most loaded experts get extra
copies on extra slots, and the copies are placed so that every GPU, and every node, receives about the
same number of tokens; the placement is recomputed from the observed loads every few minutes. Routing
does not change: a token still goes to the same *logical* experts, only which *physical* copy computes
it changes. This file is the placement, a pure function of the loads; ``replicas.py`` runs it.

Legend: L MoE layers, E logical experts per layer, S redundant (extra) slots, P = E + S physical slots,
R expert ranks, N nodes, G expert groups (the router's ``n_group``), X the most replicas of an expert.
Physical slot p lives on rank p // (P / R) (consecutive slots per rank, like the even layout), and rank
k on node k // (R / N).

The algorithm (DeepSeek's published EPLB, rewritten here; three steps per layer):

    1. groups -> nodes      pack the G groups' summed loads onto the N nodes, G / N groups each
                            (``balanced_packing``), so that each group lives on one node: group-limited
                            routing's bound (a token's experts on at most ``topk_group`` groups) is then a
                            node bound too, whatever node each group lands on
    2. replicas per node    give each node's S / N extra slots, one at a time, to the expert of that
                            node with the largest load per copy (``replicate_experts``); copies of an
                            expert stay on its group's node
    3. copies -> ranks      pack each node's P / N copies (load / copies each) onto its R / N ranks,
                            P / R each, heaviest first onto the lightest rank that has room, preferring
                            a rank without a copy of the same expert

With one node, or groups that do not tile the nodes (G % N != 0), it is one flat step 2 + 3 over all
ranks (EPLB's "global" policy). ``balanced_packing`` is the greedy longest-processing-time heuristic with
equal pack sizes: not optimal, but within a few percent of the mean on skewed loads (the README's table).

Differences from DeepSeek's EPLB: copies of one expert never exceed the ranks that can hold them (R, or
R / N per node) and step 3 avoids two copies of one expert on the same rank when it can (EPLB does
neither; a second copy on the same rank adds nothing); an impossible request (more extra slots than
distinct copies fit) is an error instead of a silent co-location. Ties break by the lower index, so the
result is deterministic.

The result is an ``ExpertPlacement``: ``physical_to_logical`` [L, P], ``logical_to_physical``
[L, E, X] (-1 padded) and ``replica_counts`` [L, E]. Any callable with ``place_experts``' signature can
replace it (``trainer.strategy.init_args.placement``); the strategy checks what it returns
(``ExpertPlacement.check``: every expert placed, the counts consistent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert each physical slot of each MoE layer holds (slot p on rank p // (P / R))."""

    physical_to_logical: torch.Tensor
    """[L, P] int64: the logical expert that physical slot p holds."""
    logical_to_physical: torch.Tensor
    """[L, E, X] int64: the physical slots of each logical expert, in slot order, padded with -1."""
    replica_counts: torch.Tensor
    """[L, E] int64: copies of each logical expert (>= 1; each layer's row sums to P)."""
    num_ranks: int
    """R: the expert ranks the slots are spread over."""

    @classmethod
    def from_physical_to_logical(
        cls, physical_to_logical: torch.Tensor, num_experts: int, num_ranks: int
    ) -> ExpertPlacement:
        """The placement that ``physical_to_logical`` [L, P] describes (the other two maps derived)."""
        phy2log = physical_to_logical.to(torch.int64)
        if phy2log.dim() != 2:
            raise ValueError(
                f"physical_to_logical must be [layers, physical slots], got shape {tuple(phy2log.shape)}"
            )
        counts = torch.zeros(phy2log.shape[0], num_experts, dtype=torch.int64)
        if phy2log.numel():
            counts.scatter_add_(1, phy2log.clamp(0, num_experts - 1), torch.ones_like(phy2log))
        width = max(int(counts.max()) if counts.numel() else 1, 1)
        log2phy = torch.full((phy2log.shape[0], num_experts, width), -1, dtype=torch.int64)
        for layer, row in enumerate(phy2log.tolist()):
            seen = [0] * num_experts
            for slot, expert in enumerate(row):
                if 0 <= expert < num_experts:
                    log2phy[layer, expert, seen[expert]] = slot
                    seen[expert] += 1
        return cls(phy2log, log2phy, counts, num_ranks)

    @classmethod
    def even(cls, num_layers: int, num_experts: int, num_ranks: int) -> ExpertPlacement:
        """Today's layout without redundant experts: expert e on rank e // (E / R), one copy each."""
        return cls.from_physical_to_logical(
            torch.arange(num_experts).repeat(num_layers, 1), num_experts, num_ranks
        )

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_experts(self) -> int:
        return self.replica_counts.shape[1]

    @property
    def num_physical_experts(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical_experts // self.num_ranks

    def rank_slots(self, rank: int) -> torch.Tensor:
        """[L, P / R]: the logical experts that ``rank``'s slots hold, in slot order."""
        n = self.slots_per_rank
        return self.physical_to_logical[:, rank * n : (rank + 1) * n]

    def check(self, num_layers: int, num_experts: int, what: str = "the placement") -> None:
        """A ``ValueError`` (prefixed by ``what``) unless this is a placement of ``num_layers`` layers of
        ``num_experts`` experts in which every expert has a copy and the three maps agree."""
        phy2log = self.physical_to_logical
        if phy2log.dim() != 2 or phy2log.shape[0] != num_layers:
            raise ValueError(
                f"{what} has physical_to_logical of shape {tuple(phy2log.shape)}; want [{num_layers}, P]"
            )
        if self.num_ranks < 1 or phy2log.shape[1] % self.num_ranks:
            raise ValueError(
                f"{what} has {phy2log.shape[1]} physical slots, not a multiple of {self.num_ranks} ranks"
            )
        bad = (phy2log < 0) | (phy2log >= num_experts)
        if bad.any():
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{what}: layer {layer}, slot {slot} holds expert {int(phy2log[layer, slot])}, not in 0..{num_experts - 1}"
            )
        derived = ExpertPlacement.from_physical_to_logical(phy2log, num_experts, self.num_ranks)
        missing = (derived.replica_counts == 0).nonzero()
        if len(missing):
            layer, expert = (int(i) for i in missing[0])
            raise ValueError(
                f"{what} drops expert {expert} of layer {layer} ({len(missing)} (layer, expert) pair(s) without a copy): "
                "every logical expert needs at least one physical slot"
            )
        if not torch.equal(self.replica_counts, derived.replica_counts):
            raise ValueError(f"{what}: replica_counts disagree with physical_to_logical")
        width = derived.logical_to_physical.shape[-1]
        if self.logical_to_physical.shape[-1] < width or not torch.equal(
            self.logical_to_physical[..., :width], derived.logical_to_physical
        ):
            raise ValueError(f"{what}: logical_to_physical disagrees with physical_to_logical")

    def slot_loads(self, load_LE: torch.Tensor) -> torch.Tensor:
        """[L, P]: the tokens each slot is predicted to get when each expert's load is split evenly over
        its copies (what the dispatcher's round-robin over replicas does, up to rounding)."""
        per_copy = load_LE.double() / self.replica_counts.double()
        return per_copy.gather(1, self.physical_to_logical)

    def rank_loads(self, load_LE: torch.Tensor) -> torch.Tensor:
        """[L, R]: predicted tokens per rank."""
        return self.slot_loads(load_LE).view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)


def imbalance(rank_loads_LR: torch.Tensor) -> torch.Tensor:
    """[L]: max / mean of the per-rank loads of each layer (1.0 is perfect balance)."""
    rank_loads_LR = rank_loads_LR.double()
    return rank_loads_LR.amax(-1) / rank_loads_LR.mean(-1).clamp_min(1e-12)


class PlacementFunction(Protocol):
    """The placement seam: ``place_experts``' signature, for ``trainer.strategy.init_args.placement``."""

    def __call__(
        self,
        load_LE: torch.Tensor,
        num_physical_experts: int,
        num_ranks: int,
        *,
        num_nodes: int = 1,
        num_groups: int = 1,
    ) -> ExpertPlacement: ...


# ------------------------------------------------------------------------------ the three steps
def balanced_packing(
    weight_XN: torch.Tensor, num_packs: int, labels_XN: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs each row's N items into ``num_packs`` packs of N / num_packs items, balancing the summed
    weights: heaviest item first, onto the lightest pack with room (ties: the lower pack); with
    ``labels``, a pack that already holds an item of the same label is avoided when another has room.
    Returns (pack, index within the pack), both [X, N] int64."""
    rows, n = weight_XN.shape
    assert n % num_packs == 0, "checked by place_experts"
    capacity = n // num_packs
    pack = torch.empty(rows, n, dtype=torch.int64)
    index = torch.empty(rows, n, dtype=torch.int64)
    for x in range(rows):
        weights = weight_XN[x].tolist()
        labels = labels_XN[x].tolist() if labels_XN is not None else None
        totals, sizes = [0.0] * num_packs, [0] * num_packs
        held: list[set] = [set() for _ in range(num_packs)]
        for item in sorted(range(n), key=lambda i: (-weights[i], i)):
            open_packs = [p for p in range(num_packs) if sizes[p] < capacity]
            if labels is not None:
                fresh = [p for p in open_packs if labels[item] not in held[p]]
                open_packs = fresh or open_packs
            best = min(open_packs, key=lambda p: (totals[p], p))
            pack[x, item], index[x, item] = best, sizes[best]
            totals[best] += weights[item]
            sizes[best] += 1
            if labels is not None:
                held[best].add(labels[item])
    return pack, index


def replicate_experts(
    weight_XN: torch.Tensor, num_physical: int, max_replicas: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gives each row's N experts ``num_physical`` copies in all: one each, then every extra copy to the
    expert with the largest load per copy (at most ``max_replicas`` copies each). Returns
    (physical -> expert [X, num_physical], copy index of each physical [X, num_physical], copies [X, N]);
    physical copies 0..N-1 are the experts themselves, the extras follow in the order they were given."""
    rows, n = weight_XN.shape
    assert num_physical >= n, "checked by place_experts"
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    replica = torch.zeros(rows, num_physical, dtype=torch.int64)
    counts = torch.ones(rows, n, dtype=torch.int64)
    arange = torch.arange(rows)
    weight = weight_XN.double()
    for p in range(n, num_physical):
        per_copy = weight / counts
        if max_replicas is not None:
            per_copy = per_copy.masked_fill(counts >= max_replicas, float("-inf"))
        best = per_copy.argmax(-1)  # the first of equal maxima: deterministic
        phy2log[:, p] = best
        replica[:, p] = counts[arange, best]
        counts[arange, best] += 1
    return phy2log, replica, counts


def _inverse(permutation_XN: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(permutation_XN)
    inverse.scatter_(1, permutation_XN, torch.arange(permutation_XN.shape[1]).expand_as(permutation_XN))
    return inverse


def place_experts(
    load_LE: torch.Tensor,
    num_physical_experts: int,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    num_groups: int = 1,
) -> ExpertPlacement:
    """The balanced placement of every layer's E experts onto ``num_physical_experts`` slots of
    ``num_ranks`` ranks (see the module docstring for the algorithm).

    Args:
        load_LE: Tokens routed to each (layer, expert), e.g. summed over the steps a run recorded;
            any non-negative numbers (only ratios matter).
        num_physical_experts: P = E + S slots per layer; a multiple of ``num_ranks``, at least E.
        num_ranks: R expert ranks; rank k holds slots k·P/R .. (k + 1)·P/R - 1.
        num_nodes: N nodes of R / N consecutive ranks each. With N > 1 and G % N == 0 the placement is
            hierarchical: each group's copies stay on one node.
        num_groups: G, the router's expert groups (``model.config.n_group``): group g is experts
            g·E/G .. (g + 1)·E/G - 1.

    Raises:
        ValueError: loads that are not [L, E] non-negative finite numbers, P not a multiple of R, P < E,
            or more extra slots than distinct copies fit (each rank at most one copy of an expert).
    """
    if load_LE.dim() != 2 or (
        not load_LE.is_floating_point() and load_LE.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"the expert loads must be a [layers, experts] tensor of numbers, got {load_LE.dtype} {tuple(load_LE.shape)}"
        )
    load_LE = load_LE.detach().double().cpu()
    if not torch.isfinite(load_LE).all() or (load_LE < 0).any():
        raise ValueError("the expert loads must be finite and non-negative")
    num_layers, num_experts = load_LE.shape
    P, R = num_physical_experts, num_ranks
    if R < 1 or P < num_experts or P % R:
        raise ValueError(
            f"{P} physical experts for {num_experts} experts over {R} ranks: the physical experts must be at least "
            f"the experts and a multiple of the ranks"
        )
    hierarchical = (
        num_nodes > 1 and num_groups % num_nodes == 0 and num_experts % num_groups == 0 and R % num_nodes == 0
    )
    nodes, groups = (num_nodes, num_groups) if hierarchical else (1, 1)
    ranks_per_node = R // nodes
    if P // R > num_experts // nodes:
        where = f"the {num_experts // nodes} experts of a node" if nodes > 1 else f"the {num_experts} experts"
        raise ValueError(
            f"{P} physical experts over {R} ranks is {P // R} slots per rank, more than {where}: a rank holds at most "
            f"one copy of an expert, so at most {num_experts // nodes * R - num_experts} extra slots fit"
        )
    group_size = num_experts // groups
    experts_per_node, slots_per_node = num_experts // nodes, P // nodes

    # step 1: groups -> nodes; "middle" ids number the experts node by node (node n: n·E/N ..)
    group_load_LG = load_LE.view(num_layers, groups, group_size).sum(-1)
    node_LG, index_LG = balanced_packing(group_load_LG, nodes)
    group_position_LG = node_LG * (groups // nodes) + index_LG
    log2mid_LE = (group_position_LG.unsqueeze(-1) * group_size + torch.arange(group_size)).flatten(1)
    mid2log_LE = _inverse(log2mid_LE)

    # step 2: each node's extra slots to its most loaded experts (per copy)
    mid_load_XM = load_LE.gather(1, mid2log_LE).view(num_layers * nodes, experts_per_node)
    phy2mid_XQ, _, mid_counts_XM = replicate_experts(mid_load_XM, slots_per_node, max_replicas=ranks_per_node)

    # step 3: each node's copies onto its ranks
    copy_load_XQ = (mid_load_XM / mid_counts_XM).gather(1, phy2mid_XQ)
    rank_XQ, index_XQ = balanced_packing(copy_load_XQ, ranks_per_node, labels_XN=phy2mid_XQ)
    slot_XQ = rank_XQ * (P // R) + index_XQ  # slot within the node
    node_phy2mid_XQ = torch.empty_like(phy2mid_XQ).scatter_(1, slot_XQ, phy2mid_XQ)
    node_offset = (torch.arange(nodes) * experts_per_node).repeat(num_layers).unsqueeze(-1)
    phy2mid_LP = (node_phy2mid_XQ + node_offset).view(num_layers, P)
    phy2log_LP = mid2log_LE.gather(1, phy2mid_LP)
    return ExpertPlacement.from_physical_to_logical(phy2log_LP, num_experts, R)


__all__ = [
    "ExpertPlacement",
    "PlacementFunction",
    "balanced_packing",
    "imbalance",
    "place_experts",
    "replicate_experts",
]
