"""ZeRO-1 (plugins/parallel/zero.py) against a single process stepping the same optimizer on the global
batch's gradient.

The setting mirrors expert parallelism without its all-to-all: rank r = (d, e) of W = D·E ranks holds
the replicated parameters and expert row e of ``experts`` [E, 8, 8], and backpropagates its loss L_r.
The global loss L = (1/W) Σ_r L_r gives replicated grads Σ_world / W (shard group over the world)
and expert row e's grad Σ_{data group e} / W (shard group over D ranks, divisor W != D). ``unused``
never has a gradient; ``extra`` only on rank 0 at step 0. Two param groups differ in lr and weight
decay; small buckets split parameters across buckets and ranks.
"""

from __future__ import annotations

import importlib.util
import math
import resource
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.fp8.optim import AdamWBF16
from dsv3_lightning.plugins.parallel.zero import MASTER, Chunk, ShardGroup, Zero1
from torch import nn

_spec = importlib.util.spec_from_file_location(
    "zero_ep_launch", Path(__file__).parents[1] / "expert_parallel" / "ep_launch.py"
)
_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_launch)

MAX_NORM = 0.05
GROUP_A = ("lin1.weight", "lin2.weight", "unused.weight", "experts")  # lr 1e-2, weight decay 0.1
ALWAYS_GRAD = ("lin1.weight", "lin1.bias", "lin2.weight", "lin2.bias", "experts")


def initial(num_experts: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "lin1.weight": (16, 8), "lin1.bias": (16,), "lin2.weight": (8, 16), "lin2.bias": (8,),
        "unused.weight": (8, 8), "unused.bias": (8,), "extra": (8,), "experts": (num_experts, 8, 8),
    }  # fmt: skip
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()}


def rank_loss(p: dict[str, torch.Tensor], expert_8x8: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    h = torch.relu(x @ p["lin1.weight"].T + p["lin1.bias"]) @ p["lin2.weight"].T + p["lin2.bias"]
    out = h @ expert_8x8
    if rank == 0 and step == 0:
        out = out + p["extra"]
    return (out - y).square().mean()


def make_optimizer(kind: str, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for n, p in params.items() if n in GROUP_A], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [p for n, p in params.items() if n not in GROUP_A], "lr": 2e-2, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95)) if kind == "adamw" else AdamWBF16(groups)


def reference(kind: str, world: int, num_experts: int, steps: int) -> dict:
    params = {n: nn.Parameter(t.clone()) for n, t in initial(num_experts).items()}
    optimizer = make_optimizer(kind, params)
    norms, lin1, snapshots = [], [], []
    for step in range(steps):
        losses = [rank_loss(params, params["experts"][r % num_experts], r, step) for r in range(world)]
        loss = sum(losses) / world
        loss.backward()
        lin1.append(sum(float(params[n].grad.double().square().sum()) for n in ("lin1.weight", "lin1.bias")))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        state = {
            n: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for n, p in params.items()
        }
        snapshots.append(({n: p.detach().clone() for n, p in params.items()}, state))
    return {"norms": norms, "lin1": lin1, "snapshots": snapshots}


def rank_run(
    rank: int,
    world: int,
    kind: str,
    num_experts: int,
    steps: range,
    bucket_bytes: int,
    load=None,
    batch_world: int | None = None,
):
    """``load``: (parameters, {name: {key: full 1-D tensor | scalar}}) to resume from; ``batch_world``
    (default ``world``): the global batch is that many ranks' batches, rank r backpropagates those of
    ranks r, r + world, ... (all with its expert, as ``world`` is a multiple of ``num_experts``)."""
    batch_world = batch_world or world
    torch.set_num_threads(1)
    e = rank % num_experts
    start = load[0] if load else initial(num_experts)
    local = {n: nn.Parameter(t.clone()) for n, t in start.items() if n != "experts"}
    local["experts"] = nn.Parameter(start["experts"][e : e + 1].clone())
    data_groups = [dist.new_group(list(range(k, world, num_experts))) for k in range(num_experts)]
    optimizer = make_optimizer(kind, local)
    replicated = [(n, p) for n, p in local.items() if n != "experts"]
    zero = Zero1(
        optimizer,
        [
            ShardGroup(label="replicated", params=replicated, group=dist.group.WORLD, divisor=batch_world),
            ShardGroup(label="experts", params=[("experts", local["experts"])], group=data_groups[e],
                       divisor=batch_world),  # fmt: skip
        ],
        bucket_bytes=bucket_bytes,
        global_ranges={"experts": (e * 64, num_experts * 64)},
    )
    if load:
        full = load[1]
        ranges = zero.owned_ranges()
        cut = {name: {k: v[r.global_offset : r.global_offset + r.numel] if v.dim() == 1 else v
                      for k, v in full[name].items()}
               for name, r in ranges.items()}  # fmt: skip
        zero.load_state_chunks(cut)
    norms, lin1 = [], []
    for step in steps:
        losses = [rank_loss(local, local["experts"][0], v, step) for v in range(rank, batch_world, world)]
        sum(losses).backward()
        zero.reduce_scatter_gradients()
        assert all(p.grad is None for p in local.values()), "model gradients are freed"
        squared = zero.local_squared_norm(lambda name: name.startswith("lin1."))
        dist.all_reduce(squared)
        lin1.append(float(squared))
        norms.append(float(zero.clip_grad_norm_(MAX_NORM, None)))
        optimizer.step()
        zero.all_gather_parameters()
        optimizer.zero_grad()
    chunks = {
        n: {k: Chunk(v.values.clone(), v.global_numel, v.global_offset) if isinstance(v, Chunk) else v
            for k, v in entry.items()}
        for n, entry in zero.state_chunks().items()
    }  # fmt: skip
    params = {n: p.detach().clone() for n, p in local.items()}
    return {"params": params, "norms": norms, "lin1": lin1, "chunks": chunks}


def run(world: int, *args, **kwargs) -> list[dict]:
    results = _launch.run_ranks(world, rank_run, *args, **kwargs)
    assert sorted(results) == list(range(world)), results
    errors = [v for status, v in results.values() if status != "ok"]
    assert not errors, errors[0]
    return [results[r][1] for r in range(world)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_parameters(ranks: list[dict], expected: dict[str, torch.Tensor], num_experts: int, rtol: float):
    worst = 0.0
    for rank, result in enumerate(ranks):
        for name, value in result["params"].items():
            e = rank % num_experts
            want = expected[name][e : e + 1] if name == "experts" else expected[name]
            if name.startswith("unused"):
                assert torch.equal(value, initial(num_experts)[name]), f"{name} without gradients moved"
                continue
            worst = max(worst, relative_error(value, want))
    assert worst <= rtol, f"parameters differ by {worst:.2e} relative (bound {rtol})"
    return worst


@pytest.mark.parametrize(
    ("world", "num_experts", "bucket_bytes"), [(2, 2, 256), (4, 2, 256), (4, 2, 50 * 2**20)]
)
def test_adamw_matches_a_single_process(world, num_experts, bucket_bytes):
    ref = reference("adamw", world, num_experts, 3)
    assert all(n > MAX_NORM for n in ref["norms"]), "the test must clip"
    ranks = run(world, "adamw", num_experts, range(3), bucket_bytes)
    for result in ranks:
        for ours, theirs in zip(result["norms"], ref["norms"]):
            assert math.isclose(ours, theirs, rel_tol=1e-6), (ours, theirs)
        for ours, theirs in zip(result["lin1"], ref["lin1"]):  # local_squared_norm(counted)
            assert math.isclose(ours, theirs, rel_tol=1e-6), (ours, theirs)
    # seen: 4e-8 to 7e-8 (the ranks' gradients summed in another order), norms 5e-8 to 9e-8
    check_parameters(ranks, ref["snapshots"][-1][0], num_experts, rtol=1e-6)


def test_adamw_bf16_matches_a_single_process():
    """Looser: a moment rounded to bfloat16 (8 bits of mantissa) rounds the other way when the reduced
    gradient differs in its last float32 bits, which changes that element's update by up to 2^-8 of
    lr = 1e-2, 4e-5, about 3e-5 of a weight's norm here; 1e-4 allows a few such flips. Seen: 4e-8
    (none flipped)."""
    ref = reference("bf16", 4, 2, 3)
    ranks = run(4, "bf16", 2, range(3), 256)
    check_parameters(ranks, ref["snapshots"][-1][0], 2, rtol=1e-4)


def reassemble(ranks: list[dict]) -> dict[str, dict[str, torch.Tensor | list]]:
    """Full 1-D state per (name, key) from every rank's chunks; scalars as the list of the ranks'."""
    full: dict[str, dict] = {}
    covered: dict[tuple[str, str], torch.Tensor] = {}
    for result in ranks:
        for name, entry in result["chunks"].items():
            for key, value in entry.items():
                if isinstance(value, Chunk):
                    zeros = torch.zeros(value.global_numel, dtype=value.values.dtype)
                    t = full.setdefault(name, {}).setdefault(key, zeros)
                    seen = covered.setdefault((name, key), torch.zeros(value.global_numel, dtype=torch.int64))
                    t[value.global_offset : value.global_offset + value.values.numel()] = value.values
                    seen[value.global_offset : value.global_offset + value.values.numel()] += 1
                else:
                    full.setdefault(name, {}).setdefault(key, []).append(value)
    for (name, key), seen in covered.items():
        assert torch.all(seen == 1), f"{name}[{key}] not covered exactly once: {seen.tolist()}"
    return full


def test_state_chunks_reassemble_and_resume_on_another_world_size():
    ref = reference("adamw", 4, 2, 3)
    saved = run(4, "adamw", 2, range(2), 256)
    full = reassemble(saved)
    params_2, state_2 = ref["snapshots"][1]
    assert set(full) == set(initial(2)), "every parameter has chunks"
    for name in full:
        for key in ("exp_avg", "exp_avg_sq"):
            want = state_2[name][key].flatten() if key in state_2[name] else torch.zeros_like(full[name][key])
            if want.any():
                assert relative_error(full[name][key], want) <= 1e-6, (name, key)
            else:  # never a gradient: the reference has no state, ours zeros
                assert torch.equal(full[name][key], want), (name, key)
        if name in ALWAYS_GRAD:
            assert all(float(s) == float(state_2[name]["step"]) for s in full[name]["step"])
    assert MASTER not in full["lin1.weight"], "float32 parameters are their own master weights"

    # 4 ranks' chunks, cut into 2 ranks' ranges (one expert per rank, each its own data group), the
    # same global batch (each rank backpropagates two of the 4 ranks' batches)
    state = {n: {k: v if torch.is_tensor(v) else max(v) for k, v in e.items()} for n, e in full.items()}
    resumed = run(2, "adamw", 2, range(2, 3), 256, (params_2, state), 4)
    check_parameters(resumed, ref["snapshots"][2][0], 2, rtol=1e-6)


def test_bfloat16_model_parameters_float32_masters():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    w = nn.Parameter(torch.randn(5, 3).to(torch.bfloat16))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    zero = Zero1(optimizer, [ShardGroup(label="all", params=[("w", w)], group=dist.group.WORLD, divisor=1)])
    master = optimizer.param_groups[0]["params"][0]
    assert master.dtype == torch.float32 and master.shape == (15,)
    w.sum().backward()
    zero.reduce_scatter_gradients()
    assert w.grad is None and master.grad.dtype == torch.float32
    optimizer.step()
    zero.all_gather_parameters()
    assert w.dtype == torch.bfloat16 and torch.equal(w.detach().flatten(), master.detach().to(torch.bfloat16))
    assert not torch.equal(master.detach(), w.detach().flatten().float()), "the master keeps float32 bits"
    assert torch.equal(zero.state_chunks()["w"][MASTER].values, master.detach())


def test_meta_model_under_a_fake_world_of_64_allocates_nothing():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=64)
    data_group = dist.new_group([r for r in range(64) if r % 8 == 5])  # 8 data-parallel ranks
    replicated = [(f"layer{i}", nn.Parameter(torch.empty(8192, 8192, device="meta"))) for i in range(16)]
    experts = ("experts", nn.Parameter(torch.empty(4, 4096, 2048, device="meta")))  # 4.4 GB in all
    optimizer = AdamWBF16([p for _, p in [*replicated, experts]])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = int(Path("/proc/self/statm").read_text().split()[1])
    zero = Zero1(
        optimizer,
        [
            ShardGroup(label="replicated", params=replicated, group=dist.group.WORLD, divisor=64),
            ShardGroup(label="experts", params=[experts], group=data_group, divisor=64),
        ],
    )
    memory = zero.memory()
    grown = (int(Path("/proc/self/statm").read_text().split()[1]) - before) * resource.getpagesize()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kb
    assert grown < 50 * 2**20 and peak_kb < 50 * 2**10, (grown, peak_kb)
    owned = math.ceil(16 * 8192**2 / 64) + 4 * 4096 * 2048 // 8
    assert memory.master_weights == 4 * owned == memory.master_gradients
    assert memory.optimizer_state == zero.state_bytes() == 4 * owned, "AdamWBF16: two bf16 moments"
    assert memory.reduction_buffers == 2 * 50 * 2**20
    assert not optimizer.state, "the probe step leaves the optimizer without state"


def one_rank(**kwargs):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2, 3))
    return a, b


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda a, b: (torch.optim.AdamW([{"params": [a]}, {"params": [b]}]), [[("a", a)]]), "no shard group"),
        (lambda a, b: (torch.optim.AdamW([a, b]), [[("a", a), ("b", b), ("a2", a)]]), "in two shard groups"),
        (lambda a, b: (torch.optim.AdamW([a, b]), [[("a", a)], [("a", b)]]), "names must be unique"),
        (lambda a, b: (torch.optim.AdamW([c := nn.Parameter(b.detach().T)]), [[("c", c)]]), "not contiguous"),
        (
            lambda a, b: (
                torch.optim.AdamW([a, m := nn.Parameter(torch.empty(2, device="meta"))]),
                [[("a", a), ("m", m)]],
            ),
            "on several devices",
        ),
    ],
)
def test_errors(build, match):
    a, b = one_rank()
    optimizer, groups = build(a, b)
    before = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    with pytest.raises(ValueError, match=match):
        Zero1(optimizer, [ShardGroup(label=f"g{i}", params=g, group=dist.group.WORLD, divisor=1) for i, g in
                          enumerate(groups)])  # fmt: skip
    assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == before, "left untouched"


def test_errors_of_arguments():
    a, b = one_rank()
    group = [ShardGroup(label="g", params=[("a", a), ("b", b)], group=dist.group.WORLD, divisor=1)]
    with pytest.raises(ValueError, match=r"divisor \(0\) must be > 0"):
        ShardGroup(label="g", params=[], group=dist.group.WORLD, divisor=0)
    with pytest.raises(ValueError, match=r"bucket_bytes \(2\) must be at least"):
        Zero1(torch.optim.AdamW([a, b]), group, bucket_bytes=2)
    with pytest.raises(ValueError, match=r"global_ranges\['b'\] = \(2, 7\) does not hold"):
        Zero1(torch.optim.AdamW([a, b]), group, global_ranges={"b": (2, 7)})
    zero = Zero1(torch.optim.AdamW([a, b]), group)
    with pytest.raises(ValueError, match=r"chunk 'b'\['exp_avg'\] has 5 elements; this rank owns 6"):
        zero.load_state_chunks({"a": {"exp_avg": torch.zeros(4)}, "b": {"exp_avg": torch.zeros(5)}})
    with pytest.raises(ValueError, match=r"lack parameters \['b'\]"):
        zero.load_state_chunks({"a": {"exp_avg": torch.zeros(4)}})
    keys = r"chunks of 'b' have keys \['exp_avg'\], those of 'a' \['exp_avg', 'step'\]"
    unlike = {"a": {"exp_avg": torch.zeros(4), "step": 1}, "b": {"exp_avg": torch.zeros(6)}}
    with pytest.raises(ValueError, match=keys):
        zero.load_state_chunks(unlike)


def test_warnings():
    a, b = one_rank()
    optimizer = torch.optim.AdamW([a])
    a.grad = torch.ones_like(a)
    optimizer.step()
    with pytest.warns(UserWarning, match="existing state is discarded"):
        with pytest.warns(UserWarning, match=r"1 parameters of the shard groups are not optimized: \['b'\]"):
            Zero1(optimizer, [ShardGroup(label="g", params=[("a", a), ("b", b)], group=dist.group.WORLD,
                                         divisor=1)])  # fmt: skip
    assert not optimizer.state
