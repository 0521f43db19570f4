"""``dsv3 plan``: a memory plan of a pipeline x expert x data layout, from the real code.

    dsv3 plan --config configs/671B.yaml --pipeline 16 --expert 64 --data 2

For each distinct pipeline position (experts and data-parallel replicas are symmetric), the plan
prints the bytes of parameters, gradients, optimizer state, gradient-reduction buffers and the
activations of one micro-batch times the micro-batches the schedule keeps in flight, in three rows:

- **today**, measured: the module is built on the meta device (nothing is allocated) and cut by the
  strategies' own functions, each position in a process group of torch.distributed's ``fake``
  backend (today.py): expert shards (``shard_experts``), pipeline pieces and released parameters
  (``PipelineRunner``, ``release_unowned``), gradient reduction and clipping (``GradientSync``, whose
  transient buffers a dispatch mode measures, probe.py), the run's own optimizer stepped once on meta.
  Activations are the bytes autograd saves in one meta forward of each real pipeline piece, replayed
  over the schedule's real action lists (activations.py).
- **after: ZeRO-1 (zero1: true)**, measured the same way (after.py): the run's optimizer sharded by
  ``GradientSync.shard_optimizers``, then the real reduce-scatter, clipping, step and all-gather on
  meta; master weights, optimizer state and master gradients of this rank's shards.
- **V3 ZeRO-1 model**, modelled: DeepSeek-V3's dtypes (bf16 weights, fp32 gradients, bf16 moments)
  and ZeRO-1 sharding applied to today's parameter counts (zero1.py), to compare with "after".

What is reproduced rather than run, and what is not counted, is listed in each module's docstring and
in docs/memory_plan.md. It lives among the plugins because it imports the parallel ones (the core imports
no plugin); only ``dsv3 plan`` loads it. It runs in seconds and well under 1 GB for 671B at 2,048 ranks.
"""

from dsv3_lightning.plugins.plan.command import main

__all__ = ["main"]
