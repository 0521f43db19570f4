"""Schedules as action lists and the simulator: DeepSeek's bubble table (SPEC.md §7.1) from our lists."""

from __future__ import annotations

from collections import Counter

import pytest
from dsv3_lightning.plugins.dualpipe.plans import SCHEDULES, build_plan
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, ScheduleDeadlock, simulate
from dsv3_lightning.plugins.dualpipe.torch_pipelining import OVERLAP_F_B, Action

# The paper's formulas count a backward's input part as one forward (B - W = F); F&B may be anything
# from max(F, B) (perfect overlap) to F + B (none).
PAPER_COSTS = [ChunkCosts(F=1, B=2, W=1, FB=fb) for fb in (2, 2.5, 3)] + [ChunkCosts(F=2, B=3, W=1, FB=4)]


def ranks_for(schedule: str, pp: int) -> int:
    return pp // 2 if schedule == "dualpipev" else pp  # DualPipeV: PP stages on PP/2 devices


def formula(schedule: str, pp: int, c: ChunkCosts) -> float:
    return {
        "1f1b": (pp - 1) * (c.F + c.B),
        "zb": (pp - 1) * (c.F + c.B - 2 * c.W),
        "dualpipe": (pp / 2 - 1) * (c.FB + c.B - 3 * c.W),
        "dualpipev": (pp / 2 - 1) * (c.FB + c.B - 3 * c.W),
    }[schedule]


def flat(actions: list[Action]) -> list[Action]:
    return [p for a in actions for p in (a.sub_actions if a.computation_type == OVERLAP_F_B else (a,))]


@pytest.mark.parametrize("pp", [4, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("costs", PAPER_COSTS, ids=str)
def test_simulated_bubble_is_the_papers_formula(schedule, pp, costs):
    sim = simulate(build_plan(schedule, ranks_for(schedule, pp), 20), costs)
    assert sim.bubble == pytest.approx(formula(schedule, pp, costs), abs=1e-9)


@pytest.mark.parametrize("pp", [4, 8])
def test_activation_and_parameter_columns(pp):
    for schedule, want in [("1f1b", pp), ("zb", pp), ("dualpipe", pp + 1), ("dualpipev", pp + 1)]:
        plan = build_plan(schedule, ranks_for(schedule, pp), 20)
        assert simulate(plan, PAPER_COSTS[1]).peak_activations == want, schedule
        stages_per_rank = len(plan.layout.stages_of(0))
        assert stages_per_rank * pp / plan.layout.num_pieces == (2 if schedule.startswith("dual") else 1)


def test_dualpipe_bubble_does_not_grow_with_microbatches():
    c = PAPER_COSTS[1]
    bubbles = {m: simulate(build_plan("dualpipe", 4, m), c).bubble for m in (8, 20, 40)}
    assert len(set(bubbles.values())) == 1, bubbles
    assert simulate(build_plan("1f1b", 4, 20), c).bubble > bubbles[20]


def test_formula_is_an_upper_bound_when_input_backward_exceeds_forward():
    """Outside B - W = F the table is an approximation; DualPipe then does better, never worse."""
    c = ChunkCosts(F=1, B=3, W=1, FB=3.5)
    for pp in (4, 8):
        got = simulate(build_plan("dualpipe", pp, 20), c).bubble
        assert 0 < got < formula("dualpipe", pp, c)


@pytest.mark.parametrize(
    "schedule,ranks,m",
    [
        ("dualpipe", 2, 4),
        ("dualpipe", 4, 20),
        ("dualpipe", 6, 14),
        ("dualpipev", 3, 6),
        ("1f1b", 3, 5),
        ("zb", 4, 8),
    ],
)
def test_every_stage_runs_every_microbatch_once_in_dependency_order(schedule, ranks, m):
    plan = build_plan(schedule, ranks, m)
    layout = plan.layout
    per_chain = m // len(layout.chains)
    for rank, actions in plan.actions.items():
        parts = flat(actions)
        assert {p.stage_index for p in parts} == set(layout.stages_of(rank))
        count = Counter((p.stage_index, p.computation_type.value) for p in parts)
        for stage in layout.stages_of(rank):
            assert count[(stage, "F")] == per_chain
            assert count[(stage, "B")] + count[(stage, "I")] == per_chain
            assert count[(stage, "W")] == count[(stage, "I")]
    simulate(plan, PAPER_COSTS[0])  # raises ScheduleDeadlock if any rank waits forever


def test_dualpipe_matches_torch_dualpipev_bubble_and_is_bidirectional():
    plan = build_plan("dualpipe", 4, 20)
    assert plan.layout.chains == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert (
        plan.layout.stages_of(0) == [0, 7] and plan.layout.piece(7) == 3
    )  # rank 0 also runs piece 3 backwards
    first = {plan.actions[r][0] for r in (0, 3)}
    assert first == {Action(0, "F", 0), Action(4, "F", 10)}  # micro-batches enter at both ends
    for c in PAPER_COSTS:
        assert simulate(plan, c).bubble == simulate(build_plan("dualpipev", 2, 20), c).bubble  # PP = 4 stages


def test_simulator_reports_a_deadlock():
    plan = build_plan("1f1b", 2, 2)
    broken = {0: plan.actions[0], 1: list(reversed(plan.actions[1]))}
    with pytest.raises(ScheduleDeadlock, match="deadlocks; next actions per rank"):
        simulate(type(plan)(plan.schedule, 2, plan.layout, broken), PAPER_COSTS[0])


@pytest.mark.parametrize(
    "schedule,pp,m,match",
    [
        (
            "dualpipe",
            3,
            12,
            r"pipeline_parallel_size \(3\) must be even for schedule 'dualpipe'.*use 4 or 2, or schedule 'dualpipev'",
        ),
        (
            "dualpipe",
            4,
            7,
            r"num_microbatches \(7\) must be even and >= 2 \* pipeline_parallel_size \(8\).*set it to 8",
        ),
        ("dualpipe", 4, 6, r"num_microbatches \(6\).*set it to 8"),
        ("dualpipe", 4, 11, r"num_microbatches \(11\) must be even.*set it to 12"),
        (
            "dualpipev",
            4,
            6,
            r"num_microbatches \(6\) must be >= 2 \* pipeline_parallel_size \(8\).*at least 8",
        ),
        ("1f1b", 4, 3, r"num_microbatches \(3\) must be >= pipeline_parallel_size \(4\)"),
        (
            "zb",
            4,
            9,
            r"num_microbatches \(9\) does not fit schedule 'zb'.*multiple of num_microbatches // 4 \(2\); set it to 10",
        ),
        ("gpipe", 4, 8, r"schedule \('gpipe'\) is not one of"),
        ("1f1b", 1, 8, r"pipeline_parallel_size \(1\) must be >= 2"),
    ],
)
def test_bad_sizes_raise_with_the_fix(schedule, pp, m, match):
    with pytest.raises(ValueError, match=match):
        build_plan(schedule, pp, m)


def test_measured_chunk_costs_feed_the_simulator():
    from dsv3_lightning.plugins.dualpipe.costs import measure_chunk_costs
    from dualpipe_tiny import make_module, make_tokens

    costs, raw = measure_chunk_costs(make_module(), make_tokens(2), layers=(1, 2), repeats=2)
    assert set(raw) == {"F", "B", "I", "W"} and min(raw.values()) > 0
    assert 0 < costs.W <= costs.B and costs.F > 0
    sims = {s: simulate(build_plan(s, 4, 20), costs).bubble for s in ("1f1b", "zb", "dualpipe")}
    assert sims["1f1b"] == pytest.approx(3 * (costs.F + costs.B))  # exact for any costs
    assert sims["dualpipe"] < sims["1f1b"] and sims["zb"] < sims["1f1b"]
