"""Example: a pipeline schedule given as an action list, by subclassing the DualPipe strategy.

GPipe runs every micro-batch's forward, then every backward: the same bubble as 1F1B,
(PP - 1)(F + B), but each rank holds all M micro-batches' activations instead of at most PP. It
takes one documented method, ``DualPipeStrategy.build_plan``, returning each rank's compute actions in
torch.distributed.pipelining's ``Action`` notation; torch's action-list runtime adds the sends and
receives, and the strategy runs, logs and checkpoints it like its own schedules:

    trainer:
      devices: 2
      strategy:
        class_path: dsv3_lightning.plugins.examples.gpipe_schedule.GPipeStrategy
        init_args: {pipeline_parallel_size: 2, num_microbatches: 4}

``simulate(strategy.build_plan(), ChunkCosts(...))`` reports its bubble and peak activations beside
the built-in schedules' (tests/plugins/examples/test_gpipe_schedule.py).
"""

from __future__ import annotations

from typing import Any

from dsv3_lightning.plugins.dualpipe import DualPipeStrategy
from dsv3_lightning.plugins.dualpipe.layout import linear_layout
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan
from dsv3_lightning.plugins.dualpipe.torch_pipelining import FORWARD, FULL_BACKWARD, Action
from typing_extensions import override


def gpipe_actions(num_ranks: int, num_microbatches: int) -> dict[int, list[Action]]:
    """Rank r: F0 .. F(M-1), then B0 .. B(M-1), on its one stage r."""
    return {
        rank: [Action(rank, FORWARD, m) for m in range(num_microbatches)]
        + [Action(rank, FULL_BACKWARD, m) for m in range(num_microbatches)]
        for rank in range(num_ranks)
    }


class GPipeStrategy(DualPipeStrategy):
    """Pipeline parallelism with the GPipe schedule (one stage per rank)."""

    def __init__(self, pipeline_parallel_size: int, num_microbatches: int, **kwargs: Any) -> None:
        # 1f1b has GPipe's layout and constraints (a linear pipeline, M >= PP): its checks apply
        super().__init__(pipeline_parallel_size, num_microbatches, "1f1b", **kwargs)

    @override
    def build_plan(self) -> SchedulePlan:
        actions = gpipe_actions(self.pipeline_parallel_size, self.num_microbatches)
        return SchedulePlan("gpipe", self.num_microbatches, linear_layout(self.pipeline_parallel_size), actions)
