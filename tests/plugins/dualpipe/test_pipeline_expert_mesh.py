"""The pipeline × expert × data mesh on 4 and 8 gloo processes = one process on the whole global batch.

Each case builds the mesh (the parallel layer's ParallelMesh), shards the experts, runs one schedule
step of every pipeline on its slice of the batch and synchronises the gradients as DualPipeStrategy
does (the parallel layer's GradientSync).
Each rank writes the losses of the micro-batches whose last stage it holds, the gradients of the
parameters its pieces use (expert shards gathered to full tensors over the expert group) and the
global gradient norm that clipping would use; the test compares them with a single process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dualpipe_tiny import assert_gradients_match, make_module, make_tokens, reference, runs_per_world

from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh

CASES = {  # world size -> (schedule, pipeline_parallel_size, expert_parallel_size, num_microbatches)
    4: [
        ("1f1b", 2, 2, 4),
        ("zb", 2, 2, 4),
        ("dualpipev", 2, 2, 4),
        ("dualpipe", 2, 2, 4),
        ("dualpipe-overlap", 2, 2, 8),  # (F;B) pairs in turns, all-to-alls in flight under the other chunk
        ("dualpipev-overlap", 2, 2, 8),  # torch's DualPipeV lists on our runtime, pairs in turns
        ("dualpipev", 2, 1, 4),  # D = 2 whole pipelines, data parallel, experts not sharded
    ],
    8: [
        ("dualpipe-overlap", 2, 2, 4),  # D = 2: expert shards summed over the data group too
        ("dualpipe-overlap", 4, 2, 8),  # P = 4: pairs whose chunks feed each other's neighbours
    ],
}
BATCH = 16  # global: 8 windows per pipeline when D·E = 2, 4 when D·E = 4
TOLERANCE = 1e-6  # relative, as test_equivalence.py


def case_id(world: int, schedule: str, p: int, e: int) -> str:
    return f"{schedule}-pp{p}-ep{e}-dp{world // (p * e)}"


def pipeline_tokens(tokens: torch.Tensor, index: int, num_pipelines: int) -> torch.Tensor:
    """Pipeline ``index``'s slice, as the distributed sampler deals it (windows index, index + n, ...)."""
    return tokens[index::num_pipelines]


def _full(grad: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts)


def _worker(rank: int, world: int, out_dir: str) -> None:
    for schedule, p, e, m in CASES[world]:
        case = case_id(world, schedule, p, e)
        mesh = ParallelMesh.create(p, e, timeout_s=60)
        module = make_module(4)
        shards = mesh.shard_experts(module)
        hook = InterleavedOverlap() if schedule.endswith("-overlap") else None
        if hook is not None:
            hook.attach(module)
        plan = build_plan(schedule.split("-")[0], p, m)
        runner = PipelineRunner(module, plan, mesh.pipeline_group, overlap=hook)
        tokens = pipeline_tokens(make_tokens(BATCH), mesh.replica_rank, mesh.num_replicas)
        losses = runner.run_schedule(tokens)
        runner.sync_gradients()
        sync = GradientSync(module, mesh, shards, runner.owners)
        sync.reduce()
        norm = sync.clip(max_norm=float("inf"))
        experts = {id(q) for shard in shards for q in shard.params()}
        mine = runner.local_parameter_names()
        grads = {}
        for name, q in module.named_parameters():  # the same order on every rank of an expert group
            if name in mine and q.grad is not None:
                full = _full(q.grad, mesh.expert_group) if id(q) in experts else q.grad
                grads[name] = full.clone()
        torch.save(
            {
                "losses": {mesh.replica_rank * m + i: loss for i, loss in losses.items()},
                "grads": grads,
                "norm": norm,
                "local_experts": shards[0].num_local_experts if shards else None,
                "in_pairs": hook.interleaver.stats.in_pairs if hook else None,
            },
            os.path.join(out_dir, f"{case}-{rank}.pt"),
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> the folder of its results; the processes run all its cases, once, on first use."""
    return runs_per_world(tmp_path_factory, _worker, "mesh")


ALL = [(world, i) for world in CASES for i in range(len(CASES[world]))]
IDS = [f"{world}procs-{case_id(world, *CASES[world][i][:3])}" for world, i in ALL]


@pytest.mark.parametrize("world,index", ALL, ids=IDS)
def test_mesh_step_matches_one_process(runs, world, index):
    results = runs(world)
    schedule, p, e, m = CASES[world][index]
    case = case_id(world, schedule, p, e)
    num_pipelines = world // p
    tokens = make_tokens(BATCH)
    # the single process reads the pipelines' slices one after the other, in micro-batches of the same size
    ordered = torch.cat([pipeline_tokens(tokens, i, num_pipelines) for i in range(num_pipelines)])
    want_losses, want_grads = reference(make_module(4), ordered, m * num_pipelines)
    ranks = [torch.load(results / f"{case}-{r}.pt", weights_only=False) for r in range(world)]
    losses = {}
    for run in ranks:
        losses.update(run["losses"])
    assert sorted(losses) == list(range(m * num_pipelines))
    got_losses = torch.stack([losses[i] for i in range(m * num_pipelines)])
    torch.testing.assert_close(got_losses, want_losses, rtol=TOLERANCE, atol=0)
    print(
        f"{case}: max relative loss error {((got_losses - want_losses).abs() / want_losses.abs()).max():.2e}"
    )
    if e > 1:
        assert {run["local_experts"] for run in ranks} == {8 // e}  # the experts really were sharded
    if schedule.endswith("-overlap"):  # the pairs' all-to-alls were issued while the other chunk ran
        assert all(run["in_pairs"] > 0 for run in ranks), [run["in_pairs"] for run in ranks]
    worst = assert_gradients_match([run["grads"] for run in ranks], want_grads, TOLERANCE, case)
    want_norm = torch.stack([g.double().pow(2).sum() for g in want_grads.values()]).sum().sqrt().item()
    for run in ranks:  # clipping's norm: every parameter once, every rank the same number
        assert run["norm"] == pytest.approx(want_norm, rel=TOLERANCE)
    print(f"{case}: max relative gradient error {worst:.2e}")
