"""Expert-parallel dispatch and combine against expert compute, per MoE layer (SPEC.md §8).

    python benchmarks/ep_dispatch.py                        # 2 and 4 gloo processes on CPU
    python benchmarks/ep_dispatch.py --world 2 --fp8        # FP8 dispatch
    python benchmarks/ep_dispatch.py --tokens 4096 --hidden 512 --experts 32 --top-k 6

On CUDA (one process per GPU, NCCL) when ``torch.cuda.device_count() >= world``, else gloo on CPU.
Each rank holds ``tokens`` tokens and runs ``layers`` MoE layers (the tiny preset's router, shared
expert and SwiGLU experts, experts split over the ranks by ``shard_experts``, the strategy's
dispatcher) forward, ``iters`` times after ``warmup``; times are per layer and per rank, the
slowest rank's median (an all-to-all waits for its last peer, so waits for a busier rank are part of
dispatch). Forward only: the backward moves the same bytes the other way.

Bytes per step, over all ranks: what dispatch and combine send (every rank's share to itself
included, the "of which cross-rank" column leaves it out), against the minimum tokens × top-k ×
hidden × bytes of one direction (every token copy crosses once; DeepSeek's kernels send a token once
per node and fan out by NVLink, which this dispatcher does not). One intra-op thread per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from processes import run_ranks

from dsv3_lightning import preset
from dsv3_lightning.model.transformer import DeepSeekV3


class Timed:
    """Wraps a dispatcher; records seconds of each dispatch / combine and the experts between them."""

    def __init__(self, inner: AllToAllTokenDispatcher, sync) -> None:
        self.inner, self.sync = inner, sync
        self.times: dict[str, list[float]] = {"dispatch": [], "experts": [], "combine": []}
        self.bytes: list[tuple[int, int, int]] = []

    def _timed(self, key, fn, *args):
        self.sync()
        start = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.times[key].append(time.perf_counter() - start)
        return out

    def dispatch(self, x, ids, num_experts):
        out = self._timed("dispatch", self.inner.dispatch, x, ids, num_experts)
        self._experts_start = time.perf_counter()
        return out

    def combine(self, y, w, plan):
        self.sync()
        self.times["experts"].append(time.perf_counter() - self._experts_start)
        out = self._timed("combine", self.inner.combine, y, w, plan)
        own = plan.send_splits[self.inner.comm_rank]  # copies this rank sent to itself
        sent = sum(plan.send_splits)
        self.bytes.append((self.inner.last_dispatch_bytes, self.inner.last_combine_bytes, own, sent))
        return out


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = preset(
        "tiny", vocab_size=64, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
        n_routed_experts=args.experts, num_experts_per_tok=args.top_k, n_group=1, topk_group=1,
        num_hidden_layers=args.layers + 1, first_k_dense_replace=1,
    )
    torch.manual_seed(0)
    layers = DeepSeekV3(config).moe_layers()
    holder = torch.nn.ModuleList(layers).to(device)
    comm = Comm(dist.group.WORLD, 120.0, "benchmark")
    timed = []

    def make(name, num_experts):
        inner = AllToAllTokenDispatcher(comm, num_experts, world, fp8=args.fp8)
        inner.comm_rank = rank
        timed.append(Timed(inner, sync))
        return timed[-1]

    shard_experts(holder, rank, world, make)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.tokens, args.hidden, generator=g).to(device)
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                for t in timed:
                    t.times = {k: [] for k in t.times}
                    t.bytes = []
            h = x
            for layer in layers:
                h = h + layer(h)
    stats = [
        ({k: statistics.median(v) for k, v in t.times.items()}, [sum(c) / len(c) for c in zip(*t.bytes)])
        for t in timed
    ]
    gathered = [None] * world
    dist.all_gather_object(gathered, stats)
    if rank == 0:
        queue.put((gathered, str(device), dist.get_backend()))
    dist.destroy_process_group()


def run(world: int, args) -> tuple[list, str, str]:
    return run_ranks(worker, world, args, timeout_s=600)


def table(world: int, result, args) -> str:
    gathered, device, backend = result
    element = 4  # float32 activations
    minimum = world * args.tokens * args.top_k * args.hidden * element
    lines = [
        (
            f"**{world} ranks** ({backend}, {device}; {args.tokens} tokens/rank, hidden {args.hidden}, "
            f"{args.experts} experts, top-{args.top_k}{', FP8 dispatch' if args.fp8 else ''})"
        ),
        "",
        (
            "| MoE layer | dispatch ms | expert compute ms | combine ms | (dispatch+combine)/compute | "
            "dispatch bytes/step | combine bytes/step | copies crossing ranks | minimum T·K·D·4 B | dispatch / minimum |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in range(len(gathered[0])):
        times = {k: max(rank[layer][0][k] for rank in gathered) * 1e3 for k in ("dispatch", "experts", "combine")}
        dispatch_b = sum(rank[layer][1][0] for rank in gathered)
        combine_b = sum(rank[layer][1][1] for rank in gathered)
        own = sum(rank[layer][1][2] for rank in gathered)
        cross = 1 - own / sum(rank[layer][1][3] for rank in gathered)  # copies that leave their rank
        ratio = (times["dispatch"] + times["combine"]) / times["experts"]
        lines.append(
            f"| {layer} | {times['dispatch']:.2f} | {times['experts']:.2f} | {times['combine']:.2f} | {ratio:.2f} | "
            f"{dispatch_b / 2**20:.2f} MiB | {combine_b / 2**20:.2f} MiB | {cross:.0%} | {minimum / 2**20:.2f} MiB | "
            f"{dispatch_b / minimum:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--fp8", action="store_true", help="FP8 (E4M3, 1x128 scales) dispatch")
    args = parser.parse_args()
    for world in args.world:
        print(table(world, run(world, args), args), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
