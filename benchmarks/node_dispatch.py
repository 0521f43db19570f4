"""Rows crossing node boundaries per token: one all-to-all against DeepSeek-V3's two hops (SPEC.md §8).

    python benchmarks/node_dispatch.py                       # 4 gloo processes as 2 nodes x 2 ranks
    python benchmarks/node_dispatch.py --tokens 4096 --experts 32 --top-k 8

Each of the 4 ranks (expert parallelism 4, ``ranks_per_node`` 2: ranks 0-1 are node 0, 2-3 node 1)
holds ``tokens`` tokens and runs one MoE layer of the tiny preset's shape (hidden 256, 16 experts,
top-4) forward, ``iters`` times after ``warmup``, with routing free or node-limited
(``max_nodes_per_token`` 1: every token's experts on one node, node_limited.py). Dispatchers: the
one-hop ``AllToAllTokenDispatcher`` (a token's K copies each sent to its expert's rank; the copies
for ranks of other nodes cross) and the two-hop ``NodeDedupTokenDispatcher`` (a token crosses once
to each other node hosting one of its experts), both built by ``ParallelMesh.dispatcher``.

Rows and bytes are the dispatchers' counters (``last_internode_rows`` / ``_bytes``: hidden-state
rows of float32 sent to ranks of other nodes, over all ranks, per token); the two-hop dispatch also
sends each row's K expert ids (int64) and, in combine, K gate weights, which the "metadata" column
counts per token across nodes on top. Combine sends back what dispatch sent (two hops: partial
sums). Times: the slowest rank's median per layer, forward only. On this 2-core CPU the 4 processes
share 2 cores and gloo's loopback is no InfiniBand, so times are noisy and say nothing about a
cluster; the row counts are exact. "out vs one hop": the layer's output, max relative difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.node_limited import apply_node_limit
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from processes import run_ranks

from dsv3_lightning import preset
from dsv3_lightning.model.transformer import DeepSeekV3

WORLD, RANKS_PER_NODE = 4, 2


class Timed:
    """Wraps a dispatcher; records seconds of each dispatch / combine / the experts, and the counters."""

    def __init__(self, inner, two_hop: bool) -> None:
        self.inner, self.two_hop = inner, two_hop
        self.times: dict[str, list[float]] = {"dispatch": [], "experts": [], "combine": []}
        self.rows: list[tuple[int, int]] = []

    def dispatch(self, x, ids, num_experts):
        start = time.perf_counter()
        out = self.inner.dispatch(x, ids, num_experts)
        self._experts_start = now = time.perf_counter()
        self.times["dispatch"].append(now - start)
        rows = self.inner.last_internode_rows
        meta = rows * ids.shape[1] * (8 + 4) if self.two_hop else 0  # K int64 ids + K float32 weights per row
        self.rows.append((rows, self.inner.last_internode_bytes, meta, len(x)))
        return out

    def combine(self, y, w, plan):
        start = time.perf_counter()
        self.times["experts"].append(start - self._experts_start)
        out = self.inner.combine(y, w, plan)
        self.times["combine"].append(time.perf_counter() - start)
        return out


def run_layer(mesh: ParallelMesh, config, args, two_hop: bool, max_nodes: int | None):
    torch.manual_seed(0)
    [layer] = DeepSeekV3(config).moe_layers()
    if max_nodes is not None:
        apply_node_limit([layer.gate], max_nodes, WORLD // RANKS_PER_NODE)
    timed: list[Timed] = []

    def make(name, num_experts):
        if two_hop:
            inner = mesh.dispatcher(name, num_experts, ranks_per_node=RANKS_PER_NODE)
        else:  # one hop, counting the copies that cross nodes
            comm = mesh.comm(mesh.expert_group, f"layer {name}")
            inner = AllToAllTokenDispatcher(comm, num_experts, WORLD, ranks_per_node=RANKS_PER_NODE)
        timed.append(Timed(inner, two_hop))
        return timed[-1]

    shard_experts(torch.nn.ModuleList([layer]), mesh.expert_rank, WORLD, make)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(mesh.expert_rank))
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                timed[0].times = {k: [] for k in timed[0].times}
                timed[0].rows = []
            out = layer(x)
    t = timed[0]
    stats = {k: statistics.median(v) for k, v in t.times.items()}
    rows, nbytes, meta, tokens = (sum(c) / len(c) for c in zip(*t.rows))
    return stats, (rows, nbytes, meta, tokens), out


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    mesh = ParallelMesh.create(1, WORLD, 300.0)
    config = preset(
        "tiny", vocab_size=64, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1, topk_group=1,
        num_hidden_layers=2, first_k_dense_replace=1,
    )
    results = []
    for max_nodes in (None, 1):
        one = run_layer(mesh, config, args, False, max_nodes)
        two = run_layer(mesh, config, args, True, max_nodes)
        diff = float((two[2] - one[2]).abs().max() / one[2].abs().max())
        results.append((max_nodes, one[:2], two[:2], diff))
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def table(gathered, args) -> str:
    lines = [
        (
            f"4 gloo ranks = 2 nodes x 2, {args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, "
            f"top-{args.top_k}, float32; per token = over all ranks' tokens"
        ),
        "",
        (
            "| routing | dispatch | inter-node rows/token | inter-node bytes/token | + metadata B/token | "
            "rows vs one hop | dispatch ms | expert ms | combine ms | out vs one hop |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (max_nodes, *_rest) in enumerate(gathered[0]):
        routing = "free" if max_nodes is None else f"max_nodes_per_token {max_nodes}"
        one_rows = sum(rank[i][1][1][0] for rank in gathered)
        for hop, name in ((1, "one hop"), (2, "two hops")):
            stats = [rank[i][hop][0] for rank in gathered]
            rows, nbytes, meta, tokens = (sum(rank[i][hop][1][j] for rank in gathered) for j in range(4))
            times = {k: max(s[k] for s in stats) * 1e3 for k in ("dispatch", "experts", "combine")}
            diff = "" if hop == 1 else f"{max(rank[i][3] for rank in gathered):.1e}"
            lines.append(
                f"| {routing} | {name} | {rows / tokens:.3f} | {nbytes / tokens:.0f} | {meta / tokens:.0f} | "
                f"{rows / max(one_rows, 1):.3f} | {times['dispatch']:.2f} | {times['experts']:.2f} | "
                f"{times['combine']:.2f} | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    print(table(run_ranks(worker, WORLD, args, timeout_s=900), args))


if __name__ == "__main__":
    main()
