"""AllToAllTokenDispatcher: the token-dispatch seam of ``MoE`` across an expert group.

Legend: T local tokens, K experts per token, D hidden, E routed experts (global), R ranks of the
expert group, L = E / R experts per rank, N = T·K local token copies, M copies received.

dispatch (expert ids are global; rank r hosts experts r·L .. r·L + L - 1):

    order_N          = stable argsort of the N expert ids   copies grouped by expert, hence by rank
    counts_RL        = copies per (destination rank, its local expert)
    recv_counts_RL   = all-to-all(counts_RL)                 row i: what rank i sends to my experts
    x_MD             = all-to-all(x[order // K], splits)     [from rank 0: expert 0..L-1][from rank 1 ...]
    regroup_M        = stable argsort of each received row's local expert
    x_MD[regroup_M], tokens_per_local_expert_L = recv_counts_RL.sum(0)   -> GroupedExperts

combine undoes each step: inverse regroup, the all-to-all back with the splits swapped, inverse
order, then the same gate-weighted sum over the K copies as ``LocalTokenDispatcher`` (one ``bmm``),
so that a single-process run and an expert-parallel run do the same arithmetic per token.

Both all-to-alls are differentiable (``all_to_all.py``). With ``fp8=True`` the dispatch sends
1x128-tile E4M3 values and their float32 scales (SPEC.md §6.3: DeepSeek-V3 dispatches in FP8 and
combines in BF16); the backward of that dispatch and the combine stay in the activations' dtype. The
copies of one token are sent once per expert, not once per rank (DeepSeek's kernels deduplicate
copies bound to the same node; this dispatcher does not, ``two_hop.py``'s does): bytes moved =
N·D·bytes, the benchmark's "minimum".

``ranks_per_node`` (optional) only feeds a counter: ``last_internode_bytes``, the bytes of the copies
sent to ranks of other nodes (rank e is on node e // ranks_per_node), which two_hop.py's dispatcher
reports for its inter-node hop, so that a benchmark can compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from dsv3_lightning.model.moe import gather_copies
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm, all_to_all, all_to_all_counts


@dataclass
class AllToAllPlan:
    """What combine needs to send each expert output back to its token."""

    order_N: torch.Tensor
    inverse_regroup_M: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


class AllToAllTokenDispatcher:
    """Sends token copies to the ranks of their experts and the outputs back (one MoE layer)."""

    def __init__(
        self,
        comm: Comm,
        num_experts: int,
        expert_parallel_size: int,
        *,
        fp8: bool = False,
        ranks_per_node: int | None = None,
    ) -> None:
        assert num_experts % expert_parallel_size == 0, "checked by the strategy"
        self.comm = comm
        self.num_experts = num_experts
        self.expert_parallel_size = expert_parallel_size
        self.num_local_experts = num_experts // expert_parallel_size
        self.fp8 = fp8
        self.ranks_per_node = ranks_per_node
        """Consecutive expert ranks per node, for ``last_internode_bytes`` only (None: one node)."""
        self.last_dispatch_bytes = self.last_combine_bytes = 0
        """Bytes of token copies this rank sent in the last dispatch / combine, its own share included
        (the benchmark's count; the count exchange, E·8 bytes, is left out)."""
        self.last_internode_rows = self.last_internode_bytes = 0
        """Rows (token copies) and their bytes that the last dispatch sent to ranks on other nodes."""
        self._expert_rank: int | None = None

    def _bytes_per_row(self, x_ND: torch.Tensor) -> int:
        if self.fp8:
            from dsv3_lightning.plugins.expert_parallel.fp8_dispatch import fp8_bytes_per_row

            return fp8_bytes_per_row(x_ND.shape[1])
        return x_ND.shape[1] * x_ND.element_size()

    def _count_internode(self, send_splits: list[int], bytes_per_row: int) -> None:
        r = self.ranks_per_node
        if r is None or r >= self.expert_parallel_size:
            self.last_internode_rows = 0
        else:
            if self._expert_rank is None:
                self._expert_rank = dist.get_rank(self.comm.group)
            node = self._expert_rank // r
            self.last_internode_rows = sum(n for rank, n in enumerate(send_splits) if rank // r != node)
        self.last_internode_bytes = self.last_internode_rows * bytes_per_row

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllPlan]:
        assert num_experts == self.num_local_experts, "the MoE layer's experts must be this rank's shard"
        R, L = self.expert_parallel_size, self.num_local_experts
        top_k = topk_ids_TK.shape[1]
        flat_ids = topk_ids_TK.flatten()
        order = flat_ids.argsort(stable=True)
        counts_E = torch.bincount(flat_ids, minlength=self.num_experts)
        recv_counts_RL = all_to_all_counts(counts_E, self.comm).view(R, L)
        send_splits = counts_E.view(R, L).sum(1).tolist()
        recv_splits = recv_counts_RL.sum(1).tolist()
        x_sent = gather_copies(x_TD, order, top_k)
        if self.fp8:  # the FP8 plugin is imported only by runs that ask for it
            from dsv3_lightning.plugins.expert_parallel.fp8_dispatch import fp8_all_to_all

            x_recv = fp8_all_to_all(x_sent, recv_splits, send_splits, self.comm)
        else:
            x_recv = all_to_all(x_sent, recv_splits, send_splits, self.comm, "dispatch all-to-all")
        self.last_dispatch_bytes = x_sent.shape[0] * self._bytes_per_row(x_sent)
        self._count_internode(send_splits, self._bytes_per_row(x_sent))
        local_ids = torch.arange(L, device=x_TD.device).repeat(R).repeat_interleave(recv_counts_RL.flatten())
        regroup = local_ids.argsort(stable=True)
        plan = AllToAllPlan(order, regroup.argsort(), send_splits, recv_splits, x_TD.shape[0])
        return x_recv[regroup], recv_counts_RL.sum(0), plan

    def combine(self, y_MD: torch.Tensor, topk_weights_TK: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        y_by_source = y_MD[plan.inverse_regroup_M]
        y_sorted = all_to_all(y_by_source, plan.send_splits, plan.recv_splits, self.comm, "combine all-to-all")
        self.last_combine_bytes = y_by_source.numel() * y_by_source.element_size()
        top_k = topk_weights_TK.shape[1]  # not -1 in the view: a rank may have no tokens
        y_NKD = y_sorted[plan.order_N.argsort()].view(plan.num_tokens, top_k, y_MD.shape[-1])
        weights = topk_weights_TK.to(y_MD.dtype).unsqueeze(1)  # [T, 1, K]
        return torch.bmm(weights, y_NKD).squeeze(1)
