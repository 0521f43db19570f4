"""`dsv3 plan`: the memory plan against the model's own count (671B at 2,048 ranks, in a fresh process
whose peak RSS is checked), against tiny.yaml's shards built for real on CPU, against the schedule
simulator and the process's RSS, and every bad-input message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.partition import build_pieces
from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, simulate

from dsv3_lightning.cli import main as dsv3
from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.plugins.plan.activations import PieceActivations, peak_activations
from dsv3_lightning.plugins.plan.build import plan_positions
from dsv3_lightning.plugins.plan.command import Layout, RunSettings, parser, resolve
from dsv3_lightning.plugins.plan.probe import MetaRun, transient_bytes
from dsv3_lightning.plugins.plan.today import fake_world
from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.parallel.mesh import ParallelMesh
from dsv3_lightning.plugins.plan.zero1 import zero1_memory

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")
V3 = str(ROOT / "configs/671B.yaml")
TOTAL_671B = 671026404352


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plan_671b() -> dict:
    """The 671B plan at PP16 x EP64 x DP2 in a fresh process: per position, its counts; peak RSS; time."""
    return _run(f"""
        import json, resource, time
        start = time.perf_counter()
        from dsv3_lightning.plugins.plan.build import plan_positions
        from dsv3_lightning.plugins.plan.command import RunSettings, parser, resolve
        args = parser().parse_args(["--config", {V3!r}, "--pipeline", "16", "--expert", "64", "--data", "2"])
        run = RunSettings.load(args.config)
        positions, facts = plan_positions(run, resolve(args, run))
        fields = ("params", "weights", "gradients", "master_weights", "optimizer_state", "master_gradients")
        rows = [dict(replicated=p.state.replicated_params, experts=p.state.expert_params)
                for p in positions]
        for row, p in zip(rows, positions):
            for name in ("today", "after", "v3"):
                row.update((name + "_" + f, getattr(getattr(p, name), f)) for f in fields)
        print(json.dumps(dict(rows=rows, total=facts["total"], seconds=time.perf_counter() - start,
                              rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
    """)


def test_671b_plan_counts_every_parameter_once(plan_671b):
    rows = plan_671b["rows"]
    assert len(rows) == 16 and plan_671b["total"] == TOTAL_671B
    # DualPipeV holds each piece once: the positions' replicated parameters plus 64 expert ranks' shards
    assert sum(r["replicated"] + 64 * r["experts"] for r in rows) == TOTAL_671B
    assert all(r["today_params"] == r["after_params"] == r["v3_params"] == r["replicated"] + r["experts"]
               for r in rows)


def test_671b_after_row_shards_as_v3_and_keeps_the_model_dtype(plan_671b):
    """ZeRO-1 at 2,048 ranks: master weights and gradients are V3's fp32 shards (replicated parameters
    over 128 ranks, expert shards over 2; the layouts' padding aside), AdamW's float32 moments twice
    that, and the float32 model's weights and gradients stay whole (8 B per parameter)."""
    for r in plan_671b["rows"]:
        shard = r["replicated"] / 128 + r["experts"] / 2
        assert 0 <= r["after_master_weights"] - 4 * shard < 4 * 128 * 4, r
        assert abs(r["after_master_weights"] - r["v3_master_weights"]) < 4 * 128 * 4
        assert r["after_master_gradients"] == r["after_master_weights"]
        assert 0 < r["after_optimizer_state"] - 2 * r["after_master_weights"] <= 4 * 4
        params = r["replicated"] + r["experts"]
        assert r["after_weights"] == r["after_gradients"] == r["today_weights"] == 4 * params


def test_671b_plan_is_quick_and_small(plan_671b):
    # the model's weights alone would be 2.7 TB in float32; nothing is materialised
    assert plan_671b["rss"] < 1.0e9, f"peak RSS {plan_671b['rss'] / 1e9:.2f} GB"
    assert plan_671b["seconds"] < 120


# ---------------------------------------------------------------------- tiny.yaml, built for real
def _layout(*flags: str) -> tuple[RunSettings, Layout]:
    args = parser().parse_args(["--config", TINY, *flags])
    run = RunSettings.load(args.config)
    return run, resolve(args, run)


def _materialised_position(position: int) -> dict:
    """tiny.yaml at P2 x E2 x D1, position ``position``: real CPU tensors, the strategies' functions, a
    real fused AdamW step."""
    run, _ = _layout()
    torch.manual_seed(0)
    module = DSV3LightningModule(run.model_config(), [], **run.module_kwargs())
    plan = build_plan("dualpipev", 2, 4)
    with fake_world(position * 2, 4):
        mesh = ParallelMesh.create(2, 2, 60.0)
        shards = mesh.shard_experts(module)
        runner = PipelineRunner(module, plan, mesh.pipeline_group, device=torch.device("cpu"))
        kept = runner.release_unowned()
        sync = GradientSync(module, mesh, shards, runner.owners)
        replicated, sharded = sync.replicated, sync.experts
        for p in replicated + sharded:
            p.grad = torch.randn_like(p)
        reduction = transient_bytes(sync.reduce, list(module.parameters()))
        optimizer = run.make_optimizer(module)
        assert optimizer.param_groups[0]["fused"]
        optimizer.step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        return dict(
            params=kept,
            replicated=sum(p.numel() for p in replicated),
            experts=sum(p.numel() for p in sharded),
            weights=sum(p.numel() * p.element_size() for p in module.parameters()),
            gradients=sum(
                p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None
            ),
            optimizer_state=state,
            reduction=reduction,
            tensors=len(replicated) + len(sharded),
        )


@pytest.mark.parametrize("position", [0, 1])
def test_tiny_plan_matches_the_shards_built_for_real(position):
    run, layout = _layout("--pipeline", "2", "--expert", "2", "--data", "1")
    planned = plan_positions(run, layout)[0][position]
    real = _materialised_position(position)
    assert (planned.state.replicated_params, planned.state.expert_params) == (
        real["replicated"],
        real["experts"],
    )
    today = planned.today
    assert today.params == real["params"]
    assert today.weights == real["weights"] and today.gradients == real["gradients"]
    assert today.optimizer_state == real["optimizer_state"]
    # the one difference: the has-grad flags (4 bytes per parameter tensor), made from a Python list,
    # which the meta run does not see allocated
    flags = 4 * real["tensors"]
    assert 0 <= real["reduction"] - planned.state.reduction["reduce_gradients"] <= flags
    assert planned.state.reduction["reduce_gradients"] > 0


# ---------------------------------------------------------------------- the after row: real ZeRO-1 on CPU
@pytest.fixture(scope="module")
def tiny_zero1_plan():
    run, layout = _layout("--pipeline", "2", "--expert", "2", "--data", "2")
    return plan_positions(run, layout)[0]


def _materialised_zero1(position: int) -> dict:
    """tiny.yaml at P2 x E2 x D2 (8 ranks), the first rank of position ``position``: real CPU tensors cut
    by the strategies' functions, the run's optimizer sharded by ``GradientSync.shard_optimizers`` as
    ParallelStrategy does with zero1, the real reduce-scatter, clipping, a real fused AdamW step and the
    all-gather (the fake backend moves no values: the sizes are what is checked)."""
    run, _ = _layout()
    torch.manual_seed(0)
    module = DSV3LightningModule(run.model_config(), [], **run.module_kwargs())
    with fake_world(position * 4, 8):
        mesh = ParallelMesh.create(2, 2, 60.0)
        shards = mesh.shard_experts(module)
        plan = build_plan("dualpipev", 2, 4)
        runner = PipelineRunner(module, plan, mesh.pipeline_group, device=torch.device("cpu"))
        runner.release_unowned()
        sync = GradientSync(module, mesh, shards, runner.owners)
        optimizer = run.make_optimizer(module)
        assert optimizer.param_groups[0]["fused"]
        zeros = sync.shard_optimizers([optimizer])
        masters = [fs.master for zero in zeros for fs in zero.layouts]
        params = sync.replicated + sync.experts
        for p in params:
            p.grad = torch.randn_like(p)
        gradients = sum(p.grad.numel() * p.grad.element_size() for p in params)
        with MetaRun(track=True) as probe:  # the plan's instrument, on real tensors
            probe.watch_gradients(params)
            probe.watch([*params, *masters])
            start = probe.live
            sync.reduce()
        master_grads = sum(m.grad.numel() * m.grad.element_size() for m in masters if m.grad is not None)
        model_grads_left = [p for p in module.parameters() if p.grad is not None]
        sync.clip(1.0)
        optimizer.step()
        sync.after_step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        return dict(
            weights=sum(p.numel() * p.element_size() for p in params),
            gradients=gradients,
            master_weights=sum(m.numel() * m.element_size() for m in masters),
            master_gradients=master_grads,
            optimizer_state=state,
            model_grads_left=len(model_grads_left),
            reduce_scatter_peak=probe.peak - start,
            sharded_over={fs.world for zero in zeros for fs in zero.layouts},
        )


@pytest.mark.parametrize("position", [0, 1])
def test_tiny_after_row_matches_a_real_zero1_step(tiny_zero1_plan, position):
    planned = tiny_zero1_plan[position]
    real = _materialised_zero1(position)
    after = planned.after
    assert after.weights == real["weights"] == planned.today.weights
    assert after.gradients == real["gradients"] == planned.today.gradients
    assert real["model_grads_left"] == 0, "the reduce-scatter frees the model's gradients"
    assert after.master_weights == real["master_weights"] > 0
    assert after.master_gradients == real["master_gradients"] > 0
    assert after.optimizer_state == real["optimizer_state"] > 0
    assert real["sharded_over"] == {4, 2}, "replicated parameters over the block, expert shards over dp"
    # AdamW: two float32 moments per owned element of the master shards, and a float32 step count per
    # layout (at most 2 param groups x 2 shard groups)
    assert 0 < after.optimizer_state - 2 * after.master_weights <= 4 * 4
    # the reduce-scatter's transient on meta (staging buckets and master gradients, less the model
    # gradients it frees) is the one it has on real tensors
    assert planned.state.after.reduce_scatter_peak == real["reduce_scatter_peak"] > 0
    assert after.reduction_buffers == max(planned.state.after.reduction.values())
    assert after.model_states < planned.today.model_states


def test_after_row_is_the_zero1_arithmetic_of_the_counts(tiny_zero1_plan):
    """Master weights and master gradients are 4 B per element of this rank's shards: replicated parameters
    over the block of E x D = 4, expert shards over D = 2, each layout padded to a multiple of its group."""
    for planned in tiny_zero1_plan:
        shard = planned.state.replicated_params / 4 + planned.state.expert_params / 2
        padding = 4 * 4 * 4  # at most 3 padding elements per layout; 2 param groups x 2 shard groups
        assert 0 <= planned.after.master_weights - 4 * shard < padding
        assert planned.after.master_gradients == planned.after.master_weights
        assert abs(planned.after.master_weights - planned.v3.master_weights) < padding  # V3's sharding


def _real_piece_bytes(module: DSV3LightningModule, piece, micro_batch: int, seq_len: int) -> int:
    """Saved-for-backward bytes of a real CPU forward of ``piece``, by data pointer (the plan counts by
    storage on meta), plus the stage's kept input and output."""
    params = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, module.config.vocab_size, (micro_batch, seq_len + 1))
    x = torch.randn(micro_batch, seq_len, module.config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = piece(x, tokens)
    for t in ([] if piece.is_first else [x]) + ([] if piece.is_last else [out]):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("recompute", [False, True])
def test_tiny_piece_activations_match_a_real_cpu_forward(recompute):
    run, _ = _layout()
    torch.manual_seed(0)
    module = DSV3LightningModule(
        run.model_config(), [], **{**run.module_kwargs(), "recompute_activations": recompute}
    )
    probe = PieceActivations(run.build_module(torch.float32), 2, 64, attention="math")  # CPU's path for MLA
    for piece in build_pieces(module, 4):
        planned = probe.piece_bytes(piece.layer_range, piece.is_first, piece.is_last, recompute=recompute)
        assert planned == _real_piece_bytes(module, piece, 2, 64), piece.layer_range


@pytest.mark.parametrize(
    ("schedule", "pp", "m"), [("dualpipev", 4, 8), ("1f1b", 4, 6), ("zb", 4, 8), ("dualpipe", 4, 8)]
)
def test_in_flight_replay_counts_as_the_simulator(schedule, pp, m):
    plan = build_plan(schedule, pp, m)
    sim = simulate(plan, ChunkCosts(F=1, B=2, W=1))
    for rank in range(pp):
        assert peak_activations(plan, rank, lambda stage: 1) == sim.ranks[rank].peak_activations


def test_reduction_buffers_match_the_process_rss():
    """The transient the plan measures on meta for two reductions in a row (replicated parameters, then
    expert shards, as the strategies call them) is what the process really allocates."""
    got = _run(
        """
        import json, os, threading, torch, torch.distributed as dist
        from dsv3_lightning.plugins.plan.probe import transient_bytes
        from dsv3_lightning.plugins.plan.today import fake_world
        from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
        from dsv3_lightning.plugins.parallel.grad_sync import reduce_mean
        groups = [[4_000_000, 2_000_000], [8_000_000, 6_000_000]]  # replicated, then expert shards
        meta = [[torch.nn.Parameter(torch.empty(n, device="meta")) for n in g] for g in groups]
        real = [[torch.nn.Parameter(torch.zeros(n)) for n in g] for g in groups]
        for p in [*meta[0], *meta[1], *real[0], *real[1]]:
            p.grad = torch.ones_like(p)
        page = os.sysconf("SC_PAGE_SIZE")
        def rss():  # the current resident set (ru_maxrss is a high-water mark that earlier frees may hide)
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        peak, done = [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
        with fake_world(0, 2):
            comm = Comm(dist.group.WORLD, 60.0, "test")
            def step(params):
                for group in params:
                    reduce_mean(group, comm, 2, bucket_bytes=40 * 2**20)
            planned = transient_bytes(lambda: step(meta), [*meta[0], *meta[1]])
            before = rss()
            sampler = threading.Thread(target=sample)
            sampler.start()
            step(real)
            done.set()
            sampler.join()
            print(json.dumps(dict(planned=planned, rss=peak[0] - before)))
    """,
        # a fixed threshold: every buffer here is mmapped and goes back to the system when freed (glibc
        # otherwise raises its threshold after a free, and freed heap memory may stay in the RSS)
        env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    )
    # one bucket at a time: the largest, 8M float32 elements (a bucket of 40 MiB holds the first group's
    # 6M and the second's 8M and 6M in two), plus a few bytes of has-grad flags; the reduced gradients
    # are views of their bucket, which replaces the old gradients
    assert 4 * 8_000_000 <= got["planned"] < 4 * 8_000_000 + 100, got
    assert abs(got["rss"] - got["planned"]) < 0.1 * got["planned"], got


def test_v3_model_shards_states_over_the_replicas():
    m = zero1_memory(1000, 64, 4, 2, activations_per_microbatch=10, activations=30)
    assert (m.weights, m.gradients) == (2 * 1064, 4 * 1064)
    assert m.master_weights == m.optimizer_state == 4 * 1000 / 8 + 4 * 64 / 2  # fp32 master, bf16 moments
    assert m.master_gradients == 0 and m.model_states == 6 * 1064 + 2 * m.master_weights
    assert m.reduction_buffers == 0 and m.in_flight == 3 and m.total == m.model_states + 30


def test_dsv3_plan_prints_a_table_per_distinct_rank(capsys):
    dsv3(["plan", "--config", TINY, "--pipeline", "2", "--expert", "2"])
    out = capsys.readouterr().out
    assert "PP2 x EP2 x DP1 (4 ranks)" in out
    assert out.count("| today |") == 2 and out.count("| V3 ZeRO-1 model |") == 2
    assert out.count("| after: ZeRO-1 (zero1: true) |") == 2
    assert "| master weights | optimizer state | master gradients |" in out
    assert "### pipeline rank 0 " in out and "### pipeline rank 1 " in out


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (
            ["--expert", "3"],
            r"dsv3 plan --expert 3: model.config.n_routed_experts \(16.*"
            r"divisible by.*expert_parallel_size \(3\)",
        ),
        (
            ["--pipeline", "3"],
            r"dsv3 plan --pipeline 3: model.config.num_hidden_layers \(4\) is smaller than the number "
            r"of pipeline stages \(6",
        ),
        (
            ["--devices", "6", "--pipeline", "2", "--expert", "2"],
            r"dsv3 plan --devices 6 --pipeline 2 --expert 2: .*\(6\) must be a multiple of .* = 4",
        ),
        (
            ["--devices", "8", "--data", "3", "--pipeline", "2"],
            r"dsv3 plan --devices 8 --data 3: the world is --pipeline x --expert x --data",
        ),
        (
            ["--pipeline", "2", "--microbatches", "3"],
            r"--microbatches 3: .*num_microbatches \(3\) must be >= 2 \* pipeline_parallel_size \(4\)",
        ),
        (
            ["--pipeline", "2", "--schedule", "gpipe"],
            r"--schedule gpipe .*schedule \('gpipe'\) is not one of",
        ),
        (["--pipeline", "0"], r"dsv3 plan --pipeline 0: must be >= 1"),
        (["--micro_batch", "0"], r"dsv3 plan --micro_batch 0: must be >= 1"),
        (
            ["--seq_len", "5000"],
            r"dsv3 plan --seq_len 5000: longer than model.config.max_position_embeddings \(1024\)",
        ),
    ],
)
def test_bad_layouts_name_the_flag_and_the_fix(flags, match):
    with pytest.raises(ValueError, match=match):
        run, layout = _layout(*flags)
        plan_positions(run, layout)
    assert not dist.is_initialized()


def test_a_missing_config_is_named():
    with pytest.raises(ValueError, match=r"dsv3 plan --config nowhere.yaml: no such file"):
        RunSettings.load(["nowhere.yaml"])
