"""torch.distributed.pipelining's names that this package uses, in one place, public and private.

DualPipe's schedules are written in torch's action-list notation and run partly on torch's runtime, so
the package depends on names torch has not made public (``_Action``, ``_PipelineScheduleRuntime``, the
split backward of ``_backward``). They are imported here only: a torch upgrade that moves one breaks
this file, and the rest of the package reads ``Action`` and ``ActionListRuntime``.

    Action              one compute or communication step: ``2F5`` forward of stage 2, micro-batch 5
    FORWARD ...         its computation types (B = I + W; ``OVERLAP_F_B`` a forward paired with a backward)
    ActionListRuntime   torch's runtime that executes per-rank action lists, adding sends and receives
    ScheduleDualPipeV, ScheduleInterleavedZeroBubble
                        torch's schedule classes (their constructors compute the lists)
    stage_backward_input, stage_backward_weight
                        the two halves of a stage's backward (zero-bubble's I and W)
"""

from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import _Action as Action
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime as ActionListRuntime

__all__ = [
    "BACKWARD_INPUT",
    "BACKWARD_WEIGHT",
    "FORWARD",
    "FULL_BACKWARD",
    "OVERLAP_F_B",
    "Action",
    "ActionListRuntime",
    "PipelineStage",
    "ScheduleDualPipeV",
    "ScheduleInterleavedZeroBubble",
    "stage_backward_input",
    "stage_backward_weight",
]
