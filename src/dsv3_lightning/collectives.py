"""The one way the core and the plugins sum a small tensor over all processes of a run, inside a step.

Lightning's ``strategy.reduce`` puts a barrier before every all-reduce (fabric's ``_sync_ddp``): a
second collective per call, four per training step here, each a round trip across every rank of the
job. ``sum_over_processes`` is the all-reduce alone, in place, on the tensor's device (the strategy's
root device, as NCCL needs); on one process, or before a process group exists, it does nothing.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist


def sum_over_processes(trainer: L.Trainer | None, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process of ``trainer``'s run (in place; returned)."""
    if trainer is None or trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return tensor
    dist.all_reduce(tensor)
    return tensor
