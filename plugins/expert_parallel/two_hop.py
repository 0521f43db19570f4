"""NodeDedupTokenDispatcher: DeepSeek-V3's two-hop dispatch, a token sent at most once to each node.

Legend: T local tokens, K experts per token, D hidden, R ranks of the expert group, r = ranks per
node, G = R / r nodes, L experts per rank. Expert rank e is on node e // r with local index e % r and
hosts experts e·L .. e·L + L - 1, so node g hosts the r·L experts g·r·L .. (g+1)·r·L - 1.

Two process groups per expert group (built once by the mesh, ``ParallelMesh.node_groups``):
*inter*, the G ranks with this rank's local index, one per node, in node order (InfiniBand on
DeepSeek's cluster); *intra*, the r ranks of this rank's node (NVLink).

dispatch (the one-hop dispatcher, dispatcher.py, sends each of the T·K copies on its own):

    hop 1   on_node_TG   = which nodes host one of token t's experts
            rows S1      = (g, t) for each such pair, node-major             once per (token, node)
            x_M1D        = all-to-all over inter of x[t] for the rows         to local index e % r on node g
                           (with the token's K expert ids, -1 where not on g)
    hop 2   on_rank_M1r  = which ranks of this node host one of the row's experts
            rows S2      = (j, m) for each such pair, local-rank-major        once per (row, rank)
            x_M2D        = all-to-all over intra of x_M1D[m]  (ids, -1 where not on rank j)
    local   the row's valid (m, k) slots sorted stably by local expert -> the copies, tokens per expert

combine is the reverse, with partial sums on the way back, as DeepSeek's combine kernels:

    w_M2K           = the gate weights along hops 1 and 2 (K values per row: the protocol hands them
                      to combine, not to dispatch, so they travel then; differentiable)
    partial_M2D     = Σ_k w_k y_k over the row's slots on this rank        (bmm, absent slots 0)
    partial_M1D     = Σ over the r ranks of the rows back from hop 2       (fixed order, zeros padded)
    out_TD          = Σ over the G nodes of the rows back from hop 1       (fixed order)

Exactness: the sum over a token's K expert outputs is grouped by rank, then node, so it differs from
the one-hop dispatcher's single bmm over K by float32 rounding only (tested to 1e-6 relative; 1.1e-7
seen). Each sum is a reduction over a padded dimension, and
every index write is a permutation (``gather_copies``, ``index_copy``), so runs are deterministic.
Both hops are the differentiable ``all_to_all`` of all_to_all.py, with its error handling; ids and
counts travel by ``exchange`` / ``all_to_all_counts``. Per dispatch: 6 collectives (counts, rows, ids
on each hop) against the one-hop's 2; per combine 4 (weights and partial sums on each hop).

``comm`` is the inter-node hop's ``Comm``: the (F;B) overlap (dualpipe/overlap.py) sets
``dispatcher.comm.overlap``, and the intra-node hop takes the same hook at every dispatch / combine,
so both hops' all-to-alls go through it.

FP8 (``fp8=True``): hop 1 sends 1x128-tile E4M3 values with float32 scales (fp8_dispatch.py) and the
receiver dequantizes; hop 2 moves the dequantized activations in their dtype (DeepSeek forwards the
FP8 bytes over NVLink too; re-quantizing here would cost a second pass on a CPU for no accuracy gain).

Counters (bytes of hidden-state rows; ids, weights and counts not included, ``last_metadata_bytes``):
``last_internode_rows`` / ``last_internode_bytes``, the hop-1 rows sent to other nodes (at most
distinct remote nodes per token); the one-hop dispatcher reports the same for its copies.

Differs from DeepSeek: no fused kernels (each hop is a plain all-to-all, ids in a separate message),
the receiver of hop 1 is a rank like any other (DeepSeek dedicates warps to forwarding), and the
ranks' placement on nodes is taken from ``ranks_per_node``, not from the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dsv3_lightning.model.moe import gather_copies
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, all_to_all, all_to_all_counts, exchange
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher

KEY = "trainer.strategy.init_args"


def check_ranks_per_node(expert_parallel_size: int, ranks_per_node: int) -> None:
    """Nodes must tile the expert group (r divides R), or hold whole expert groups (R divides r)."""
    r, R = ranks_per_node, expert_parallel_size
    if r < 1 or (R % r and r % R):
        raise ValueError(
            f"{KEY}.ranks_per_node ({r}) must divide {KEY}.expert_parallel_size ({R}) (an expert group "
            f"spans whole nodes) or be a multiple of it (expert groups inside one node): set ranks_per_node "
            f"to the GPUs of one node, or expert_parallel_size to a multiple of it"
        )


@dataclass
class TwoHopPlan:
    """Where each row went on both hops, so that combine can send the outputs back."""

    node_slots_S1: torch.Tensor
    """t·G + g for each hop-1 row sent (node-major)."""
    send1: list[int]
    recv1: list[int]
    rank_slots_S2: torch.Tensor
    """m·r + j for each hop-2 row sent (local-rank-major), m a received hop-1 row."""
    send2: list[int]
    recv2: list[int]
    copy_slots_N: torch.Tensor
    """m·K + k for each copy handed to the experts (grouped by local expert), m a received hop-2 row."""
    num_tokens: int
    num_rows1: int
    num_rows2: int


def _slots(mask_AB: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Indices a·B + b of the True entries of ``mask_AB``, b-major (then a), and the count per b."""
    b, a = mask_AB.t().nonzero(as_tuple=True)
    return a * mask_AB.shape[1] + b, mask_AB.sum(0).tolist()


class NodeDedupTokenDispatcher(AllToAllTokenDispatcher):
    """Sends each token once to every node hosting one of its experts, then once to each of those
    ranks inside the node (see the module docstring); outputs come back as partial sums."""

    def __init__(
        self,
        inter: Comm,
        intra: Comm,
        num_experts: int,
        expert_parallel_size: int,
        ranks_per_node: int,
        expert_rank: int,
        *,
        fp8: bool = False,
    ) -> None:
        check_ranks_per_node(expert_parallel_size, ranks_per_node)
        super().__init__(inter, num_experts, expert_parallel_size, fp8=fp8, ranks_per_node=ranks_per_node)
        self.intra_comm = intra
        self.num_nodes = expert_parallel_size // ranks_per_node
        self.expert_rank = expert_rank
        self.node, self.local_rank = divmod(expert_rank, ranks_per_node)
        self.last_intranode_bytes = self.last_metadata_bytes = 0
        """Bytes of the hop-2 rows this rank sent (its own share included), and of the ids sent on
        both hops in the last dispatch."""

    def _sync_overlap(self) -> None:
        self.intra_comm.overlap = self.comm.overlap  # the (F;B) hook is set on ``comm``

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, TwoHopPlan]:
        assert num_experts == self.num_local_experts, "the MoE layer's experts must be this rank's shard"
        self._sync_overlap()
        r, G, L = self.ranks_per_node, self.num_nodes, self.num_local_experts
        inter, intra = self.comm, self.intra_comm
        num_tokens, top_k = topk_ids_TK.shape
        device = topk_ids_TK.device

        # hop 1: once per (token, node), to the rank with this local index on that node
        node_TK = topk_ids_TK // (r * L)
        on_node_TG = torch.zeros(num_tokens, G, dtype=torch.bool, device=device).scatter_(1, node_TK, True)
        slots1, send1 = _slots(on_node_TG)
        token1, node1 = slots1 // G, slots1 % G
        ids1 = torch.where(node_TK[token1] == node1[:, None], topk_ids_TK[token1], -1)
        recv1 = all_to_all_counts(torch.tensor(send1, device=device), inter).tolist()
        x1_sent = gather_copies(x_TD, slots1, G)
        row_bytes = self._bytes_per_row(x1_sent)
        if self.fp8:
            from dsv3_lightning.plugins.expert_parallel.fp8_dispatch import fp8_all_to_all

            x1 = fp8_all_to_all(x1_sent, recv1, send1, inter)
        else:
            x1 = all_to_all(x1_sent, recv1, send1, inter, "inter-node dispatch all-to-all")
        ids1 = exchange(ids1, recv1, send1, inter, "inter-node dispatch all-to-all (expert ids)")

        # hop 2: once per (row, rank of this node hosting one of its experts)
        valid1 = ids1 >= 0
        rank_MK = torch.where(valid1, (ids1 - self.node * r * L) // L, r)  # r: a dummy column
        on_rank = torch.zeros(len(ids1), r + 1, dtype=torch.bool, device=device).scatter_(1, rank_MK, True)
        slots2, send2 = _slots(on_rank[:, :r].contiguous())
        row2, rank2 = slots2 // r, slots2 % r
        ids2 = torch.where(rank_MK[row2] == rank2[:, None], ids1[row2], -1)
        recv2 = all_to_all_counts(torch.tensor(send2, device=device), intra).tolist()
        x2_sent = gather_copies(x1, slots2, r)
        x2 = all_to_all(x2_sent, recv2, send2, intra, "intra-node dispatch all-to-all")
        ids2 = exchange(ids2, recv2, send2, intra, "intra-node dispatch all-to-all (expert ids)")

        # this rank's copies: the valid (row, k) slots grouped by local expert
        local_ids = (ids2 - self.expert_rank * L).flatten()
        valid = (ids2 >= 0).flatten().nonzero().squeeze(1)
        copy_slots = valid[local_ids[valid].argsort(stable=True)]
        tokens_per_expert = torch.bincount(local_ids[valid], minlength=L)

        self.last_dispatch_bytes = (len(slots1) + len(slots2)) * row_bytes
        self.last_intranode_bytes = x2_sent.shape[0] * x2_sent.shape[1] * x2_sent.element_size()
        self.last_internode_rows = len(slots1) - send1[self.node]
        self.last_internode_bytes = self.last_internode_rows * row_bytes
        self.last_metadata_bytes = (len(slots1) + len(slots2)) * top_k * ids2.element_size()
        plan = TwoHopPlan(
            slots1, send1, recv1, slots2, send2, recv2, copy_slots, num_tokens, len(ids1), len(ids2)
        )
        return gather_copies(x2, copy_slots, top_k), tokens_per_expert, plan

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor, plan: TwoHopPlan) -> torch.Tensor:
        self._sync_overlap()
        r, G = self.ranks_per_node, self.num_nodes
        inter, intra = self.comm, self.intra_comm
        hidden, top_k = y_ND.shape[-1], topk_weights_TK.shape[1]
        # the gate weights to the rows' ranks (K per row), the way the tokens went
        w = topk_weights_TK.to(y_ND.dtype)
        w1 = gather_copies(w, plan.node_slots_S1, G)
        w1 = all_to_all(w1, plan.recv1, plan.send1, inter, "inter-node combine weights")
        w2 = gather_copies(w1, plan.rank_slots_S2, r)
        w2 = all_to_all(w2, plan.recv2, plan.send2, intra, "intra-node combine weights")
        # per received hop-2 row: its slots' outputs (zero where the expert is elsewhere), weighted, summed
        slots_M2KD = y_ND.new_zeros(plan.num_rows2 * top_k, hidden).index_copy(0, plan.copy_slots_N, y_ND)
        partial2 = torch.bmm(w2.unsqueeze(1), slots_M2KD.view(plan.num_rows2, top_k, hidden)).squeeze(1)
        back2 = all_to_all(partial2, plan.send2, plan.recv2, intra, "intra-node combine all-to-all")
        partial1 = back2.new_zeros(plan.num_rows1 * r, hidden).index_copy(0, plan.rank_slots_S2, back2)
        partial1 = partial1.view(plan.num_rows1, r, hidden).sum(1)
        back1 = all_to_all(partial1, plan.send1, plan.recv1, inter, "inter-node combine all-to-all")
        out = back1.new_zeros(plan.num_tokens * G, hidden).index_copy(0, plan.node_slots_S1, back1)
        element = y_ND.element_size()
        self.last_combine_bytes = (partial2.shape[0] + partial1.shape[0]) * hidden * element
        return out.view(plan.num_tokens, G, hidden).sum(1)
