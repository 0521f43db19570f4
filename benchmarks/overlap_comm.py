"""How much expert-parallel communication the (F;B) overlap hides (SPEC.md §7.1), on gloo processes.

    python benchmarks/overlap_comm.py                         # 2 processes, 1 intra-op thread each
    python benchmarks/overlap_comm.py --tokens 1024 --hidden 512 --repeats 10

Each rank holds a DeepSeek-V3 of the given shapes (one dense layer, then MoE layers, experts split
over the ranks by ``shard_experts``, the strategy's all-to-all dispatcher) and runs one 1F1B step of
``microbatches`` micro-batches as DualPipe's steady state pairs them: F0, (F1;B0), (F2;B1), ...,
B(last). Two ways, alternated ``repeats`` times after a warm-up, same work and same collectives:

    sequential   each pair runs its forward, then its backward (every all-to-all blocks where issued)
    overlapped   each pair runs as a ChunkInterleaver pair (InterleavedOverlap): the forward computes
                 until it issues an all-to-all, which runs while the backward computes, and so on

Reported per step (medians; the slowest rank's step time): the time chunks spent blocked on their
all-to-alls (*exposed* communication; sequential: all of it, waits for a slower peer included), the
fraction hidden, ``1 - exposed(overlapped) / exposed(sequential)``, and the step time ratio. CPU
and gloo, timed on the host (``ChunkInterleaver(timing="host")``); the same measurement on GPUs, with
NCCL and CUDA events, is benchmarks/gpu_overlap.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dsv3_lightning.plugins.dualpipe.interleaver import ChunkInterleaver, one_f_one_b
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts
from processes import run_ranks

from dsv3_lightning import preset
from dsv3_lightning.model.transformer import DeepSeekV3


def loss_of(model):
    def loss(tokens):
        logits = model(tokens[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    return loss


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    config = preset(
        "tiny", vocab_size=args.vocab, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
        intermediate_size=4 * args.intermediate, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        n_group=1, topk_group=1, num_hidden_layers=args.layers + 1, first_k_dense_replace=1,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    shard_experts(model, rank, world, lambda name, e: AllToAllTokenDispatcher(Comm(None, 300.0, name), e, world))
    hook = InterleavedOverlap(ChunkInterleaver(timing="host"))
    hook.attach(model)
    g = torch.Generator().manual_seed(rank)
    batch = args.tokens // args.seq
    microbatches = [torch.randint(0, args.vocab, (batch, args.seq + 1), generator=g) for _ in range(args.microbatches)]
    stats = hook.interleaver.stats
    results = {"sequential": [], "overlapped": []}
    for i in range(args.warmup + args.repeats):
        for mode, times in results.items():
            model.zero_grad(set_to_none=True)
            stats.reset()
            dist.barrier()
            start = time.perf_counter()
            one_f_one_b(loss_of(model), microbatches, hook.interleaver if mode == "overlapped" else None)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times.append((elapsed, stats.exposed_s, stats.collectives, stats.in_pairs))
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def run(args) -> list:
    return run_ranks(worker, args.world, args)


def table(gathered: list, args) -> str:
    def median(mode: str, column: int, reduce=max) -> float:
        return reduce(statistics.median(r[column] for r in rank[mode]) for rank in gathered)

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    rows = []
    for mode in ("sequential", "overlapped"):
        step = median(mode, 0)
        exposed = median(mode, 1, mean)
        collectives = gathered[0][mode][0][2]
        in_pairs = gathered[0][mode][0][3]
        rows.append((mode, step, exposed, collectives, in_pairs))
    (_, seq_step, seq_exposed, *_), (_, ov_step, ov_exposed, *_) = rows
    lines = [
        (
            f"**{args.world} gloo processes**, 1 thread each; per rank {args.microbatches} micro-batches of "
            f"{args.tokens} tokens, hidden {args.hidden}, {args.layers} MoE layers of {args.experts} experts "
            f"(top-{args.top_k}, intermediate {args.intermediate}); medians of {args.repeats} steps"
        ),
        "",
        "| pairs run | step ms | exposed all-to-all ms per step | all-to-alls per step | of which inside a pair |",
        "|---|---|---|---|---|",
    ]
    for mode, step, exposed, collectives, in_pairs in rows:
        lines.append(f"| {mode} | {step * 1e3:.0f} | {exposed * 1e3:.1f} | {collectives} | {in_pairs} |")
    lines += [
        "",
        (
            f"Communication hidden: {1 - ov_exposed / seq_exposed:.0%} of the exposed all-to-all time; "
            f"step time overlapped / sequential: {ov_step / seq_step:.2f}x"
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (after one dense layer)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(table(run(args), args), flush=True)


if __name__ == "__main__":
    main()
