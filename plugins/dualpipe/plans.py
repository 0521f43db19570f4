"""Schedules as action lists: ``build_plan("dualpipev", pipeline_parallel_size=4, num_microbatches=20)``.

A ``SchedulePlan`` is what the strategy runs and what the simulator reads: the layout (layout.py)
and, for every pipeline rank, its compute actions in torch.distributed.pipelining's ``_Action``
notation (``2F5`` = forward of stage 2 on micro-batch 5; ``I`` input-gradient backward, ``W``
weight-gradient backward, ``B`` both; ``(0F7;7B3)OVERLAP_F_B`` a forward paired with a backward).

    schedule    action lists from                                   runtime
    1f1b        ours (baseline_actions.py; torch's Schedule1F1B     torch _PipelineScheduleRuntime
                reports lists that it does not run)
    zb          torch ScheduleInterleavedZeroBubble, 1 stage/rank   torch _PipelineScheduleRuntime
                (torch's ZB1P, i.e. ZB-H1)
    dualpipev   torch ScheduleDualPipeV                             torch _PipelineScheduleRuntime
    dualpipe    ours (dualpipe_actions.py)                          ours (runtime.py)

torch computes its lists in the schedule constructors from the stages' ``stage_index``,
``num_stages``, ``group_size`` and ``group_rank`` only; ``torch_pipeline_order`` builds the schedule
on light stand-ins for the stages, so the lists come from torch's own code without processes. At run
time the strategy reads ``schedule.pipeline_order`` of the schedule it really steps (the same lists).

Each constraint below is the schedule's own (torch's checks, DualPipe's asserts), raised before any
process group exists, with the YAML key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3_lightning.plugins.dualpipe.baseline_actions import one_f_one_b_actions
from dsv3_lightning.plugins.dualpipe.dualpipe_actions import dualpipe_actions
from dsv3_lightning.plugins.dualpipe.layout import (
    PipelineLayout,
    bidirectional_layout,
    linear_layout,
    v_layout,
)
from torch import nn
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining.schedules import _Action

SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb")
_KEY = "trainer.strategy.init_args"


@dataclass(frozen=True)
class SchedulePlan:
    schedule: str
    num_microbatches: int
    layout: PipelineLayout
    actions: dict[int, list[_Action]]
    """Pipeline rank -> compute actions in execution order (no idle slots, no communication)."""

    def format(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, a)) for r, a in sorted(self.actions.items()))


def validate(schedule: str, pipeline_parallel_size: int, num_microbatches: int) -> None:
    """Raises ValueError for a size or micro-batch count the schedule cannot take."""
    pp, m = pipeline_parallel_size, num_microbatches
    if schedule not in SCHEDULES:
        raise ValueError(f"{_KEY}.schedule ({schedule!r}) is not one of {SCHEDULES}")
    if pp < 2:
        raise ValueError(
            f"{_KEY}.pipeline_parallel_size ({pp}) must be >= 2; for one process use the default strategy"
        )
    if schedule == "dualpipe":
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
    elif schedule == "dualpipev":
        if m < 2 * pp:
            raise ValueError(
                f"{_KEY}.num_microbatches ({m}) must be >= 2 * pipeline_parallel_size ({2 * pp}) for schedule "
                f"'dualpipev' (2 stages per rank); set it to at least {2 * pp}"
            )
    elif schedule == "1f1b":
        if m < pp:
            raise ValueError(
                f"{_KEY}.num_microbatches ({m}) must be >= pipeline_parallel_size ({pp}) for schedule '1f1b'; "
                f"set it to at least {pp}"
            )
    elif schedule == "zb":
        rounds = max(1, m // pp)
        if m < pp or m % rounds:
            good = next(k for k in range(max(m, pp), 4 * max(m, pp)) if k % max(1, k // pp) == 0)
            raise ValueError(
                f"{_KEY}.num_microbatches ({m}) does not fit schedule 'zb' (torch's ZB1P): it must be >= "
                f"pipeline_parallel_size ({pp}) and a multiple of num_microbatches // {pp} ({rounds}); "
                f"set it to {good}"
            )


def layout_for(schedule: str, pipeline_parallel_size: int) -> PipelineLayout:
    if schedule == "dualpipe":
        return bidirectional_layout(pipeline_parallel_size)
    if schedule == "dualpipev":
        return v_layout(pipeline_parallel_size)
    return linear_layout(pipeline_parallel_size)


def torch_schedule_class(schedule: str) -> type:
    return {
        "zb": torch_schedules.ScheduleInterleavedZeroBubble,
        "dualpipev": torch_schedules.ScheduleDualPipeV,
    }[schedule]


def compute_only(order: dict[int, list[_Action | None]]) -> dict[int, list[_Action]]:
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
    cls = torch_schedule_class(schedule)
    return cls(stages, num_microbatches).pipeline_order


def build_plan(schedule: str, pipeline_parallel_size: int, num_microbatches: int) -> SchedulePlan:
    validate(schedule, pipeline_parallel_size, num_microbatches)
    layout = layout_for(schedule, pipeline_parallel_size)
    if schedule == "dualpipe":
        actions = dualpipe_actions(pipeline_parallel_size, num_microbatches)
    elif schedule == "1f1b":
        actions = one_f_one_b_actions(pipeline_parallel_size, num_microbatches)
    else:
        actions = compute_only(torch_pipeline_order(schedule, pipeline_parallel_size, num_microbatches))
    return SchedulePlan(schedule, num_microbatches, layout, actions)
