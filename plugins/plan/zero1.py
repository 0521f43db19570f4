"""A model of DeepSeek-V3's layout (SPEC.md §6.1, §8), not code that runs: ZeRO-1 over data parallelism.

The plan's "after" row is measured from the real ZeRO-1 code (after.py); this row stays beside it as
the layout DeepSeek describes, to compare with. It takes today's parameter counts for a pipeline
position (the same pieces and expert shards) and applies DeepSeek-V3's dtypes and sharding:

    weights            bf16 compute copy of every parameter the position holds        2 B x params
    gradients          fp32 (SPEC §6.1: "weight gradients FP32, used for batch
                       accumulation"), not sharded under ZeRO-1                          4 B x params
    master weights     fp32, sharded over the ranks that replicate each parameter:
                       a replicated parameter over the E x D ranks of its position,
                       an expert shard over the D data-parallel ranks that hold it     4 B x (R/(E·D) + X/D)
    optimizer state    AdamW's two moments in bf16 (AdamWBF16), sharded alike          4 B x (R/(E·D) + X/D)
    master gradients   none: the reduce-scatter writes the fp32 gradient buffer in
                       place, and the optimizer reads its owned range of it            0
    reduction buffers  none beyond the gradients: gradients live in one flat buffer
                       that the reduce-scatter writes in place, and the updated bf16
                       weights are all-gathered in place (Megatron's distributed
                       optimizer); a bucket's staging copy is not counted              0
    activations        measured, not modelled (activations.py), with the module's
                       ``recompute_activations`` on (V3 recomputes RMSNorm and MLA
                       up-projections), bf16, the same schedule replay

How the measured ZeRO-1 differs: its weights and gradients are in the module's dtype (float32 under
``bf16-mixed``, 8 B per parameter against this model's 6 B; bf16 under ``bf16-true``, 4 B), its
master gradients are a float32 copy of the owned range (4 B / G), AdamW's moments are float32 (8 B / G)
unless the run's optimizer is AdamWBF16, and its buckets are staged (two in flight).

DeepSeek-V3 also caches some activations in FP8 and keeps the parameter EMA in CPU memory; neither is
in the model (the activations here are therefore an upper bound of V3's).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3_lightning.plugins.plan.report import Memory

LABEL = "V3 ZeRO-1 model"


@dataclass(frozen=True, kw_only=True)
class Zero1Layout:
    """Bytes per parameter of each kind of state under the modelled layout."""

    weight_bytes: int = 2
    """bf16 weights for the forward and backward."""
    grad_bytes: int = 4
    """fp32 gradients (SPEC.md §6.1); 2 would model bf16 gradients."""
    master_bytes: int = 4
    """fp32 master weights, sharded."""
    moment_bytes: int = 4
    """AdamW's two moments in bf16 (AdamWBF16), sharded."""


def zero1_memory(
    replicated_params: int,
    expert_params: int,
    expert_parallel_size: int,
    data_parallel_size: int,
    *,
    activations_per_microbatch: int,
    activations: int,
    layout: Zero1Layout = Zero1Layout(),
) -> Memory:
    """One pipeline position's memory under the modelled ZeRO-1 layout (see the module docstring)."""
    params = replicated_params + expert_params
    # elements of this rank's shards: replicated over the E x D block, expert shards over the data group
    shard = replicated_params / (expert_parallel_size * data_parallel_size)
    shard += expert_params / data_parallel_size
    return Memory(
        layout=LABEL,
        params=params,
        weights=layout.weight_bytes * params,
        gradients=layout.grad_bytes * params,
        master_weights=round(layout.master_bytes * shard),
        optimizer_state=round(layout.moment_bytes * shard),
        reduction_buffers=0,
        activations_per_microbatch=activations_per_microbatch,
        activations=activations,
    )


__all__ = ["LABEL", "Zero1Layout", "zero1_memory"]
