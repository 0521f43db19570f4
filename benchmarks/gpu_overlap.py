"""How much expert-parallel all-to-all time the (F;B) overlap hides on NVIDIA GPUs with NCCL.

    python benchmarks/gpu_overlap.py                       # one process per GPU (2 or more GPUs)
    python benchmarks/gpu_overlap.py --world 2 --tokens 8192 --hidden 2048 --repeats 10

The GPU twin of benchmarks/overlap_comm.py, one call: each rank holds a DeepSeek-V3 of the given
shapes on its GPU (one dense layer, then MoE layers, experts split over the ranks by
``shard_experts``, the strategy's all-to-all dispatcher on NCCL) and runs one 1F1B step of
``microbatches`` micro-batches as DualPipe's steady state pairs them: F0, (F1;B0), ..., B(last),

    sequential   each pair runs its forward, then its backward
    overlapped   each pair runs as a ChunkInterleaver pair (InterleavedOverlap): the forward launches
                 until it issues an all-to-all, the backward launches its kernels behind it, ...

alternated ``repeats`` times after a warm-up. Exposed communication is measured with CUDA events
(``ChunkInterleaver(timing="cuda")``): the time the compute stream stands still at each all-to-all's
``wait`` for NCCL's stream. Printed (medians; step: the slowest rank's, after a device
synchronisation): step ms and exposed all-to-all ms for both modes, the hidden fraction
``1 - exposed(overlapped) / exposed(sequential)``, the step time ratio, and the largest difference
between the two modes' losses.

Processes: ``--world`` (default: the number of GPUs), spawned, rank r on GPU r mod count. With one
GPU the script tries 2 ranks on it; NCCL refuses two ranks of one communicator on one device
("Duplicate GPU detected") and the script says so and exits. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch


def _worker(rank: int, world: int, port: int, args, out) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from dsv3_lightning.plugins.dualpipe.interleaver import ChunkInterleaver, one_f_one_b
    from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
    from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
    from dsv3_lightning.plugins.expert_parallel.dispatcher import AllToAllTokenDispatcher
    from dsv3_lightning.plugins.expert_parallel.sharding import shard_experts

    from dsv3_lightning import preset
    from dsv3_lightning.model.transformer import DeepSeekV3

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout), device_id=device
        )
        config = preset(
            "tiny", vocab_size=args.vocab, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
            intermediate_size=4 * args.intermediate, n_routed_experts=args.experts,
            num_experts_per_tok=args.top_k, n_group=1, topk_group=1, num_hidden_layers=args.layers + 1,
            first_k_dense_replace=1, max_position_embeddings=args.seq,
        )
        torch.manual_seed(0)
        model = DeepSeekV3(config)
        shard_experts(
            model, rank, world, lambda name, e: AllToAllTokenDispatcher(Comm(None, args.timeout, name), e, world)
        )
        model = model.to(device)
        hook = InterleavedOverlap(ChunkInterleaver(timing="cuda"))
        layers = hook.attach(model)
        g = torch.Generator().manual_seed(rank)
        batch = args.tokens // args.seq
        microbatches = [
            torch.randint(0, args.vocab, (batch, args.seq + 1), generator=g).to(device)
            for _ in range(args.microbatches)
        ]

        def loss_of(tokens):
            logits = model(tokens[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        stats = hook.interleaver.stats
        results = {"sequential": [], "overlapped": []}
        losses = {}
        for i in range(args.warmup + args.repeats):
            for mode, times in results.items():
                model.zero_grad(set_to_none=True)
                stats.reset()
                dist.barrier()
                torch.cuda.synchronize()
                start = time.perf_counter()
                step_losses = one_f_one_b(loss_of, microbatches, hook.interleaver if mode == "overlapped" else None)
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                losses[mode] = torch.stack(step_losses)
                if i >= args.warmup:
                    times.append((elapsed, stats.exposed_s, stats.collectives, stats.in_pairs))
        loss_diff = float((losses["sequential"] - losses["overlapped"]).abs().max())
        gathered = [None] * world
        dist.all_gather_object(gathered, {"results": results, "loss_diff": loss_diff, "layers": layers})
        if rank == 0:
            out.put(("ok", gathered))
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported by the parent, which stops the others
        out.put(("error", f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}"))
        raise


def _launch(args) -> tuple[str, object]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, out)) for r in range(args.world)]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=args.timeout + 120)
    except queue_module.Empty:
        result = ("error", f"no result within {args.timeout + 120} s")
    for p in procs:
        p.join(timeout=30 if result[0] == "ok" else 5)
        if p.is_alive():
            p.terminate()
    return result


def _table(gathered: list, args) -> str:
    def median(mode: str, column: int, reduce=max) -> float:
        return reduce(statistics.median(r[column] for r in rank["results"][mode]) for rank in gathered)

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    rows = {}
    for mode in ("sequential", "overlapped"):
        first = gathered[0]["results"][mode][0]
        rows[mode] = (median(mode, 0), median(mode, 1, mean), first[2], first[3])
    (seq_step, seq_exposed, *_), (ov_step, ov_exposed, *_) = rows["sequential"], rows["overlapped"]
    lines = [
        f"**{args.world} NCCL ranks on {torch.cuda.get_device_name(0)}**; per rank {args.microbatches} "
        f"micro-batches of {args.tokens} tokens, hidden {args.hidden}, {gathered[0]['layers']} MoE layers of "
        f"{args.experts} experts (top-{args.top_k}, intermediate {args.intermediate}); medians of "
        f"{args.repeats} steps; exposed = compute stream waiting for NCCL (CUDA events)",
        "",
        "| pairs run | step ms | exposed all-to-all ms per step | all-to-alls per step | of which inside a pair |",
        "|---|---|---|---|---|",
    ]
    for mode, (step, exposed, collectives, in_pairs) in rows.items():
        lines.append(f"| {mode} | {step * 1e3:.2f} | {exposed * 1e3:.2f} | {collectives} | {in_pairs} |")
    hidden = 1 - ov_exposed / seq_exposed if seq_exposed > 0 else float("nan")
    lines += [
        "",
        f"hidden fraction of the all-to-all time: {hidden:.0%}",
        f"step time: sequential {seq_step * 1e3:.2f} ms, overlapped {ov_step * 1e3:.2f} ms "
        f"({ov_step / seq_step:.2f}x)",
        f"largest |loss(overlapped) - loss(sequential)|: {max(r['loss_diff'] for r in gathered):.3g}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=None, help="processes (default: the number of GPUs)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch per rank")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1024, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (after one dense layer)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for a collective, and the run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_overlap: no CUDA device here (torch.cuda.is_available() is False): nothing measured. "
              "Run it on a machine with NVIDIA GPUs; benchmarks/overlap_comm.py is the CPU/gloo version.")
        return 0
    gpus = torch.cuda.device_count()
    args.world = args.world or max(gpus, 2)
    if args.experts % args.world:
        print(f"gpu_overlap: --experts ({args.experts}) must be divisible by the number of ranks ({args.world})")
        return 2
    status, payload = _launch(args)
    if status == "ok":
        print(_table(payload, args), flush=True)
        return 0
    if "Duplicate GPU" in str(payload) or (gpus < args.world and "ncclInvalidUsage" in str(payload)):
        print(f"gpu_overlap: NCCL refuses {args.world} ranks on {gpus} GPU(s) (several ranks of one communicator "
              f"on one device); the all-to-all overlap needs one GPU per rank: run it with >= 2 GPUs. "
              f"NCCL said: {str(payload).splitlines()[0]}")
        return 3
    print(f"gpu_overlap: the run failed: {payload}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
