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
which exchange tokens by all-to-all (expert_parallel's sharding and dispatcher). The strategy is DDP's
process handling (launch, process group, barrier, reduce) without the DDP wrapper, and replaces the step:

- ``training_step`` runs the whole schedule (PipelineRunner: forward and backward of every
  micro-batch, gradients of shared parameters summed over the pipeline), reduces the gradients over
  the pipelines to the global batch's (grad_sync.py), logs ``train/loss``, ``train/ce`` and the heads'
  logs (from the last stages, averaged over the pipelines: equal on every rank), and sets the
  gradients aside: Lightning zeroes gradients between ``training_step`` and ``backward``;
- ``backward`` puts them back instead of differentiating, and clips by the *global* norm over the
  whole model (every position, every expert shard) when ``gradient_clip_algorithm`` is "norm"
  (Lightning's own clipping, which sees one rank's gradients, then finds nothing to clip);
- ``validation_step`` / ``test_step`` run a forward through the pieces (evaluation.py), heads' logs
  averaged over the pipelines;
- checkpoints hold the full model: ``lightning_module_state_dict`` broadcasts each tensor from the
  rank that trains it and gathers the expert shards, ``optimizer_state`` does the same for each
  parameter's state. A checkpoint is therefore an ordinary single-process checkpoint, loadable with any
  number of stages and expert ranks, and in a plain run.

A checkpoint loads into the whole module on every rank (before setup shards the experts and before
training starts, so loading is the plain one; the optimizer state is sliced to the shards); at ``on_train_start`` each rank releases the parameters (and optimizer state) of the pieces
it does not run, keeping each Parameter as an empty tensor that the optimizer skips (it never has a
gradient), and ``on_train_end`` fills them again from their owners; at teardown the expert shards are
gathered back, so that every rank's module is whole again. Not supported yet, each refused with the
fix: loss terms registered by callbacks (sequence-wise balance loss), gradient accumulation (the
micro-batches are the accumulation), ``predict``. Callbacks that read every router's last forward
(ExpertLoadMonitor) see only the local stages' routers and the last micro-batch: leave them out. With
expert parallelism under schedules "dualpipe" and "dualpipev" (on gloo), each (F;B) pair runs its
forward and backward chunks in turns, so that each one's all-to-alls run under the other's
computation (``overlap``; overlap.py). The dispatch is not FP8 here.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from dsv3_lightning.plugins.dualpipe.evaluation import pipeline_evaluate
from dsv3_lightning.plugins.dualpipe.grad_sync import clip_global_norm, reduce_gradients
from dsv3_lightning.plugins.dualpipe.mesh import PipelineMesh, mesh_shape
from dsv3_lightning.plugins.dualpipe.overlap import InterleavedOverlap
from dsv3_lightning.plugins.dualpipe.plans import SchedulePlan, build_plan, validate
from dsv3_lightning.plugins.dualpipe.runner import PipelineRunner
from dsv3_lightning.plugins.expert_parallel.all_to_all import Comm
from dsv3_lightning.plugins.expert_parallel.sharding import (
    ExpertShard,
    full_optimizer_state,
    full_state_dict,
    local_state_dict,
    sliced_optimizer_states,
    unshard_experts,
)
from dsv3_lightning.plugins.expert_parallel.strategy import check_model
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

_KEY = "trainer.strategy.init_args"
log = logging.getLogger(__name__)


class DualPipeStrategy(DDPStrategy):
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
        timeout: Seconds a collective may wait before the run fails with a clear error.
        start_method: How the processes start: "popen" (re-run the command, as ``dsv3 fit``), "spawn"
            or "fork" (in-process launch, for notebooks and tests).
    """

    strategy_name = "dualpipe"

    def __init__(
        self,
        pipeline_parallel_size: int,
        num_microbatches: int,
        schedule: Literal["dualpipev", "dualpipe", "1f1b", "zb"] = "dualpipev",
        *,
        expert_parallel_size: int = 1,
        overlap: bool = True,
        timeout: float = 1800.0,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        validate(schedule, pipeline_parallel_size, num_microbatches)
        if expert_parallel_size < 1:
            raise ValueError(f"{_KEY}.expert_parallel_size ({expert_parallel_size}) must be >= 1")
        if timeout <= 0:
            raise ValueError(f"{_KEY}.timeout ({timeout}) must be a positive number of seconds")
        super().__init__(start_method=start_method, timeout=timedelta(seconds=timeout), **kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.expert_parallel_size = expert_parallel_size
        self.overlap = overlap
        self.timeout_s = float(timeout)
        self.runner: PipelineRunner | None = None
        self._mesh: PipelineMesh | None = None
        self._shards: list[ExpertShard] = []
        self._failed = False
        self._grads: dict[torch.nn.Parameter, torch.Tensor] = {}

    # ------------------------------------------------------------------ checks before launch
    @override
    def set_world_ranks(self) -> None:
        super().set_world_ranks()
        mesh_shape(
            self.num_nodes * self.num_processes, self.pipeline_parallel_size, self.expert_parallel_size
        )

    @override
    def connect(self, model: pl.LightningModule) -> None:
        if self.expert_parallel_size > 1:
            check_model(
                model,
                self.expert_parallel_size,
                strategy=f"{type(self).__name__} with {_KEY}.expert_parallel_size {self.expert_parallel_size}",
                instead=f"set {_KEY}.expert_parallel_size to 1",
            )
        super().connect(model)

    # ------------------------------------------------------------------ setup
    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Pipeline i of the E x D reads replica i; the P ranks of a pipeline read the same slice."""
        pipelines = self.num_nodes * self.num_processes // self.pipeline_parallel_size
        return {"num_replicas": pipelines, "rank": self.global_rank % pipelines}

    @property
    def mesh(self) -> PipelineMesh:
        if self._mesh is None:
            raise RuntimeError(
                f"{type(self).__name__}.mesh exists only after Trainer setup (no process group yet)"
            )
        return self._mesh

    def _build_mesh(self) -> None:
        """The process groups and this rank's expert shards (once, before the optimizers exist)."""
        if self._mesh is not None:
            return
        module = self.lightning_module
        _sync_module_states(module)  # one initialisation everywhere (what DDP's wrapper would do)
        self._mesh = mesh = PipelineMesh.create(
            self.pipeline_parallel_size, self.expert_parallel_size, self.timeout_s
        )
        self._shards = mesh.shard_experts(module)
        experts = (
            f", {self._shards[0].num_local_experts} of {self._shards[0].num_experts} experts per rank in "
            f"{len(self._shards)} MoE layer(s)"
            if self._shards
            else ""
        )
        rank_zero_info(
            f"dualpipe: {mesh.pipeline_parallel_size} pipeline x {mesh.expert_parallel_size} expert x "
            f"{mesh.data_parallel_size} data ranks{experts}"
        )

    @override
    def configure_ddp(self) -> None:
        self._build_mesh()  # no DDP wrapper: the pipeline and grad_sync.py own the gradients

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise NotImplementedError(
                f"trainer.accumulate_grad_batches ({trainer.accumulate_grad_batches}) is not supported with "
                f"{type(self).__name__}: the micro-batches are the accumulation; raise {_KEY}.num_microbatches "
                "and data.batch_size instead"
            )
        module = trainer.lightning_module
        terms = sorted(getattr(module, "_loss_terms", {}))
        if terms:
            raise NotImplementedError(
                f"loss terms {terms} (added by callbacks such as SequenceBalanceLoss) need every layer's router "
                f"statistics at the loss, which a pipeline spreads over ranks; remove those callbacks from "
                f"trainer.callbacks with {type(self).__name__}"
            )
        super().setup(trainer)
        self._build_mesh()  # validate / test: no configure_ddp
        self.runner = PipelineRunner(
            module, self.build_plan(), self.mesh.pipeline_group, self.root_device, overlap=self._overlap_hook()
        )

    def _overlap_hook(self) -> InterleavedOverlap | None:
        if not (self.overlap and self.schedule in ("dualpipe", "dualpipev") and self._shards):
            return None
        if dist.get_backend(self.mesh.pipeline_group) != "gloo":
            return None  # dualpipev stays on torch's runtime (our runtime tells messages apart by tag)
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
    def training_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        runner = self._runner()
        module = self.lightning_module
        module.zero_grad(
            set_to_none=True
        )  # Lightning zeroes only after training_step; the schedule adds to .grad
        with self.precision_plugin.train_step_context():
            loss, logs = runner.train_step(tokens)
        reduce_gradients(runner, self.mesh, self._shards)
        logs = self.mesh.mean_over_pipelines({"loss": loss, **logs}, self.root_device)
        loss = logs.pop("loss")
        # Lightning zeroes gradients between training_step and backward: keep them aside until backward
        self._grads = {p: p.grad for p in module.parameters() if p.grad is not None}
        for p in self._grads:
            p.grad = None
        device = tokens.device
        module.log("train/loss", loss.to(device), prog_bar=True)
        module.log_dict({f"train/{k}": v.to(device) for k, v in logs.items()})
        seq_len = tokens.shape[1] - 1 - module.extra_tokens
        module.flops_per_batch = module.flops_per_token * tokens.shape[0] * seq_len
        return loss.to(device).requires_grad_()

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._grads.items():
            p.grad = grad if p.grad is None else p.grad + grad
        self._grads = {}
        trainer = module.trainer
        if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            self.clip_global_norm(float(trainer.gradient_clip_val))
        return self.precision_plugin.post_backward(closure_loss, module)

    def clip_global_norm(self, max_norm: float) -> float:
        """Scales every rank's gradients so that the norm over the whole model is at most ``max_norm``.

        Each parameter counts once (grad_sync.py). Returns the norm before clipping.
        """
        return clip_global_norm(self._runner(), self.mesh, self._shards, max_norm)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, tokens: torch.Tensor, stage_name: str) -> None:
        logs = pipeline_evaluate(self._runner(), tokens, stage_name)
        logs = self.mesh.mean_over_pipelines(logs, self.root_device)
        self.lightning_module.log_dict({k: v.to(tokens.device) for k, v in logs.items()})

    @override
    def validation_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.val_step_context():
            self._evaluate(tokens, "val")

    @override
    def test_step(self, tokens: torch.Tensor, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.test_step_context():
            self._evaluate(tokens, "test")

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"predict is not supported with {type(self).__name__}; predict with a single device (trainer.devices: 1 "
            "and the default strategy), loading the checkpoint, which holds the full model"
        )

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.runner is None:
            return super().lightning_module_state_dict()
        state = self.runner.full_state_dict()  # every position's tensors; experts: this rank's shard
        if not self._shards:
            return state
        return full_state_dict(state, self._shards, self._expert_comm("the checkpoint"))

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        # Lightning loads before setup (the whole module); after it, the experts are sharded
        if not self._shards:
            return super().load_model_state_dict(checkpoint, strict)
        self.lightning_module.load_state_dict(
            local_state_dict(checkpoint["state_dict"], self._shards), strict=strict
        )

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's state dict with each parameter's state taken from the rank that trains it (the
        expert shards' state gathered over the expert group first)."""
        state = super().optimizer_state(optimizer)
        if self.runner is None or not state:
            return state
        runner = self.runner
        module = self.lightning_module
        opt = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if self._shards:  # only the parameters of this rank's pieces have state, the same at every position
            state = full_optimizer_state(opt, state, self._shards, self._expert_comm("the checkpoint"))
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
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        if not self._shards:
            return super().load_optimizer_state_dict(checkpoint)
        super().load_optimizer_state_dict(sliced_optimizer_states(checkpoint, self.optimizers, self._shards))

    def _expert_comm(self, where: str) -> Comm:
        return self.mesh.comm(self.mesh.stage.expert_group, where)

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
        notebook's process after ``fit`` (rank 0's module) is the whole trained model."""
        super().on_train_end()
        if self.runner is not None:
            self.runner.restore_unowned()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collectives in teardown: the other ranks may be gone
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        """Gathers the expert shards back into every rank's module (after a normal end)."""
        if self._shards and not self._failed:
            unshard_experts(self._shards, self._expert_comm("teardown"))
        self.runner, self._mesh, self._shards = None, None, []
        super().teardown()


__all__ = ["DualPipeStrategy"]
