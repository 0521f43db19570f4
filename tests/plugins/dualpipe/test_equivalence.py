"""Every schedule on 2 and 4 gloo processes = one process: losses equal, gradients within 1e-6 relative.

Each spawned group runs all its schedules in turn on the tiny MoE + MTP model (float32) and writes,
per rank, the losses of the micro-batches whose last stage it holds, the gradients of the parameters
it uses (after the pipeline's gradient sum) and the action lists its schedule object ran.
"""

from __future__ import annotations

import os

import pytest
import torch
from dsv3_lightning.plugins.dualpipe.plans import build_plan
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, simulate
from dualpipe_tiny import assert_gradients_match, make_module, make_tokens, reference, runs_per_world

CASES = {  # world size -> (schedule, num_microbatches, num_hidden_layers); "dualpipe-BF": pairs run B first
    2: [("1f1b", 4, 4), ("zb", 4, 4), ("dualpipev", 4, 4), ("dualpipe", 4, 4), ("dualpipe-BF", 8, 4)],
    4: [("1f1b", 8, 4), ("zb", 8, 4), ("dualpipev", 8, 8), ("dualpipe", 8, 4)],
}
BATCH = 8


def _worker(rank: int, world: int, out_dir: str) -> None:
    tokens = make_tokens(BATCH)
    for schedule, m, layers in CASES[world]:
        module = make_module(layers)
        runner = PipelineRunner(module, build_plan(schedule.split("-")[0], world, m))
        pairs = []
        if schedule.endswith("-BF"):  # a first step builds the runtime (and the second is tested)
            runner.run_schedule(tokens)
            module.zero_grad(set_to_none=True)
            runner._schedule.overlap = lambda rt, f, b, pairs=pairs: (
                pairs.append((f, b)),
                rt.run_action(b),
                rt.run_action(f),
            )
        losses = runner.run_schedule(tokens)
        runner.sync_gradients()
        mine = runner.local_parameter_names()
        grads = {
            n: p.grad.clone() for n, p in module.named_parameters() if n in mine and p.grad is not None
        }
        unowned = [n for n, p in module.named_parameters() if n not in mine and p.grad is not None]
        torch.save(
            {
                "losses": losses,
                "grads": grads,
                "unowned": unowned,
                "order": runner.pipeline_order,
                "pairs": len(pairs),
            },
            os.path.join(out_dir, f"{schedule}-{rank}.pt"),
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> the folder of its results; each process group runs once, on first use."""
    return runs_per_world(tmp_path_factory, _worker, "pp")


ALL = [(world, i) for world in CASES for i in range(len(CASES[world]))]
IDS = [f"{world}procs-{CASES[world][i][0]}" for world, i in ALL]


@pytest.mark.parametrize("world,index", ALL, ids=IDS)
def test_losses_and_gradients_match_one_process(runs, world, index):
    out = runs(world)
    schedule, m, layers = CASES[world][index]
    want_losses, want_grads = reference(make_module(layers), make_tokens(BATCH), m)
    results = [torch.load(out / f"{schedule}-{r}.pt", weights_only=False) for r in range(world)]
    losses = {}
    for res in results:
        losses.update(res["losses"])
        assert res["unowned"] == [], "a rank computed gradients for pieces it does not hold"
    assert sorted(losses) == list(range(m))
    torch.testing.assert_close(torch.stack([losses[i] for i in range(m)]), want_losses, rtol=0, atol=0)
    assert_gradients_match([res["grads"] for res in results], want_grads, 1e-6, schedule)
    if schedule.endswith("-BF"):  # the overlap hook ran every pair (backward first, still exact)
        plan = build_plan("dualpipe", world, m)
        assert [r["pairs"] for r in results] == [
            sum(a.computation_type.value == "OVERLAP_F_B" for a in plan.actions[r]) for r in range(world)
        ]
        assert min(r["pairs"] for r in results) > 0


@pytest.mark.parametrize("world,index", ALL, ids=IDS)
def test_the_schedule_ran_the_planned_action_lists(runs, world, index):
    out = runs(world)
    case, m, _ = CASES[world][index]
    plan = build_plan(case.split("-")[0], world, m)
    ran = torch.load(out / f"{case}-0.pt", weights_only=False)["order"]
    assert {r: [str(a) for a in acts] for r, acts in ran.items()} == {
        r: [str(a) for a in acts] for r, acts in plan.actions.items()
    }
    simulate(plan, ChunkCosts(F=1, B=2, W=1))  # the lists the strategy ran are the simulator's input
