"""DualPipeStrategy: pipeline parallelism (DualPipe, DualPipeV, 1F1B, ZB1P) as a Lightning strategy.

    trainer:
      devices: 2
      strategy:
        class_path: dsv3_lightning.plugins.dualpipe.DualPipeStrategy
        init_args: {pipeline_parallel_size: 2, num_microbatches: 4, schedule: dualpipev}

The processes form a pipeline x expert x data mesh (mesh.py): ``trainer.devices x num_nodes`` = P x E
x D, with P = ``pipeline_parallel_size``, E = ``expert_parallel_size`` (default 1) and D data-parallel
replicas (the rest; default 1). Each of the E x D pipelines reads its own slice of the global batch
(the distributed sampler's replica), the same on its P ranks, cut into ``num_microbatches``. With
E > 1 the routed experts of every MoE layer are sharded over the E ranks at each pipeline position,
which exchange tokens by all-to-all (expert_parallel's sharding and dispatcher). The strategy is the
parallel layer's strategy (``dsv3_lightning.plugins.parallel.ParallelStrategy``: the mesh, the expert
shards and dispatchers, the one gradient synchronisation, checkpoints, teardown) with a pipeline, and
replaces the step:

- ``training_step`` runs the whole schedule (PipelineRunner: forward and backward of every
  micro-batch, gradients of shared parameters summed over the pipeline), logs ``train/loss``,
  ``train/ce``, the heads' logs and the loss terms (the global batch's values, as one process logs
  them: ``DSV3LightningModule.log_train``), and sets the gradients aside: Lightning zeroes gradients between ``training_step`` and
  ``backward``;
- ``backward`` puts them back instead of differentiating and calls the parallel layer's
  ``sync_gradients``: the global batch's gradient over the replicas (or ZeRO-1's reduce-scatter), and
  clipping by the *global* norm over the whole model (every position, every expert shard) when
  ``gradient_clip_algorithm`` is "norm" (Lightning's own clipping then finds nothing to clip);
- ``validation_step`` / ``test_step`` run a forward through the pieces (evaluation.py), heads' logs
  averaged over the pipelines;
- conversation batches (``data.conversations``: a dict with a loss mask and packed documents,
  dsv3_lightning/batch.py) are read once per step into a ``Batch`` whose target counts are the global
  batch's, summed over one rank per replica (the pipeline position's "block" group: a pipeline's P
  ranks hold the same batch) in one all-reduce, with R = E x D replicas; each micro-batch keeps those
  counts (``Batch.split``), so its loss is its masked sum x M x R / global count and the step trains
  and logs (``train/target_tokens``, ``train/masked_tokens`` too) what one process does on the global
  batch. Every stage gets its micro-batch's documents (attention and positions);
- checkpoints are the parallel layer's: by default each rank writes its pieces' share into a sharded
  directory that any mesh (or one process) resumes from; ``checkpoint_format: full`` gathers one
  ordinary file instead (each tensor broadcast from the rank that trains it, ``optimizer_state``'s
  per-parameter state gathered as objects).

Built by ``dsv3 fit`` (on the meta device), each rank materialises only its pieces: the runner
releases the others before they have values (the parallel layer's shard-first construction). A module
built with values from Python is whole on every rank until ``on_train_start``, where each rank
releases the parameters (and optimizer state) of the pieces it does not run, keeping each Parameter as
an empty tensor that the optimizer skips (it never has a gradient), and ``on_train_end`` fills them
again from their owners; at teardown the expert shards are gathered back, so that such a module is
whole again. Loss terms registered by callbacks (the sequence-wise balance loss) are computed by each router on
its own stage and reach the gradient there (the core's router_losses.py); the balancing callbacks and
ExpertLoadMonitor read counts summed over every micro-batch and process. Not supported, each refused
with the fix: gradient accumulation (the micro-batches are the accumulation), ``predict``. With
expert parallelism under schedules "dualpipe" and "dualpipev" (on gloo), each (F;B) pair runs its
forward and backward chunks in turns, so that each one's all-to-alls run under the other's
computation (``overlap``; overlap.py).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.evaluation import pipeline_evaluate
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.dualpipe.plans import Schedule, SchedulePlan, build_plan, spec, validate
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.expert_parallel.all_to_all import collective
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from dsv3_lightning.batch import Batch
from dsv3_lightning.plugins.parallel.mesh import KEY as _KEY
from dsv3_lightning.plugins.parallel.strategy import ParallelStrategy

log = logging.getLogger(__name__)


class DualPipeStrategy(ParallelStrategy):
    """Pipeline-parallel training with a DualPipe-family schedule.

    Args:
        pipeline_parallel_size: Pipeline ranks (positions); ``trainer.devices x trainer.num_nodes`` must
            be a multiple of ``pipeline_parallel_size x expert_parallel_size`` (the rest is data
            parallelism: whole copies of the pipeline).
        num_microbatches: Micro-batches per optimizer step; each pipeline's batch (``data.batch_size``)
            must be a multiple.
        schedule: "dualpipev" (DeepSeek's V-shaped DualPipe, 2 stages per rank), "dualpipe" (the
            bidirectional original, every stage on two ranks), "1f1b" or "zb" (baselines).
        expert_parallel_size: Ranks at each pipeline position that share one copy of the routed
            experts, exchanging tokens by all-to-all; ``model.config.n_routed_experts`` must be a
            multiple. 1: every rank holds all experts.
        overlap: Under schedules "dualpipe" and "dualpipev" with expert parallelism on gloo, run each
            (F;B) pair's chunks in turns, every all-to-all started asynchronously and waited for only
            after the other chunk has computed up to its own next all-to-all (overlap.py's
            InterleavedOverlap), instead of one chunk after the other; dualpipev's lists then run on
            our runtime (torch's runs a pair's parts in sequence). Same results either way; no effect
            on 1f1b and zb, on NCCL, or without experts to exchange.
        max_nodes_per_token, ranks_per_node, fp8_dispatch, zero1, checkpoint_format, timeout,
            start_method: as ``ParallelStrategy`` (node-limited routing, FP8 dispatch, ZeRO-1, the
            checkpoint format, the collectives' timeout, launch).
    """

    strategy_name = "dualpipe"

    def __init__(
        self,
        pipeline_parallel_size: int,
        num_microbatches: int,
        schedule: Schedule = "dualpipev",
        *,
        expert_parallel_size: int = 1,
        overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        validate(schedule, pipeline_parallel_size, num_microbatches)
        super().__init__(expert_parallel_size=expert_parallel_size, **kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.overlap = overlap
        self.runner: PipelineRunner | None = None
        self._grads: dict[torch.nn.Parameter, torch.Tensor] = {}

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise NotImplementedError(
                f"trainer.accumulate_grad_batches ({trainer.accumulate_grad_batches}) is not supported with "
                f"{type(self).__name__}: the micro-batches are the accumulation; raise {_KEY}.num_microbatches "
                "and data.batch_size instead"
            )
        super().setup(trainer)

    @override
    def setup_pipeline(self) -> None:
        self.runner = PipelineRunner(
            self.lightning_module, self.build_plan(), self.mesh.pipeline_group, self.root_device,
            overlap=self._overlap_hook(),
        )
        if self.shards_first:  # before materialisation: the pieces other positions run never get values here
            self.runner.release_unowned()

    def _overlap_hook(self) -> InterleavedOverlap | None:
        if not (self.overlap and spec(self.schedule).pairs and self._shards):
            return None
        hook = InterleavedOverlap()
        layers = hook.attach(self.lightning_module)
        rank_zero_info(f"dualpipe: (F;B) pairs overlapped, the all-to-alls of {layers} MoE layer(s) asynchronous")
        return hook

    def build_plan(self) -> SchedulePlan:
        """The extension point for another schedule: every pipeline rank's compute actions.

        The default is the named schedule's plan (plans.py). A subclass may return any
        ``SchedulePlan`` on a linear layout (one stage per rank) whose action lists are valid for
        torch.distributed.pipelining's runtime (it adds the sends and receives): it then runs, logs and
        checkpoints like the built-in schedules, and ``simulate`` reports its bubble and memory.
        """
        return build_plan(self.schedule, self.pipeline_parallel_size, self.num_microbatches)

    def _runner(self) -> PipelineRunner:
        if self.runner is None:
            raise RuntimeError(
                f"{type(self).__name__} has no pipeline before Trainer setup (no process group yet)"
            )
        return self.runner

    # ------------------------------------------------------------------ training
    @override
    def training_step(
        self, batch: torch.Tensor | dict[str, torch.Tensor], batch_idx: int, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        batch = self.read_batch(batch)
        runner = self._runner()
        module = self.lightning_module
        module.zero_grad(
            set_to_none=True
        )  # Lightning zeroes only after training_step; the schedule adds to .grad
        with self.precision_plugin.train_step_context():
            sums, count = runner.train_step(batch)
        if isinstance(batch, Batch) and batch.counts is not None:  # as training_step logs them: global counts
            sums["target_tokens"] = batch.global_count(1) * count
            sums["masked_tokens"] = (batch.global_count(0) - batch.global_count(1)) * count
        loss = module.log_train(sums, count)  # the global batch's values, one all-reduce over all processes
        # Lightning zeroes gradients between training_step and backward: keep them aside until backward
        self._grads = {p: p.grad for p in module.parameters() if p.grad is not None}
        for p in self._grads:
            p.grad = None
        tokens = batch if isinstance(batch, torch.Tensor) else batch.tokens
        seq_len = tokens.shape[1] - 1 - module.extra_tokens
        module.flops_per_batch = module.flops_per_token * tokens.shape[0] * seq_len
        return loss.to(tokens.device).requires_grad_()

    def read_batch(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | Batch:
        """This pipeline's batch as the runner takes it: plain windows as they are (each micro-batch's
        mean, as before); a conversation batch read as ``DSV3LightningModule.read_batch`` reads it, but
        with its target counts summed over the replicas (one all-reduce over this pipeline position's
        block group: summed over all processes, every replica's batch would count P times) and the
        R = E x D replicas as its shares."""
        if isinstance(batch, torch.Tensor):
            return batch
        module = self.lightning_module
        return Batch.read(  # refuses a dict without tokens, or with other keys
            batch, module.seq_len_of(batch), offsets=1 + module.extra_tokens, replicas=self.mesh.num_replicas,
            sum_over_processes=self._sum_over_replicas,
        )  # fmt: skip

    def _sum_over_replicas(self, counts: torch.Tensor) -> torch.Tensor:
        if self.mesh.num_replicas == 1:
            return counts
        comm = self.mesh.comm(self.mesh.block_group, "the target counts")
        collective(comm, "count all-reduce", lambda: dist.all_reduce(counts, group=comm.group))
        return counts

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._grads.items():
            p.grad = grad if p.grad is None else p.grad + grad
        self._grads = {}
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # on_after_backward: the guard
        self.sync_gradients()  # after Lightning's zero_grad, which would drop ZeRO-1's master gradients
        return closure_loss

    @override
    def parameter_owners(self) -> dict[str, set[int]]:
        return self._runner().owners

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: torch.Tensor | dict[str, torch.Tensor], stage_name: str) -> None:
        batch = self.read_batch(batch)
        logs = pipeline_evaluate(self._runner(), batch, stage_name)
        logs = self.mesh.mean_over_replicas(logs, self.root_device)
        device = (batch if isinstance(batch, torch.Tensor) else batch.tokens).device
        self.lightning_module.log_dict({k: v.to(device) for k, v in logs.items()})

    @override
    def validation_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.val_step_context():
            self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.test_step_context():
            self._evaluate(batch, "test")

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"predict is not supported with {type(self).__name__}; predict with a single device (trainer.devices: 1 "
            "and the default strategy), loading the checkpoint, which holds the full model"
        )

    # ------------------------------------------------------------------ checkpoints
    @override
    def full_module_state(self) -> dict[str, Any]:
        if self.runner is None:
            return super().full_module_state()
        return self.runner.full_state_dict()  # every position's tensors; experts: this rank's shard

    @override
    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict with each parameter's state taken from the rank that trains it (the
        expert shards' state gathered over the expert group first): checkpoint_format "full" only."""
        state = super().full_optimizer_state(optimizer)  # the expert shards' state gathered over "ep"
        if self.runner is None or not state:
            return state
        runner = self.runner
        module = self.lightning_module
        opt = optimizer
        names = {id(p): n for n, p in module.named_parameters()}
        params = [p for group in opt.param_groups for p in group["params"]]
        mine = {
            i: state["state"][i]
            for i, p in enumerate(params)
            if i in state["state"] and min(runner.owners.get(names[id(p)], {0})) == runner.rank
        }
        gathered: list = [None] * dist.get_world_size(runner.group)
        dist.all_gather_object(
            gathered,
            {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in mine.items()},
            group=runner.group,
        )
        full = {}
        for part in gathered:
            full.update(part)
        return {**state, "state": dict(sorted(full.items()))}

    @override
    def on_train_start(self) -> None:
        """Each rank gives back the parameters (and their optimizer state) of the pieces it does not run."""
        super().on_train_start()
        runner = self._runner()
        kept = runner.release_unowned()
        names = {id(p): n for n, p in self.lightning_module.named_parameters()}
        for optimizer in self.optimizers:
            for p in list(optimizer.state):
                if names.get(id(p)) in runner.released:
                    del optimizer.state[p]
        total = sum(
            s.numel()
            for n, s in runner.full_shapes.items()
            if n in dict(self.lightning_module.named_parameters())
        )
        log.info(
            f"pipeline rank {runner.rank}: holds {kept}/{total} parameters ({len(runner.released)} tensors released)"
        )

    @override
    def on_train_end(self) -> None:
        """Completes every rank's copy of the module again, so that what the launcher hands back to a
        notebook's process after ``fit`` (rank 0's module) is the whole trained model; not for a module
        built shard-first, whose ranks never hold more than their pieces (read the checkpoint instead)."""
        super().on_train_end()
        if self.runner is not None and not self.shards_first:
            self.runner.restore_unowned()

    @override
    def teardown(self) -> None:
        self.runner = None
        super().teardown()


__all__ = ["DualPipeStrategy"]
