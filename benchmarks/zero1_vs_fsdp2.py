"""ZeRO-1 (plugins/parallel/zero.py) against torch's FSDP2 ``fully_shard`` expressing the same split.

Same model, same world, same data, plain torch loop (no Lightning), gloo, one process per rank:

    zero1        ParallelMesh.create(P=1, E), mesh.shard_experts, GradientSync(...).shard_optimizers
                 (optimizer state + float32 masters over the block for replicated parameters, over "dp"
                 for expert shards); step: backward, sync.reduce() (bucketed reduce-scatter),
                 optimizer.step(), sync.after_step() (all-gather)
    fsdp2        the same mesh and expert shards, then fully_shard(moe.experts, mesh=mesh["dp"]) for
                 every MoE layer (an expert shard's gradient is the sum over "dp" divided by E·D, not by
                 D: FSDP's set_gradient_divide_factor(E·D) says so, but it reduces with PREMUL_SUM, which
                 gloo rejects in the backward, so by default FSDP's mean over "dp" is kept and the expert
                 gradients are scaled by 1/E after the backward; --divide-factor uses the FSDP call), fully_shard(layer, mesh=block) for every decoder layer
                 and fully_shard(model, mesh=block) (replicated parameters averaged over the E·D ranks);
                 reshard_after_forward False (ZeRO-2-like) and, as "fsdp2-zero3", True; step: backward
                 (FSDP's own reduce-scatter), optimizer.step()

Per rank: parameter / gradient / optimizer-state bytes held after a step (local shards' bytes,
DTensor.to_local(); ZeRO-1's masters counted as optimizer state), the gradient bytes right after the
backward, the RSS high-water delta over the training loop (current RSS sampled around every phase,
minus the RSS before the first step), and the median step time (first step excluded). The loss of the
global batch (mean over the E·D replicas) of every step is compared with ZeRO-1's.

    .venv/bin/python benchmarks/zero1_vs_fsdp2.py                 # tiny test shape, 4 ranks EP2 x DP2
    .venv/bin/python benchmarks/zero1_vs_fsdp2.py --hidden 256 --moe-intermediate 128 --steps 6

Measured here (2 shared CPU cores, 4 gloo ranks EP2 x DP2, torch 2.13): FSDP2 composes with the
all-to-all dispatch and the cut GroupedExperts (its unsharded parameters are plain tensors inside the
grouped matmul); losses agree with ZeRO-1 within 2.4e-7 over 5 steps. Second command (3.05 M
parameters): held after a step, params+grads+state per rank 16.2 MB (ZeRO-1: full replicated weights,
masters and AdamW state 1/G) against 11.9 MB (FSDP2: everything 1/G, sharded gradients kept until
zero_grad); peak RSS delta 71-78 MB against 54-59 MB; median step 347-353 ms against 500-514 ms
(ZeRO-3: 567-589 ms). The tiny shape: 166 ms against 303-311 ms.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_mod
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

TIMEOUT_S = 120.0
SHAPE = {  # tests/plugins/dualpipe/dualpipe_tiny.py SHAPE
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 64,
}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def build(args):
    from dsv3_lightning import preset
    from dsv3_lightning.module import DSV3LightningModule

    shape = {**SHAPE, "hidden_size": args.hidden, "moe_intermediate_size": args.moe_intermediate,
             "intermediate_size": args.intermediate, "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    return DSV3LightningModule(preset("tiny", **shape), [], warmup_steps=0, learning_rate=1e-2)


def make_optimizer(module):
    """configure_optimizers' AdamW groups (decay by ndim), without a trainer; foreach for both paths."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, foreach=True)


def batch(step: int, replica: int, replicas: int, per_replica: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (replicas * per_replica, seq + 1), generator=g)
    return tokens[replica * per_replica : (replica + 1) * per_replica]


def worker(rank, world, port, mode, args, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = {"rank": rank, "mode": mode}
    stage = "init"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        import dsv3_lightning.plugins.expert_parallel  # noqa: F401  (first: grad_sync alone is a circular import)
        from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
        from dsv3_lightning.plugins.parallel.mesh import ParallelMesh

        stage = "build + mesh + shard_experts"
        module = build(args)
        mesh = ParallelMesh.create(1, args.ep, TIMEOUT_S, "cpu")
        shards = mesh.shard_experts(module)
        model = module.model
        sync, expert_params = None, []
        if mode == "zero1":
            stage = "ZeRO-1 setup"
            optimizer = make_optimizer(module)
            sync = GradientSync(module, mesh, shards, None, torch.device("cpu"))
            zeros = sync.shard_optimizers([optimizer])
        else:
            stage = "fully_shard"
            from dsv3_lightning.plugins.expert_parallel.sharding import moe_layers
            from torch.distributed.fsdp import fully_shard

            reshard = mode == "fsdp2-zero3"
            expert_params = []
            dp_mesh = mesh.device_mesh["dp"]
            for _, moe in moe_layers(module):
                fully_shard(moe.experts, mesh=dp_mesh, reshard_after_forward=reshard)
                if args.divide_factor:  # gloo: "Cannot use ReduceOp.PREMUL_SUM with Gloo" in the backward
                    moe.experts.set_gradient_divide_factor(float(mesh.num_replicas))
                else:  # FSDP's default mean over "dp" (divide by D), then x D/(E·D) after the backward
                    expert_params += list(moe.experts.parameters())
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh.block_mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh.block_mesh, reshard_after_forward=reshard)
            optimizer = make_optimizer(module)
        vocab = module.config.vocab_size
        base = current_rss()
        high = base
        losses, times, grads_after_backward = [], [], 0
        for step in range(args.steps):
            tokens = batch(step, mesh.replica_rank, mesh.num_replicas, args.batch, args.seq, vocab)
            dist.barrier()
            t0 = time.perf_counter()
            stage = f"step {step}: forward"
            logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            high = max(high, current_rss())
            stage = f"step {step}: backward"
            loss.backward()
            high = max(high, current_rss())
            if step == 0:
                grads_after_backward = nbytes(p.grad for p in module.parameters())
            stage = f"step {step}: reduce + optimizer step"
            if sync is not None:
                sync.reduce()
                high = max(high, current_rss())
                optimizer.step()
                sync.after_step()
            else:
                with torch.no_grad():
                    for p in expert_params:
                        if p.grad is not None:
                            p.grad.mul_(mesh.data_parallel_size / mesh.num_replicas)
                optimizer.step()
            times.append(time.perf_counter() - t0)
            high = max(high, current_rss())
            if step == args.steps - 1:  # held after a step, before zero_grad
                result["param_bytes"] = nbytes(module.parameters())
                grads = nbytes(p.grad for p in module.parameters())
                state = nbytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
                if sync is not None:
                    grads += nbytes(fs.master.grad for z in zeros for fs in z.layouts)
                    state += nbytes(fs.master for z in zeros for fs in z.layouts)
                result["grad_bytes"], result["state_bytes"] = grads, state
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach().double().reshape(1)
            dist.all_reduce(value, group=mesh.block_group)
            losses.append(float(value) / mesh.num_replicas)
        result.update(ok=True, losses=losses, step_s=statistics.median(times[1:] or times),
                      rss_delta=high - base, grads_after_backward=grads_after_backward,
                      full_params=sum(p.numel() for p in build(args).parameters()))
    except BaseException:
        result.update(ok=False, stage=stage, traceback=traceback.format_exc())
    out_q.put(result)
    try:
        if result.get("ok"):
            dist.destroy_process_group()
    except Exception:
        pass


def run_mode(mode, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.world, port, mode, args, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + TIMEOUT_S * 3
    while len(results) < args.world and time.time() < deadline:
        try:
            r = q.get(timeout=5)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        results[r["rank"]] = r
        if not r["ok"]:  # the others may wait forever in a collective
            time.sleep(2)
            while True:
                try:
                    r2 = q.get(timeout=1)
                    results[r2["rank"]] = r2
                except queue_mod.Empty:
                    break
            break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join()
    return [results[r] for r in sorted(results)]


def kb(n):
    return f"{n / 1024:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="sequences per replica")
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate_size"])
    parser.add_argument("--moe-intermediate", type=int, default=SHAPE["moe_intermediate_size"])
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--divide-factor", action="store_true",
                        help="FSDP2's set_gradient_divide_factor(E·D) on the experts (PREMUL_SUM: fails on gloo); "
                             "default: FSDP's mean over dp, then the expert gradients scaled by 1/E by hand")
    parser.add_argument("--modes", default="zero1,fsdp2,fsdp2-zero3")
    args = parser.parse_args()
    print("command:", " ".join([".venv/bin/python", *sys.argv]))
    print(f"world {args.world} = EP{args.ep} x DP{args.world // args.ep} x PP1, gloo, float32, "
          f"{args.steps} steps of {args.batch} x {args.seq} tokens per replica\n")
    all_results = {m: run_mode(m, args) for m in args.modes.split(",")}
    ref = all_results.get("zero1")
    ref_losses = ref[0]["losses"] if ref and ref and ref[0].get("ok") else None
    print("| path | rank | params KB | grads KB after backward | grads KB held after step | "
          "opt state (+masters) KB | params+grads+state KB | peak RSS delta MB | step ms (median) | "
          "max |Δloss| vs zero1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for mode, results in all_results.items():
        for r in results:
            if not r["ok"]:
                failures.append(r)
                print(f"| {mode} | {r['rank']} | FAILED at {r['stage']} | | | | | | | |")
                continue
            total = r["param_bytes"] + r["grad_bytes"] + r["state_bytes"]
            diff = (max(abs(a - b) for a, b in zip(r["losses"], ref_losses)) if ref_losses else float("nan"))
            print(f"| {mode} | {r['rank']} | {kb(r['param_bytes'])} | {kb(r['grads_after_backward'])} | "
                  f"{kb(r['grad_bytes'])} | {kb(r['state_bytes'])} | {kb(total)} | "
                  f"{r['rss_delta'] / 2**20:.1f} | {1e3 * r['step_s']:.1f} | {diff:.2e} |")
    ok = next((rs[0] for rs in all_results.values() if rs and rs[0]["ok"]), None)
    if ok:
        print(f"\nfull model: {ok['full_params']} parameters ({kb(4 * ok['full_params'])} KB float32)")
    for mode, results in all_results.items():
        if results and results[0]["ok"]:
            print(f"{mode} losses: {[f'{x:.6f}' for x in results[0]['losses']]}")
    seen = set()
    for r in failures:
        key = (r["mode"], r["traceback"].strip().splitlines()[-1])
        if key in seen:
            continue
        seen.add(key)
        tail = "\n".join(r["traceback"].strip().splitlines()[-25:])
        print(f"\n{r['mode']} rank {r['rank']} failed at {r['stage']}:\n{tail}")


if __name__ == "__main__":
    main()
