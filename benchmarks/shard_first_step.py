"""One rank of a big pipeline x data layout, built shard-first and trained one step, in one process.

    .venv/bin/python benchmarks/shard_first_step.py [--config configs/16B.yaml] [--pipeline 8] [--data 8]
        [--position 0] [--seq_len 128] [--check configs/tiny.yaml]

A process group of torch.distributed's "fake" backend (plugins/plan/today.py's ``fake_world``: every
collective returns at once, nothing is sent) stands for global rank ``position x D`` of a P x D x 1
world (experts unsharded, E = 1), and the script does what ParallelStrategy / DualPipeStrategy do for
that rank, with their own objects, in their order:

    build        DSV3LightningModule on meta (``building_on_meta``, as the CLI does for a shards-first
                 strategy), the model config and module kwargs read as ``dsv3 plan`` reads them (RunSettings)
    cut          ParallelMesh.create, mesh.shard_experts (nothing at E = 1), PipelineRunner(...) with
                 DualPipeStrategy's default schedule (dualpipev, 2P micro-batches) and ``release_unowned``
    materialise  ``module.materialize("cpu")``: only the kept tensors get memory and their init values
    optimizer    the module's ``configure_optimizers`` (AdamW), GradientSync(...).shard_optimizers (ZeRO-1
                 over the D ranks of the position: master weights and moments of this rank's 1/D range)
    step         forward and backward of this rank's pipeline pieces on one micro-batch (1 x seq_len
                 tokens, float32): a first piece takes tokens and gets a random output gradient, a later
                 piece a random hidden state in place of the activation it would receive, a last piece
                 returns the loss; then runner.sync_gradients, sync.reduce (bucketed reduce-scatter),
                 sync.clip(1.0), optimizer.step(), sync.after_step() (all-gather), zero_grad

Measured: parameters held against the whole model, bytes of weights, gradients, optimizer state and
ZeRO-1 master weights (the tensors this process really holds), peak RSS (``ru_maxrss``) and current
RSS after each phase, and each phase's wall time. Not measured: communication (the fake backend
delivers nothing: no point-to-point activations or gradients between positions, and the reduced
gradients, hence the updated values, are whatever the fake reduce-scatter leaves, so only memory and
compute are real), the other micro-batches of the schedule (one forward and backward, not 2P), the
activations in flight under the schedule, bf16-mixed precision (float32 throughout), expert
parallelism (its all-to-all's count exchange returns garbage under the fake backend) and GPU memory.

``--check`` builds a small config the same way (P2 x D2, and P2 x D2 x E2 for the expert cut) and
checks the cut against the strategy's: the parameters held equal what ``dsv3 plan`` reports for that
position (plugins/plan/today.py's measure_positions on a separate meta build), and every kept tensor
equals the same tensor of a module built normally with the same seed, bitwise.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from dsv3_lightning.heads import build_head
from dsv3_lightning.module import DSV3LightningModule, building_on_meta
from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from dsv3_lightning.plugins.plan.command import RunSettings
from dsv3_lightning.plugins.plan.today import fake_world, measure_positions

GB = 1e9
TIMEOUT_S = 1800.0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Run:
    """What one rank's build and step held and took."""

    whole_params: int = 0
    held_params: int = 0
    phases: list[tuple[str, float, int, int]] = field(default_factory=list)
    """(phase, seconds, peak RSS, current RSS after it)."""
    bytes: dict[str, int] = field(default_factory=dict)
    loss: float | None = None
    pieces: str = ""
    materialised: dict[str, torch.Tensor] | None = None
    """The state dict right after materialisation (``keep_values``), before the step changes it."""

    def mark(self, phase: str, start: float) -> float:
        now = time.perf_counter()
        self.phases.append((phase, now - start, peak_rss(), current_rss()))
        return now


def build_on_meta(run: RunSettings) -> DSV3LightningModule:
    """The module as ``dsv3 fit`` builds it for a shards-first strategy (float32: trainer.precision's
    bf16-mixed keeps float32 weights too)."""
    heads = [build_head(copy.deepcopy(h)) for h in run.model.get("heads") or []]
    with building_on_meta():
        return DSV3LightningModule(run.model_config(), heads, **run.module_kwargs())


def cut(module, pipeline: int, expert: int, microbatches: int):
    """ParallelStrategy._cut + DualPipeStrategy.setup_pipeline, for this (fake) rank."""
    mesh = ParallelMesh.create(pipeline, expert, TIMEOUT_S, "cpu")
    shards = mesh.shard_experts(module)
    runner = None
    if pipeline > 1:
        plan = build_plan("dualpipev", pipeline, microbatches)
        runner = PipelineRunner(module, plan, mesh.pipeline_group, torch.device("cpu"))
        runner.release_unowned()
    return mesh, shards, runner


def one_rank(run: RunSettings, pipeline: int, data: int, position: int, seq_len: int, *,
             expert: int = 1, step: bool = True, seed: int = 1234,
             keep_values: bool = False) -> tuple[Run, DSV3LightningModule, list]:
    out = Run()
    start = t0 = time.perf_counter()
    torch.manual_seed(seed)
    module = build_on_meta(run)
    out.whole_params = sum(p.numel() for p in module.parameters())
    t0 = out.mark("build on meta", t0)
    with fake_world(position * expert * data, pipeline * expert * data):
        mesh, shards, runner = cut(module, pipeline, expert, 2 * pipeline)
        assert mesh.pipeline_rank == position
        t0 = out.mark("cut (mesh, experts, release_unowned)", t0)
        module.materialize("cpu")
        assert not any(t.is_meta for t in (*module.parameters(), *module.buffers()))
        out.held_params = sum(p.numel() for p in module.parameters())
        out.bytes["weights"] = nbytes(module.parameters())
        t0 = out.mark("materialise", t0)
        if keep_values:
            out.materialised = {k: v.clone() for k, v in module.state_dict().items()}
        if runner is not None:
            layout = runner.layout
            out.pieces = "; ".join(
                "stage {}: layers [{}, {})".format(s, *runner.pieces[layout.piece(s)].layer_range)
                + (" + embedding" if layout.is_first(s) else "")
                + (" + norm, lm_head" if layout.is_last(s) else "")
                for s in runner.local_stages
            )
        if not step:
            return out, module, shards
        optimizer = run.make_optimizer(module)
        sync = GradientSync(module, mesh, shards, runner.owners if runner else None, torch.device("cpu"))
        zeros = sync.shard_optimizers([optimizer])
        t0 = out.mark("optimizer + ZeRO-1 shards", t0)
        out.loss = forward_backward(module, runner, seq_len)
        out.bytes["gradients"] = nbytes(p.grad for p in module.parameters() if p.grad is not None)
        t0 = out.mark(f"forward + backward (1 x {seq_len} tokens)", t0)
        if runner is not None:
            runner.sync_gradients()
        sync.reduce()
        sync.clip(1.0)
        out.bytes["master gradients"] = nbytes(fs.master.grad for z in zeros for fs in z.layouts
                                               if fs.master.grad is not None)
        optimizer.step()
        sync.after_step()
        out.bytes["optimizer state"] = nbytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        )
        out.bytes["master weights"] = nbytes(fs.master for z in zeros for fs in z.layouts)
        optimizer.zero_grad()
        out.mark("reduce-scatter, clip, step, all-gather", t0)
    out.phases.append(("total", time.perf_counter() - start, peak_rss(), current_rss()))
    return out, module, shards


def forward_backward(module: DSV3LightningModule, runner: PipelineRunner | None,
                     seq_len: int) -> float | None:
    """This rank's pieces on one micro-batch; the activations another position would send are random."""
    vocab = module.config.vocab_size
    tokens = torch.randint(0, vocab, (1, seq_len + 1 + module.extra_tokens))
    if runner is None:
        loss, _ = module.batch_loss(*_whole_forward(module, tokens), tokens, loss_terms=False)
        loss.backward()
        return loss.item()
    loss = None
    for stage in runner.local_stages:
        piece = runner.pieces[runner.layout.piece(stage)]
        x = tokens
        if not piece.is_first:  # what the previous position would send: a hidden state [1, S, D]
            x = torch.randn(1, seq_len, module.config.hidden_size, requires_grad=True)
        out = piece(x, tokens=tokens)
        if piece.is_last:
            out.backward()
            loss = out.item()
        else:  # the gradient the next position would send back
            out.backward(torch.randn_like(out))
    return loss


def _whole_forward(module, tokens):
    inputs, _ = module._split(tokens)
    model = module.model
    h = model.run_layers(model.embed(inputs), 0, module.config.num_hidden_layers)
    return model.head(h), h


def check(path: str, seq_len: int) -> list[str]:
    """The cut against the strategy's: the plan's parameter count, and a normal build's values."""
    run = RunSettings.load([path])
    lines = []
    for expert in (1, 2):
        got, module, shards = one_rank(run, 2, 2, 0, seq_len, expert=expert, step=expert == 1, seed=7,
                                       keep_values=True)
        with torch.device("meta"):
            meta = run.build_module(torch.float32)
        states = measure_positions(meta, build_plan("dualpipev", 2, 4), expert, 2, run.make_optimizer, None)
        assert got.held_params == states[0].params, (got.held_params, states[0].params)
        torch.manual_seed(7)
        heads = [build_head(copy.deepcopy(h)) for h in run.model.get("heads") or []]
        full = DSV3LightningModule(run.model_config(), heads, **run.module_kwargs()).state_dict()
        for shard in shards:  # expert rank 0's rows of the full tensors
            for key in shard.state_keys():
                full[key] = shard.local_slice(full[key])
        compared = 0
        for name, tensor in got.materialised.items():
            if tensor.numel():  # released tensors are empty
                assert torch.equal(tensor, full[name]), name
                compared += 1
        lines.append(
            f"- {path} PP2 x DP2 x EP{expert}, position 0: {got.held_params:,} of {got.whole_params:,} "
            f"parameters held = the plan's {states[0].params:,}; {compared} kept tensors equal a normal "
            f"build's bitwise" + (f"; one step, loss {got.loss:.3f}" if got.loss is not None else "")
        )
    return lines


def table(run: Run, args) -> str:
    whole = run.whole_params
    rows = [
        f"## {args.config}: position {args.position} of PP{args.pipeline} x DP{args.data} x EP1 "
        f"(global rank {args.position * args.data} of {args.pipeline * args.data}), fake backend",
        "",
        f"- pieces: {run.pieces}",
        f"- parameters held: {run.held_params:,} of {whole:,} ({100 * run.held_params / whole:.1f} %); "
        f"whole model float32 {4 * whole / GB:.2f} GB",
        f"- one micro-batch 1 x {args.seq_len} tokens, float32; loss {run.loss:.3f}",
        "",
        "| bytes held (float32) | GB |",
        "|---|---:|",
    ]
    rows += [f"| {k} | {v / GB:.2f} |" for k, v in run.bytes.items()]
    rows += ["", "| phase | wall s | peak RSS GB | RSS after GB |", "|---|---:|---:|---:|"]
    rows += [f"| {p} | {s:.1f} | {peak / GB:.2f} | {cur / GB:.2f} |" for p, s, peak, cur in run.phases]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/16B.yaml")
    p.add_argument("--pipeline", type=int, default=8)
    p.add_argument("--data", type=int, default=8)
    p.add_argument("--position", type=int, default=0)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--check", default="configs/tiny.yaml", help="small config for the cut's check ('' skips)")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lines = check(args.check, 32) if args.check else []
    run = RunSettings.load([args.config])
    got, _, _ = one_rank(run, args.pipeline, args.data, args.position, args.seq_len)
    with torch.device("meta"):
        meta = run.build_module(torch.float32)
    plan = build_plan("dualpipev", args.pipeline, 2 * args.pipeline)
    planned = measure_positions(meta, plan, 1, args.data, run.make_optimizer, None)[args.position].params
    lines.append(f"- {args.config}: held {got.held_params:,} parameters; `dsv3 plan --config {args.config} "
                 f"--pipeline {args.pipeline} --data {args.data}` reports {planned:,} for position "
                 f"{args.position}" + (" (equal)" if planned == got.held_params else " (DIFFERENT)"))
    print(table(got, args))
    print("\nChecks of the cut:\n" + "\n".join(lines))
    print(f"\n`.venv/bin/python {' '.join(sys.argv)}` ({datetime.date.today()}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
