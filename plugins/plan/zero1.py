"""A model of DeepSeek-V3's layout (SPEC.md §6.1, §8), not code that runs: ZeRO-1 over data parallelism.

This is the "after" column of the plan until issue 15's sharded optimizer lands; then its numbers
should come from that code the way today's do (today.py), and this file goes. The model takes
today's parameter counts for a pipeline position (the same pieces and expert shards) and applies
DeepSeek-V3's dtypes and sharding:

    weights            bf16 compute copy of every parameter the position holds        2 B x params
    gradients          fp32 (SPEC §6.1: "weight gradients FP32, used for batch
                       accumulation"), not sharded under ZeRO-1                          4 B x params
    optimizer state    fp32 master weights + bf16 AdamW moments (AdamWBF16), sharded
                       over the ranks that replicate each parameter: a replicated
                       parameter over the E x D ranks of its position, an expert
                       shard over the D data-parallel ranks that hold it               8 B x (R/(E·D) + X/D)
    reduction buffers  none beyond the gradients: gradients live in one flat buffer
                       that the reduce-scatter writes in place, and the updated bf16
                       weights are all-gathered in place (Megatron's distributed
                       optimizer); a bucket's staging copy is not counted              0
    activations        measured, not modelled (activations.py), with the module's
                       ``recompute_activations`` on (V3 recomputes RMSNorm and MLA
                       up-projections), bf16, the same schedule replay

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
    sharded = layout.master_bytes + layout.moment_bytes
    state = sharded * replicated_params / (expert_parallel_size * data_parallel_size)
    state += sharded * expert_params / data_parallel_size
    return Memory(
        layout=LABEL,
        params=params,
        weights=layout.weight_bytes * params,
        gradients=layout.grad_bytes * params,
        optimizer_state=round(state),
        reduction_buffers=0,
        activations_per_microbatch=activations_per_microbatch,
        activations=activations,
    )


__all__ = ["LABEL", "Zero1Layout", "zero1_memory"]
