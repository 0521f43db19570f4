"""ExpertParallelStrategy: DeepSeek-V3's expert parallelism (SPEC.md §8) as a Lightning strategy.

    trainer:
      devices: 4
      strategy:
        class_path: dsv3_lightning.plugins.expert_parallel.ExpertParallelStrategy
        init_args: {expert_parallel_size: 2}        # 2 data × 2 expert ranks

The processes form a data × expert mesh (mesh.py). Every MoE layer's routed experts (the model's
and the MTP heads') are split evenly over the expert ranks (sharding.py); its dispatcher sends each
token copy to the rank of its expert and back by all-to-all with uneven splits (dispatcher.py).
Attention, dense MLPs, routers and shared experts are replicated. Each rank reads its own slice of
the global batch (DDP's distributed sampler over the whole world).

It is the parallel layer's strategy (``dsv3_lightning.plugins.parallel.ParallelStrategy``: the mesh,
the shards, the one gradient synchronisation, checkpoints, teardown) with one pipeline position. What
it adds is where the step synchronises: after the last backward of an optimizer step, gradients are
reduced and, if ``trainer.gradient_clip_val`` is set with the "norm" algorithm, clipped by the norm of
the whole model: the step equals a single process stepping on the whole global batch. (Lightning's own
clipping then finds nothing left to clip; ``on_before_optimizer_step`` hooks see reduced, clipped
gradients.)

Checkpoints are the parallel layer's: each rank writes its own shard into a sharded directory, which
resumes with any expert_parallel_size (or pipeline, or one process) and converts with ``dsv3
convert``; ``checkpoint_format: full`` gathers one ordinary file instead. Optimizer state is sharded
over data parallelism with ``zero1``. A module built with values (from Python) has its shards
gathered back when the run ends normally, so that it is a plain model again; one built shard-first
by ``dsv3 fit`` never holds more than its share.

A rank that dies or stops answering makes the others raise ``ExpertParallelCommError`` after at most
``timeout`` seconds (every process group of the run uses it), naming the collective and the key.

Not supported: 16-bit precision with a gradient scaler together with norm clipping ("16-mixed"; use
"bf16-mixed"), redundant experts (EPLB). Pipeline parallelism with expert parallelism inside it is
DualPipeStrategy's ``expert_parallel_size``, which reuses this package's pieces.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from dsv3_lightning.plugins.parallel.mesh import KEY
from dsv3_lightning.plugins.parallel.strategy import ParallelStrategy, check_model


class ExpertParallelStrategy(ParallelStrategy):
    """Routed experts sharded over ranks, tokens moved to them by all-to-all.

    Args:
        expert_parallel_size: Ranks that share one copy of the experts; ``trainer.devices ×
            trainer.num_nodes`` must be a multiple (the rest is data parallelism), and
            ``model.config.n_routed_experts`` too.
        max_nodes_per_token, ranks_per_node, fp8_dispatch, zero1, checkpoint_format, timeout,
            start_method: as ``ParallelStrategy`` (node-limited routing, FP8 dispatch, ZeRO-1, the
            checkpoint format, the collectives' timeout, launch).
    """

    strategy_name = "expert_parallel"

    def __init__(self, expert_parallel_size: int, **kwargs: Any) -> None:
        super().__init__(expert_parallel_size=expert_parallel_size, **kwargs)  # YAML sees the base's options

    @override
    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        def synchronised_closure():
            result = closure()
            self.sync_gradients()
            return result

        return super().optimizer_step(optimizer, synchronised_closure, model, **kwargs)


__all__ = ["KEY", "ExpertParallelStrategy", "check_model"]
