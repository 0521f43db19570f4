"""Schedules as action lists: ``build_plan("dualpipev", pipeline_parallel_size=4, num_microbatches=20)``.

A ``SchedulePlan`` is what the strategy runs and what the simulator reads: the layout (layout.py)
and, for every pipeline rank, its compute actions in torch.distributed.pipelining's action
notation (``Action``, torch_pipelining.py) (``2F5`` = forward of stage 2 on micro-batch 5; ``I`` input-gradient backward, ``W``
weight-gradient backward, ``B`` both; ``(0F7;7B3)OVERLAP_F_B`` a forward paired with a backward).

    schedule    action lists from                                   runtime
    1f1b        ours (baseline_actions.py; torch's Schedule1F1B     torch ActionListRuntime
                reports lists that it does not run)
    zb          torch ScheduleInterleavedZeroBubble, 1 stage/rank   torch ActionListRuntime
                (torch's ZB1P, i.e. ZB-H1)
    dualpipev   torch ScheduleDualPipeV                             torch ActionListRuntime
    dualpipe    ours (dualpipe_actions.py)                          ours (runtime.py)

torch computes its lists in the schedule constructors from the stages' ``stage_index``,
``num_stages``, ``group_size`` and ``group_rank`` only; ``torch_pipeline_order`` builds the schedule
on light stand-ins for the stages, so the lists come from torch's own code without processes. At run
time the strategy reads ``schedule.pipeline_order`` of the schedule it really steps (the same lists).

Each constraint below is the schedule's own (torch's checks, DualPipe's asserts), raised before any
process group exists, with the YAML key and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from dsv3_lightning.plugins.dualpipe.baseline_actions import one_f_one_b_actions
from dsv3_lightning.plugins.dualpipe.dualpipe_actions import dualpipe_actions
from dsv3_lightning.plugins.dualpipe.layout import (
    PipelineLayout,
    bidirectional_layout,
    linear_layout,
    v_layout,
)
from torch import nn
from dsv3_lightning.plugins.dualpipe.torch_pipelining import Action, ScheduleDualPipeV, ScheduleInterleavedZeroBubble

Schedule = Literal["dualpipev", "dualpipe", "1f1b", "zb"]
"""The schedules ``trainer.strategy.init_args.schedule`` takes (``--help`` lists them)."""
_KEY = "trainer.strategy.init_args"


@dataclass(frozen=True)
class SchedulePlan:
    schedule: str
    """A name of ``SCHEDULES``, or a strategy subclass's own (its lists then run on torch's runtime)."""
    num_microbatches: int
    layout: PipelineLayout
    actions: dict[int, list[Action]]
    """Pipeline rank -> compute actions in execution order (no idle slots, no communication)."""

    def format(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, a)) for r, a in sorted(self.actions.items()))


def _check_dualpipe(pp: int, m: int) -> None:
    if pp % 2:
        raise ValueError(
            f"{_KEY}.pipeline_parallel_size ({pp}) must be even for schedule 'dualpipe' (ranks pair up as "
            f"r and {pp}-1-r); use {pp + 1} or {pp - 1}, or schedule 'dualpipev', which takes any size"
        )
    if m % 2 or m < 2 * pp:
        raise ValueError(
            f"{_KEY}.num_microbatches ({m}) must be even and >= 2 * pipeline_parallel_size ({2 * pp}) for "
            f"schedule 'dualpipe' (half enter at each end); set it to {max(2 * pp, m + m % 2)}"
        )


def _check_dualpipev(pp: int, m: int) -> None:
    if m < 2 * pp:
        raise ValueError(
            f"{_KEY}.num_microbatches ({m}) must be >= 2 * pipeline_parallel_size ({2 * pp}) for schedule "
            f"'dualpipev' (2 stages per rank); set it to at least {2 * pp}"
        )


def _check_1f1b(pp: int, m: int) -> None:
    if m < pp:
        raise ValueError(
            f"{_KEY}.num_microbatches ({m}) must be >= pipeline_parallel_size ({pp}) for schedule '1f1b'; "
            f"set it to at least {pp}"
        )


def _check_zb(pp: int, m: int) -> None:
    rounds = max(1, m // pp)
    if m < pp or m % rounds:
        good = next(k for k in range(max(m, pp), 4 * max(m, pp)) if k % max(1, k // pp) == 0)
        raise ValueError(
            f"{_KEY}.num_microbatches ({m}) does not fit schedule 'zb' (torch's ZB1P): it must be >= "
            f"pipeline_parallel_size ({pp}) and a multiple of num_microbatches // {pp} ({rounds}); "
            f"set it to {good}"
        )


@dataclass(frozen=True)
class ScheduleSpec:
    """What the runner, the strategy and the tools need to know of one schedule."""

    layout: Callable[[int], PipelineLayout]
    check: Callable[[int, int], None]
    """(pipeline_parallel_size, num_microbatches) -> None, or a ValueError naming the YAML key and the fix."""
    lists: Literal["ours", "torch"]
    """Who writes the action lists: this package (``ours``), or the constructor of ``torch_class``."""
    runtime: Literal["ours", "torch"]
    """Who runs them: BidirectionalRuntime (``ours``; tells messages apart by tag: gloo only) or torch's
    action-list runtime."""
    torch_class: type | None = None
    pairs: bool = False
    """Has (F;B) pairs, whose chunks the overlap can run in turns (then on our runtime)."""

    @property
    def min_microbatches_per_rank(self) -> int:
        """Micro-batches per pipeline rank the schedule needs at least (2 for those with 2 stages a rank)."""
        return 2 if self.pairs else 1


SCHEDULES: dict[str, ScheduleSpec] = {
    "dualpipe": ScheduleSpec(bidirectional_layout, _check_dualpipe, "ours", "ours", pairs=True),
    "dualpipev": ScheduleSpec(v_layout, _check_dualpipev, "torch", "torch", ScheduleDualPipeV, pairs=True),
    "1f1b": ScheduleSpec(linear_layout, _check_1f1b, "ours", "torch"),
    "zb": ScheduleSpec(linear_layout, _check_zb, "torch", "torch", ScheduleInterleavedZeroBubble),
}
assert tuple(SCHEDULES) == tuple(sorted(get_args(Schedule), key=list(SCHEDULES).index)), "one table"


SUBCLASS_PLAN = ScheduleSpec(linear_layout, lambda pp, m: None, "ours", "torch")
"""How a plan of a name not in ``SCHEDULES`` runs (``DualPipeStrategy.build_plan`` overridden)."""


def plan_spec(plan: SchedulePlan) -> ScheduleSpec:
    return SCHEDULES.get(plan.schedule, SUBCLASS_PLAN)


def spec(schedule: str) -> ScheduleSpec:
    if schedule not in SCHEDULES:
        raise ValueError(f"{_KEY}.schedule ({schedule!r}) is not one of {tuple(SCHEDULES)}")
    return SCHEDULES[schedule]


def validate(schedule: str, pipeline_parallel_size: int, num_microbatches: int) -> None:
    """Raises ValueError for a size or micro-batch count the schedule cannot take."""
    checks = spec(schedule)
    if pipeline_parallel_size < 2:
        raise ValueError(
            f"{_KEY}.pipeline_parallel_size ({pipeline_parallel_size}) must be >= 2; for one process use the "
            "default strategy"
        )
    checks.check(pipeline_parallel_size, num_microbatches)


def layout_for(schedule: str, pipeline_parallel_size: int) -> PipelineLayout:
    return spec(schedule).layout(pipeline_parallel_size)


def compute_only(order: dict[int, list[Action | None]]) -> dict[int, list[Action]]:
    """Drops idle slots (None) and non-compute actions (REDUCE_GRAD, sends, receives)."""
    return {
        rank: [a for a in actions if a is not None and a.is_compute_op] for rank, actions in order.items()
    }


class _StageStandIn:
    """What torch's schedule constructors read from a stage, and nothing else."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int, group_rank: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, group_rank
        self.submod = nn.Identity()
        self.stage_index_to_group_rank: dict[int, int] = {}


def torch_pipeline_order(
    schedule: str, pipeline_parallel_size: int, num_microbatches: int
) -> dict[int, list]:
    layout = layout_for(schedule, pipeline_parallel_size)
    stages = [_StageStandIn(s, layout.num_stages, layout.num_ranks, 0) for s in layout.stages_of(0)]
    return spec(schedule).torch_class(stages, num_microbatches).pipeline_order


def build_plan(schedule: str, pipeline_parallel_size: int, num_microbatches: int) -> SchedulePlan:
    validate(schedule, pipeline_parallel_size, num_microbatches)
    layout = layout_for(schedule, pipeline_parallel_size)
    if spec(schedule).lists == "torch":
        actions = compute_only(torch_pipeline_order(schedule, pipeline_parallel_size, num_microbatches))
    else:
        ours = {"dualpipe": dualpipe_actions, "1f1b": one_f_one_b_actions}[schedule]
        actions = ours(pipeline_parallel_size, num_microbatches)
    return SchedulePlan(schedule, num_microbatches, layout, actions)
