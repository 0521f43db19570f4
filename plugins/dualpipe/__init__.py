"""DualPipe: pipeline-parallel schedules for DeepSeek-V3 training, and the strategy that runs them.

DeepSeek-V3 (SPEC.md §7) feeds micro-batches from both ends of the pipeline and pairs a forward
chunk of one micro-batch with a backward chunk of another, so that expert-parallel all-to-all hides
under computation and the bubbles shrink to (PP/2-1)(F&B+B-3W). This package:

- plans.py, dualpipe_actions.py, baseline_actions.py, layout.py: the schedules as per-rank action
  lists in torch.distributed.pipelining's notation: ``dualpipe`` (ours: torch has no two-copy
  DualPipe), ``dualpipev`` and ``zb`` (torch's ScheduleDualPipeV, ScheduleInterleavedZeroBubble),
  ``1f1b`` (ours, run by torch's action-list runtime);
- simulator.py: bubble and peak activation memory per rank from those lists and chunk costs F, B, W
  (costs.py measures them on a piece of the model); ``benchmarks/pipeline_bubbles.py`` prints the
  paper's table from it;
- partition.py: the model cut by layer ranges (embedding first; norm, lm_head and MTP last);
- runner.py, bidirectional_runtime.py, evaluation.py: one training step / evaluation on a rank;
  overlap.py: the seam where a forward and a backward chunk of a (F;B) pair run together;
- strategy.py: ``DualPipeStrategy``, the Lightning strategy (``trainer.strategy`` in YAML), a thin
  layer on the parallel layer (``dsv3_lightning.plugins.parallel``: the pipeline x data x expert mesh,
  expert shards and dispatchers, the gradient synchronisation).

Differences from DeepSeek's DualPipe: the (F;B) pairs hide the expert-parallel all-to-alls by taking
turns between a forward and a backward thread (interleaver.py), not by splitting the model into
attention / dispatch / MLP / combine steps, and only on our runtime (``dualpipe``, and ``dualpipev``
when overlapped), which tells messages apart by tag: gloo honours tags, NCCL matches point-to-point
messages in order, so on NCCL ``dualpipe`` is refused and ``dualpipev`` runs torch's runtime without
overlap.
"""

from dsv3_lightning.plugins.dualpipe.plans import SCHEDULES, SchedulePlan, build_plan
from dsv3_lightning.plugins.dualpipe.simulator import ChunkCosts, Simulation, simulate
from dsv3_lightning.plugins.dualpipe.strategy import DualPipeStrategy

__all__ = [
    "SCHEDULES",
    "ChunkCosts",
    "DualPipeStrategy",
    "SchedulePlan",
    "Simulation",
    "build_plan",
    "simulate",
]
