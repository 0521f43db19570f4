"""After ZeRO-1: a pipeline position measured under the real ``zero1: true`` code (parallel/zero.py).

It runs right after today's measurement of the position (today.py), on the same meta module, in the
same fake process group, with the same ``GradientSync``, and repeats what ParallelStrategy does when
``trainer.strategy.init_args.zero1`` is true:

    optimizer = make_optimizer(module)     # the run's own: configure_optimizers or the config's optimizer:
    sync.shard_optimizers([optimizer])     # setup: re-pointed at this rank's float32 master shards
    runner.sync_gradients()                # P >= 2: the parameters several positions use
    sync.reduce()                          # Zero1.reduce_scatter_gradients: bucketed, frees the model's
    sync.clip(max_norm)                    # on the master shards, when the config clips
    optimizer.step()                       # creates the shards' state
    sync.after_step()                      # Zero1.all_gather_parameters, into the model; frees the master
    optimizer.zero_grad()                  # gradients (Zero1.free_gradients)

and takes, in bytes:

    weights            the kept parameters in the module's dtype: ZeRO-1 leaves the model whole
    gradients          the model's full gradients, one per kept parameter in its dtype, as today:
                       they exist from the backward until the reduce-scatter stages them
    master weights     the float32 master shards ``shard_optimizers`` made (``FlatShard.master``)
    optimizer state    the run's optimizer's state after its step over the shards (AdamW 8 B per
                       owned element, the repo's AdamWBF16 4 B); master weights are not in it
    master gradients   the float32 gradients the reduce-scatter leaves in the shards (4 B per owned
                       element), from the reduce-scatter (which frees the model's as it fills them) to
                       ``after_step``: the model states count the larger of the two gradients
    reduction buffers  the largest measured transient (probe.transient_bytes, on meta) of the steps
                       above: the reduce-scatter's above both gradient columns (its staging buckets,
                       two in flight, less the model gradients already freed), clipping's on the
                       shards, the all-gather's (buckets in the model's dtype, two in flight)

The collectives' bucket loops are most of the plan's time at 671B (a meta op per parameter segment
of each bucket row, 128 rows for a block of 128 ranks), so a ``cache`` keyed by the layouts' shapes
(per layout: group size, this rank's place in it, the divisor, each parameter's numel and dtype) and
the optimizer's class measures positions with the same layouts once (671B's middle positions).

Each measurement is checked against what the code says of itself (``Zero1.memory()``: master weights,
state, master gradients; its two-bucket reduction figure is given beside the measured one). The
optimizer, the ``Zero1`` objects and the master shards are dropped afterwards and the module's
gradients set to None; ``shard_optimizers`` re-points only the optimizer it is given and the
collectives write the meta parameters in place (no values), so the module serves the next position
unchanged.

The step's own temporaries (foreach buffers, the fused kernels' workspaces) are not counted, as today.
Unlike DeepSeek-V3 (and the V3 model row, zero1.py), the model's weights and gradients are in the
module's dtype (float32 under ``bf16-mixed``: 8 B per parameter on every rank, against V3's bf16
weights + fp32 gradients, 6 B) and the master gradients are a float32 copy of the owned range, not
the gradient buffer reduce-scattered in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from torch import nn

from dsv3_lightning.module import DSV3LightningModule
from dsv3_lightning.plugins.parallel.grad_sync import GradientSync
from dsv3_lightning.plugins.plan.probe import MetaRun, optimizer_state_bytes, tensor_bytes, transient_bytes

LABEL = "after: ZeRO-1 (zero1: true)"


@dataclass
class Zero1State:
    """What one rank of a position holds under ZeRO-1 (bytes; see the module docstring)."""

    weights: int
    gradients: int
    master_weights: int
    optimizer_state: int
    master_gradients: int
    reduction: dict[str, int] = field(default_factory=dict)
    """Measured transient of each step (``reduce_scatter_gradients`` above the two gradient columns)."""
    reduce_scatter_peak: int = 0
    """The reduce-scatter's peak above the model gradients, master gradients included."""
    documented_buckets: int = 0
    """``Zero1.memory().reduction_buffers``: two buckets of the largest layout, as the code states."""
    shards: dict[str, int] = field(default_factory=dict)
    """Group size of each shard group this rank's master shards come from ("replicated", "experts")."""


def measure_zero1(
    module: DSV3LightningModule,
    sync: GradientSync,
    runner: PipelineRunner | None,
    make_optimizer: Callable[[DSV3LightningModule], torch.optim.Optimizer],
    clip: float | None,
    cache: dict | None = None,
) -> Zero1State:
    """One ZeRO-1 step of this position's rank on meta (see the module docstring). ``sync`` is today's
    ``GradientSync`` of the position, not yet sharded; ``cache`` is shared by the positions of a plan."""
    assert not sync.zeros, "measure_zero1 shards the optimizer itself; give it today's GradientSync"
    params = [p for p in sync.replicated + sync.experts if p.requires_grad]
    for p in params:
        p.grad = torch.empty_like(p)
    gradients = tensor_bytes(p.grad for p in params)
    optimizer = make_optimizer(module)
    sync.shard_optimizers([optimizer])
    sync_gradients = {"sync_gradients": transient_bytes(runner.sync_gradients, params)} if runner else {}
    layouts = [fs for zero in sync.zeros for fs in zero.layouts]
    key = (type(optimizer), clip) + tuple(
        (fs.label, fs.world, fs.rank, fs.divisor, *((p.numel(), p.dtype) for p in fs.params))
        for fs in layouts
    )
    measured = cache.get(key) if cache is not None else None
    if measured is None:
        measured = _step(sync, optimizer, params, clip)
        if cache is not None:
            cache[key] = measured
    for p in module.parameters():
        p.grad = None
    return dataclasses.replace(
        measured,
        weights=tensor_bytes(sync.replicated + sync.experts),
        gradients=gradients,
        reduction={**sync_gradients, **measured.reduction},
    )


def _step(
    sync: GradientSync, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], clip: float | None
) -> Zero1State:
    """Reduce-scatter, clip, step and all-gather of the sharded ``sync`` on meta: what they leave, their
    transients, and the checks against ``Zero1.memory()``."""
    layouts = [fs for zero in sync.zeros for fs in zero.layouts]
    masters = [fs.master for fs in layouts]
    documented = [zero.memory() for zero in sync.zeros]  # before the step: state_bytes steps a copy
    with MetaRun(track=True) as run:  # transient_bytes, less the master gradients it leaves (a column)
        run.watch_gradients(params)
        run.watch([*params, *masters])
        start = run.live
        sync.reduce()
    assert all(p.grad is None for p in params), "the reduce-scatter frees the model's gradients"
    master_gradients = tensor_bytes(m.grad for m in masters if m.grad is not None)
    reduction = {"reduce_scatter_gradients": max(0, run.peak - start - master_gradients)}
    held = [*params, *masters, *(m.grad for m in masters if m.grad is not None)]
    if clip:
        reduction["clip_on_shards"] = transient_bytes(lambda: sync.clip(clip), existing=held)
    optimizer_state = optimizer_state_bytes(optimizer)
    reduction["all_gather_parameters"] = transient_bytes(sync.after_step, existing=held)
    optimizer.zero_grad()
    master_weights = tensor_bytes(masters)
    assert master_weights == sum(m.master_weights for m in documented)
    assert optimizer_state == sum(m.optimizer_state for m in documented)
    assert master_gradients <= sum(m.master_gradients for m in documented)
    return Zero1State(
        weights=0,
        gradients=0,
        master_weights=master_weights,
        optimizer_state=optimizer_state,
        master_gradients=master_gradients,
        reduction=reduction,
        reduce_scatter_peak=run.peak - start,
        documented_buckets=max(m.reduction_buffers for m in documented),
        shards={fs.label.rpartition(" x shard group ")[2].strip("'"): fs.world for fs in layouts},
    )


__all__ = ["LABEL", "Zero1State", "measure_zero1"]
